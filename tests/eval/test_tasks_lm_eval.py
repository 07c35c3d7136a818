"""Multiple-choice tasks (eval/tasks.py) against lm-evaluation-harness 0.4.13 itself: `lm_eval.simple_evaluate` with
`HFLM` over the same tiny random Llama, on task YAML files that both read (local JSONL, offline), 0-shot and 2-shot.
Per doc: the same prompt strings, log-likelihoods within 1e-4, the same acc / acc_norm; per task the same means and
standard errors."""

from __future__ import annotations

import os

import pytest
import torch

from lmforge.eval.tasks import evaluate_task
from lmforge.eval.taskspec import SHIPPED_DIR, load_spec

LIMIT = 10
TASKS = {
    # the shipped cloze rows, default sampler over a train split
    "cloze_p": f"""task: cloze_p
dataset_path: json
dataset_kwargs:
  data_files:
    test: {SHIPPED_DIR / "cloze.jsonl"}
    train: {SHIPPED_DIR / "cloze_train.jsonl"}
test_split: test
fewshot_split: train
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""",
    # few-shot drawn from the test split itself (the doc is kept out of its own draws), a text target, a
    # description, a choice list rendered by a template
    "play_p": f"""task: play_p
dataset_path: json
dataset_kwargs:
  data_files:
    test: {SHIPPED_DIR / "shakespeare_play.jsonl"}
test_split: test
fewshot_split: test
output_type: multiple_choice
description: "Name the play.\\n\\n"
doc_to_text: "Line: {{{{line}}}}\\nPlay:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{choices[label]}}}}"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""",
    # the first_n sampler, other delimiters
    "play_first": f"""task: play_first
dataset_path: json
dataset_kwargs:
  data_files:
    test: {SHIPPED_DIR / "shakespeare_play.jsonl"}
    train: {SHIPPED_DIR / "shakespeare_play_train.jsonl"}
test_split: test
fewshot_split: train
output_type: multiple_choice
doc_to_text: "{{{{line}}}} --"
doc_to_choice: choices
doc_to_target: label
target_delimiter: " => "
fewshot_delimiter: "\\n###\\n"
fewshot_config:
  sampler: first_n
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tasks")
    for name, text in TASKS.items():
        (directory / f"{name}.yaml").write_text(text, encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def lm_eval_runs(model_dir, task_dir):
    """lm_eval's results and per-doc samples for every task, 0-shot and 2-shot (HF_DATASETS_OFFLINE: no network)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    import transformers as T
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    hf = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lm = HFLM(pretrained=hf, tokenizer=T.AutoTokenizer.from_pretrained(model_dir), batch_size=4)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    options = {"tasks": list(TASKS), "limit": LIMIT, "log_samples": True, "task_manager": manager}
    return {shots: lm_eval.simple_evaluate(model=lm, num_fewshot=shots, **options) for shots in (0, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("shots", [0, 2])
@pytest.mark.parametrize("task", list(TASKS))
def test_matches_lm_eval(lm_eval_runs, loaded, task_dir, task, shots):
    run = lm_eval_runs[shots]
    model, tok = loaded
    result = evaluate_task(model, tok, load_spec(task_dir / f"{task}.yaml"), num_fewshot=shots, limit=LIMIT,
                           batch_size=3)  # fmt: skip
    samples = sorted(run["samples"][task], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(LIMIT)) == [s["doc"] for s in result.samples]
    for ours, theirs in zip(result.samples, samples, strict=True):
        assert {ctx for ctx, _ in theirs["arguments"]} == {ours["context"]}  # the very prompt string
        delimiter = " => " if task == "play_first" else " "
        assert [cont for _, cont in theirs["arguments"]] == [delimiter + c for c in ours["choices"]]
        assert ours["loglikelihoods"] == pytest.approx([r[0][0] for r in theirs["resps"]], abs=1e-4)
        assert ours["is_greedy"] == [r[0][1] for r in theirs["resps"]]
        assert (ours["acc"], ours["acc_norm"]) == (theirs["acc"], theirs["acc_norm"])
    summary = run["results"][task]
    for metric in ("acc", "acc_norm"):
        assert result.metrics[metric].value == summary[f"{metric},none"]
        assert result.metrics[metric].stderr == pytest.approx(summary[f"{metric}_stderr,none"], rel=1e-12)
        assert result.metrics[metric].n == LIMIT
    delimiter = "\n###\n" if task == "play_first" else "\n\n"
    assert result.samples[0]["context"].count(delimiter) == shots + (task == "play_p")  # (+ the description's)


@pytest.mark.slow
def test_the_runs_tell_the_choices_apart(lm_eval_runs):
    """acc and acc_norm differ somewhere, so the per-character normalisation is really checked."""
    samples = [s for run in lm_eval_runs.values() for task in TASKS for s in run["samples"][task]]
    assert any(s["acc"] != s["acc_norm"] for s in samples)
    assert 0 < sum(s["acc"] for s in samples) < len(samples)
