"""Beam search, as transformers' `generate(num_beams=k, do_sample=False)` computes it.

A beam is a sequence with its score s = sum of its tokens' log-probabilities. Each step, for the k running beams:

    candidates   every (beam, next token) pair, scored s_beam + log p(token | beam); keep the best
                 K = max(2, 1 + #eos) * k of them (so that k survive even if the best ones all end)
    running      the best k candidates that do not end (an eos token, or the length limit) continue
    finished     each candidate among the best k that ends is a hypothesis scored s / L ** length_penalty (L:
                 its generated tokens, the eos included); the k best hypotheses so far are kept
    stop         when no running beam can beat the worst kept hypothesis, or, with early_stopping=True, as soon
                 as k hypotheses are kept, or when every candidate ends (the length limit)

"Can beat" is the heuristic transformers uses: the best running score divided by L ** length_penalty, with L the
current length, or the longest possible length when early_stopping="never" and length_penalty > 0 (a positive
penalty favours longer hypotheses, so waiting may help); early_stopping=False stops as soon as the heuristic
says no. Masked scores are pushed down by 1e9 (float32) as transformers does, so ties and their order match.
The result is the `num_return_sequences` best hypotheses, best first, each with its generated tokens, score
(transformers' `sequences_scores`) and cumulative log-probability s.

The search runs over one function, `step(sequences (N, L), parents (N,) | None) -> (N, V)` next-token
log-probabilities, where parents[i] is the row of the previous call that row i continues (None at the first call,
whose rows are the prompt): a beam's parent may be any beam, so a cache must copy rows between steps.
`model_step` is a model's step over a `PagedKVCache` with one-token blocks: a beam that forks shares its parent's
blocks (reference-counted, never written again: every block is full), so no key is recomputed or copied; a
contiguous `KVCache` cannot do this, as it has no way to copy a row into another. `BeamSearch` is the same search
one step at a time, for a caller that runs the steps of several searches in one forward (`engine.beam_search`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from lmforge.configfile import check, check_finite, check_positive
from lmforge.infer.generate import check_prompt
from lmforge.infer.paged_cache import PagedKVCache
from lmforge.model.transformer import Transformer

__all__ = ["Beam", "BeamParams", "BeamSearch", "beam_generate", "beam_search", "model_step"]

Step = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
"""(sequences (N, L) long: prompt + generated tokens, all the same length; parents (N,) long: the row of the previous
call each row continues, None at the first call) -> (N, V) float32 next-token log-probs."""

MASK = -1.0e9  # added to a score to take it out of a selection (transformers' value)


@dataclass(frozen=True)
class BeamParams:
    """What `generate(num_beams=..., do_sample=False, ...)` takes in transformers, with the same meanings."""

    num_beams: int = 4
    max_new_tokens: int = 16
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never"
    num_return_sequences: int = 1
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_positive("num_beams", self.num_beams)
        check_positive("max_new_tokens", self.max_new_tokens)
        check_finite("length_penalty", self.length_penalty)
        stopping = self.early_stopping
        check(isinstance(stopping, bool) or stopping == "never", "early_stopping", stopping,
              'must be true, false or "never"')  # fmt: skip
        check_positive("num_return_sequences", self.num_return_sequences)
        check(self.num_return_sequences <= self.num_beams, "num_return_sequences", self.num_return_sequences,
              f"must be at most num_beams ({self.num_beams})")  # fmt: skip
        ids = self.eos_token_ids
        check(all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids), "eos_token_ids", ids,
              "must be token ids (integers >= 0)")  # fmt: skip


@dataclass
class Beam:
    """A finished hypothesis: its generated tokens (ending with the eos when it ended on one), its score and its
    cumulative log-probability (the score before the length penalty)."""

    tokens: list[int]
    score: float
    logprob: float


@dataclass
class _Hypotheses:
    """The k best finished hypotheses so far (transformers' `sequences`, `beam_scores`, `is_sent_finished`)."""

    sequences: torch.Tensor  # (k, max_len) long
    lengths: torch.Tensor  # (k,) long: prompt + generated tokens
    scores: torch.Tensor  # (k,) float32, MASK where no hypothesis is kept yet
    logprobs: torch.Tensor  # (k,) float32: the scores before the length penalty
    done: torch.Tensor  # (k,) bool: the slot holds a hypothesis


class BeamSearch:
    """One prompt's search, one step at a time: the next step's log-probs are asked for `sequences` (N, L) and
    `parents` (N,) | None (see `Step`), `advance(logp)` takes them, `done` once the search stopped, `best()` is the
    result. `beam_search` drives one over a step function; the engine drives many, all in one forward per step."""

    def __init__(self, prompt: Sequence[int], params: BeamParams, device: torch.device | str = "cpu") -> None:
        k, n = params.num_beams, len(prompt)
        self.params, self.prompt_len, self.max_len = params, n, n + params.max_new_tokens
        self.keep = max(2, 1 + len(params.eos_token_ids)) * k
        self.eos = torch.tensor(params.eos_token_ids, dtype=torch.long, device=device)
        self.running = torch.zeros(k, self.max_len, dtype=torch.long, device=device)
        self.running[:, :n] = torch.tensor(list(prompt), dtype=torch.long, device=device)
        self.scores = torch.full((k,), MASK, device=device)
        self.scores[0] = 0.0  # every beam starts as the prompt: only the first one's continuations count
        masked = torch.full((k,), MASK, device=device)
        self.found = _Hypotheses(self.running.clone(), torch.full((k,), n, device=device), masked, masked.clone(),
                                 torch.zeros(k, dtype=torch.bool, device=device))  # fmt: skip
        self.parents: torch.Tensor | None = None
        self.length, self.done = n, False

    @property
    def sequences(self) -> torch.Tensor:
        """(k, L) the running beams: prompt + generated tokens (at the start, k copies of the prompt)."""
        return self.running[:, : self.length]

    def advance(self, logp: torch.Tensor) -> None:
        """Take the (k, V) next-token log-probs of `sequences`: pick the next k running beams (their rows of
        `sequences` in `parents`), keep the hypotheses that end, and decide whether the search stops."""
        params, length, n = self.params, self.length, self.prompt_len
        total, index = (logp.float() + self.scores[:, None]).reshape(-1).topk(self.keep)
        parent, token = index // logp.shape[-1], index % logp.shape[-1]
        candidates = self.running[parent]
        candidates[:, length] = token
        ends = torch.isin(token, self.eos) | (length + 1 >= self.max_len)
        alive = total + ends.float() * MASK  # a candidate that ends does not continue
        chosen = alive.topk(params.num_beams).indices
        self.running, self.scores, self.parents = candidates[chosen], alive[chosen], parent[chosen]
        self.found = _finish(self.found, candidates, total, ends, length + 1, n, params)
        self.length = length + 1
        improvable = _can_improve(self.scores, self.found, self.length, n, self.max_len, params)
        stopped = bool(self.found.done.all()) and params.early_stopping is True
        self.done = not improvable or stopped or bool(ends.all())

    def best(self) -> list[Beam]:
        """The `num_return_sequences` best hypotheses, best first."""
        found, n = self.found, self.prompt_len
        return [Beam(found.sequences[i, n : found.lengths[i]].tolist(), float(found.scores[i]),
                     float(found.logprobs[i])) for i in range(self.params.num_return_sequences)]  # fmt: skip


def beam_search(
    step: Step, prompt: Sequence[int], params: BeamParams, device: torch.device | str = "cpu"
) -> list[Beam]:
    """The `num_return_sequences` best hypotheses for `prompt`, best first (see the module docstring)."""
    search = BeamSearch(prompt, params, device)
    while not search.done:
        search.advance(step(search.sequences, search.parents))
    return search.best()


def _finish(
    found: _Hypotheses, candidates: torch.Tensor, total: torch.Tensor, ends: torch.Tensor, length: int, n: int,
    params: BeamParams,
) -> _Hypotheses:  # fmt: skip
    """Merge the candidates among the best k that end (scored with the length penalty) into the kept hypotheses.

    (transformers also masks every candidate once the search may stop; a search of one prompt stops there.)"""
    k = params.num_beams
    new = ends & (torch.arange(len(total), device=total.device) < k)
    score = total / ((length - n) ** params.length_penalty) + (~new).float() * MASK
    merged = torch.cat((found.scores, score))
    chosen = merged.topk(k).indices
    lengths = torch.cat((found.lengths, torch.full_like(total, length, dtype=torch.long)))
    logprobs = torch.cat((found.logprobs, total))
    return _Hypotheses(torch.cat((found.sequences, candidates))[chosen], lengths[chosen], merged[chosen],
                       logprobs[chosen], torch.cat((found.done, new))[chosen])  # fmt: skip


def _can_improve(scores: torch.Tensor, found: _Hypotheses, length: int, n: int, max_len: int, params: BeamParams):
    """Whether the best running beam may still beat the worst kept hypothesis (transformers' heuristic)."""
    never = params.early_stopping == "never" and params.length_penalty > 0.0
    hypothetical = (max_len if never else length) - n
    best = scores[:1] / (hypothetical**params.length_penalty)
    worst = torch.where(found.done, found.scores.min(), MASK)
    return bool((best > worst).any())


def model_step(model: Transformer, rows: int, max_len: int) -> Step:
    """`model` as the step of a search over `rows` beams of at most `max_len` tokens, decoding one token per beam
    per step over a paged cache of one-token blocks (a beam's fork shares its parent's blocks)."""
    cache = PagedKVCache(rows * max_len, block_size=1)

    def fork(parents: list[int]) -> None:
        """The cache's rows become `parents`' (in that order), sharing their blocks."""
        old = cache.batch
        tables, lengths = [cache.tables[p] for p in parents], [cache.lengths[p] for p in parents]
        cache.add_rows(len(parents), block_tables=tables, lengths=lengths)
        cache.remove_rows(range(old))

    def step(sequences: torch.Tensor, parents: torch.Tensor | None) -> torch.Tensor:
        with torch.inference_mode():
            if parents is None:  # the prompt, the same in every row: prefill it once, share it
                cache.reset()
                logits = model(sequences[:1], cache=cache)[:, -1].expand(len(sequences), -1)
                fork([0] * len(sequences))
            else:
                fork(parents.tolist())
                logits = model(sequences[:, -1:], cache=cache)[:, -1]
            return torch.log_softmax(logits.float(), dim=-1)

    return step


def beam_generate(model: Transformer, prompt: Sequence[int], params: BeamParams) -> list[Beam]:
    """Beam search with `model` from the token ids `prompt` (checked as `generate` checks it); max_new_tokens is cut
    to the room the prompt leaves in the model's context."""
    config = model.config
    check_prompt(list(prompt), config.vocab_size, config.max_seq_len, from_text=False)
    params = replace(params, max_new_tokens=min(params.max_new_tokens, config.max_seq_len - len(prompt)))
    device = next(model.parameters()).device
    step = model_step(model, params.num_beams, len(prompt) + params.max_new_tokens)
    return beam_search(step, prompt, params, device)
