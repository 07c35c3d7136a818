"""Evaluation tasks scored as lm-evaluation-harness 0.4.13 scores them (`ConfigurableTask.process_results`,
`metrics.mean`, `metrics.mean_stderr`), over task specs (taskspec.py) and prompts (prompts.py).

**Multiple choice.** For a doc with prompt c, choices a_1 … a_n and gold index g, ℓ_i = log p(δ + a_i | c) with δ
the target delimiter (loglikelihood.py), and

    acc       = [argmax_i ℓ_i = g]
    acc_norm  = [argmax_i ℓ_i / len(a_i) = g]           len in characters (of the choice, without δ), as lm-eval
    acc_bytes = [argmax_i ℓ_i / bytes(a_i) = g]         UTF-8 bytes

(argmax takes the first of equal values, as numpy's). A gold given as text is the index of that choice.

**Generation.** Greedy generation from the prompt (infer/generate.py: `generate_batch` at temperature 0) until a
stop string (generation_kwargs.until) or the eos token or max_gen_toks tokens; the prompt is cut from the left to
leave max_gen_toks tokens of room (lm-eval's rule). The answer is extracted (extract.py) and

    exact_match = [extract(generation) = target]        any of the targets, when there are several

**Aggregation** over the n docs of a task: the value is the mean of the per-doc scores and its standard error the
sample standard deviation over sqrt(n) (lm-eval's `mean_stderr`; None for n < 2):

    stderr = sqrt( Σ (x_k - x̄)² / (n - 1) ) / sqrt(n)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from lmforge.eval import prompts
from lmforge.eval.extract import extract, normalize_target
from lmforge.eval.loglikelihood import encode, loglikelihood
from lmforge.eval.taskspec import TaskSpec, TaskSpecError
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.base import BaseTokenizer

__all__ = ["MetricResult", "TaskResult", "argmax", "evaluate_task", "mean_stderr", "score_choices"]


@dataclass(frozen=True)
class MetricResult:
    """One metric of a task: the mean over `n` docs and its standard error (None when n < 2)."""

    value: float
    stderr: float | None
    n: int


@dataclass(frozen=True)
class TaskResult:
    """A task's metrics and, per doc, what was scored: `samples[k]` holds the doc's index, its prompt and, for
    multiple choice, the (log-likelihood, is_greedy) of each choice; for generation the text and the answer."""

    task: str
    num_fewshot: int
    metrics: dict[str, MetricResult]
    samples: list[dict] = field(default_factory=list)


def argmax(values: Sequence[float]) -> int:
    """The index of the largest value, the first of equal ones (numpy's `argmax`)."""
    return max(range(len(values)), key=values.__getitem__)


def mean_stderr(scores: Sequence[float]) -> float | None:
    """The standard error of the mean: sample standard deviation / sqrt(n) (lm-eval's); None for n < 2."""
    n = len(scores)
    if n < 2:
        return None
    mean = sum(scores) / n
    return math.sqrt(sum((x - mean) ** 2 for x in scores) / (n - 1)) / math.sqrt(n)


def score_choices(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc, acc_norm (per character) and acc_bytes (per UTF-8 byte) of one doc (module docstring)."""
    norm = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
    per_byte = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, choices, strict=True)]
    return {"acc": float(argmax(lls) == gold), "acc_norm": float(argmax(norm) == gold),
            "acc_bytes": float(argmax(per_byte) == gold)}  # fmt: skip


def _gold_index(spec: TaskSpec, doc: dict, choices: list[str], k: int) -> int:
    """The gold choice's index: the target as an index, or the index of the choice it spells."""
    gold = prompts.doc_to_target(spec, doc)
    if isinstance(gold, str) and gold in choices:
        return choices.index(gold)
    if isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices):
        return gold
    raise TaskSpecError(f"{spec.source}: doc {k}: target {gold!r} is not one of its {len(choices)} choices "
                        f"(an index 0..{len(choices) - 1} or a choice's text)")  # fmt: skip


def _multiple_choice(
    model: Transformer, tokenizer: BaseTokenizer, spec: TaskSpec, docs: list[dict], contexts: list[str],
    batch_size: int, add_bos: bool | None, progress: bool,
) -> list[dict]:
    """Per doc: the choices' (log-likelihood, is_greedy), gold index, acc / acc_norm / acc_bytes."""
    choices = [prompts.doc_to_choice(spec, doc) for doc in docs]
    golds = [_gold_index(spec, doc, c, k) for k, (doc, c) in enumerate(zip(docs, choices, strict=True))]
    requests = [(ctx, spec.target_delimiter + c) for ctx, cs in zip(contexts, choices, strict=True) for c in cs]
    results = iter(loglikelihood(model, tokenizer, requests, add_bos=add_bos, batch_size=batch_size, progress=progress))
    samples = []
    for k, (ctx, cs, gold) in enumerate(zip(contexts, choices, golds, strict=True)):
        scored = [next(results) for _ in cs]
        lls = [ll for ll, _ in scored]
        samples.append({"doc": k, "context": ctx, "choices": cs, "gold": gold, "loglikelihoods": lls,
                        "is_greedy": [g for _, g in scored], **score_choices(lls, cs, gold)})  # fmt: skip
    return samples


def _generate(
    model: Transformer, tokenizer: BaseTokenizer, spec: TaskSpec, docs: list[dict], contexts: list[str],
    batch_size: int, add_bos: bool | None, progress: bool,
) -> list[dict]:
    """Per doc: the greedy generation, the extracted answer, exact_match."""
    from tqdm.auto import tqdm

    from lmforge.infer.generate import generate_batch

    room = model.config.max_seq_len - spec.max_gen_toks
    if room < 1:
        raise TaskSpecError(f"{spec.source}: generation_kwargs.max_gen_toks={spec.max_gen_toks}: leaves no room for "
                            f"a prompt in the model's context ({model.config.max_seq_len})")  # fmt: skip
    ids = [encode(tokenizer, ctx, add_bos)[-room:] for ctx in contexts]
    texts = [""] * len(ids)
    for start in tqdm(range(0, len(ids), batch_size), desc="generate", unit="batch", disable=not progress):
        events = generate_batch(model, tokenizer, ids[start : start + batch_size], temperature=0.0,
                                max_tokens=spec.max_gen_toks, stop=list(spec.until))  # fmt: skip
        for i, event in events:
            texts[start + i] += event.text
    samples = []
    for k, (doc, ctx, text) in enumerate(zip(docs, contexts, texts, strict=True)):
        target = prompts.doc_to_target(spec, doc)
        targets = [str(t) for t in (target if isinstance(target, list) else [target])]
        answer = extract(text, spec.extract)
        hit = any(answer == normalize_target(t, spec.extract) for t in targets)
        samples.append({"doc": k, "context": ctx, "generation": text, "answer": answer, "targets": targets,
                        "exact_match": float(hit)})  # fmt: skip
    return samples


def evaluate_task(
    model: Transformer,
    tokenizer: BaseTokenizer,
    spec: TaskSpec,
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    seed: int | None = 1234,
    add_bos: bool | None = None,
    progress: bool = False,
) -> TaskResult:
    """Run `spec` on the model: its first `limit` docs (all when None), each after `num_fewshot` examples (None:
    the spec's `num_fewshot`) drawn with `seed` (lm-eval's `fewshot_random_seed`); `batch_size` requests per
    forward, `add_bos` as `loglikelihood.encode`'s. Returns the metrics and the per-doc samples."""
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    if k < 0:
        raise TaskSpecError(f"num_fewshot={k}: must be at least 0")
    if limit is not None and limit < 1:
        raise TaskSpecError(f"limit={limit}: must be at least 1")
    docs = list(spec.docs[:limit])
    sampler = prompts.FewshotSampler(spec, seed)
    contexts = [prompts.context(spec, doc, sampler.sample(k, doc)) for doc in docs]
    run = _multiple_choice if spec.output_type == "multiple_choice" else _generate
    samples = run(model, tokenizer, spec, docs, contexts, batch_size, add_bos, progress)
    metrics = {}
    for name in spec.metrics:
        scores = [s[name] for s in samples]
        metrics[name] = MetricResult(sum(scores) / len(scores), mean_stderr(scores), len(scores))
    return TaskResult(spec.name, k, metrics, samples)
