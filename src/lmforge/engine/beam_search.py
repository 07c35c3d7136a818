"""Beam search through the engine: every beam is an engine `Sequence` in the engine's block pool, and each step is
one `ModelRunner.run` forward over the live beams of every prompt at once, so no prefix is ever recomputed.

The search itself is `infer.beam.BeamSearch` (transformers' `generate(num_beams=k, do_sample=False)`: candidates,
length penalty, early stopping); this file runs its steps on the engine's objects:

    admit    a prompt's search starts when its worst case fits beside the running ones: k more rows within
             max_num_seqs, and F + k * (B - F) blocks free, F = the prompt's full blocks (shared by every beam,
             never written), B = the blocks of the longest beam it feeds (prompt + max_tokens - 1 tokens). The
             prompt is one sequence, allocated by `BlockManager.allocate` (prefix-cache hits are not recomputed)
    prefill  its uncomputed prompt tokens go to the forwards in chunks, within max_num_batched_tokens left over by
             the decoding beams; the chunk that reaches the last token gives the logits of step 1, the same for
             all k rows (the search starts as k copies of the prompt, only the first one scored)
    step     every decoding beam feeds its one new token; the rows' logits -> log-softmax (of logits / T when
             temperature T > 0; ids past the tokenizer's vocabulary masked) -> `BeamSearch.advance`
    fork     new beam i continues row parents[i]: `BlockManager.fork` gives it the parent's table (every block
             shared, reference count + 1) and it appends its token; the old beams are freed, then
             `BlockManager.grow` gives each new beam room for its token, copying the partly filled last block it
             still shares (copy-on-write: the copies are made before the next forward)
    finish   a search that stopped frees its beams; its hypotheses, best first, become its `RequestOutput`

Peak memory of one search is thus the shared prompt plus k diverging tails, not k prompts. The engine must be idle
(no scheduled request: the offline `LLM` is synchronous, so only requests added to its engine by hand can be in
flight); the pool is fully free afterwards, also when a step fails (the search's beams are freed).

Outputs are `engine.params.RequestOutput`s (what `LLM.generate` returns and vLLM's server streams for beam search),
one per prompt, whose `outputs` are the hypotheses best first as `BeamCompletionOutput`s: `token_ids` the
generated tokens (ending with the eos when one ended it), `text` their text (an ending eos not shown, as
`generate` shows no stop token), `finish_reason` "stop" (an eos) or "length", `cumulative_logprob` the sum of the
tokens' log-probabilities and `score` = cumulative_logprob / len(token_ids) ** length_penalty (transformers'
`sequences_scores`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from lmforge.configfile import check, check_finite, check_positive, is_int
from lmforge.engine.block_manager import BlockManager
from lmforge.engine.engine import Engine, Request
from lmforge.engine.params import CompletionOutput, RequestOutput
from lmforge.engine.scheduler import ScheduledBatch
from lmforge.engine.sequence import Sequence
from lmforge.infer.beam import Beam, BeamParams, BeamSearch
from lmforge.infer.decode import NonFiniteLogitsError
from lmforge.infer.generate import stop_token_ids
from lmforge.infer.sampling import GenerationInputError
from lmforge.tokenizer.base import BaseTokenizer

__all__ = ["BeamCompletionOutput", "BeamSearchParams", "prompt_search_params", "run_beam_search", "search_output"]


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's `BeamSearchParams` (beam_width, max_tokens, ignore_eos, temperature, length_penalty) plus what
    transformers' beam search offers: early_stopping (True, False or "never"), num_return_sequences (None: every
    beam, as vLLM returns) and stop_token_ids (tokens that end a beam besides the tokenizer's eos and eot, which
    `ignore_eos` leaves out). temperature 0 ranks beams by the model's log-probabilities, T > 0 by those of
    logits / T."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int | None = None
    stop_token_ids: Seq[int] = ()

    def __post_init__(self) -> None:
        check_positive("beam_width", self.beam_width)
        check_positive("max_tokens", self.max_tokens)
        check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "must be true or false")
        check_finite("temperature", self.temperature, at_least=0.0)
        returns = self.num_return_sequences
        check(returns is None or (is_int(returns) and 1 <= returns <= self.beam_width), "num_return_sequences",
              returns, f"must be None or an integer in [1, beam_width ({self.beam_width})]")  # fmt: skip
        ids = self.stop_token_ids
        check(isinstance(ids, list | tuple) and all(is_int(i) and i >= 0 for i in ids), "stop_token_ids", ids,
              "must be a list of token ids (integers >= 0)")  # fmt: skip
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        BeamParams(length_penalty=self.length_penalty, early_stopping=self.early_stopping)  # their own checks

    def search_params(self, eos_ids: set[int], max_new_tokens: int) -> BeamParams:
        """infer.beam's parameters for one prompt: `eos_ids` end a beam, at most `max_new_tokens` are generated."""
        return BeamParams(self.beam_width, max_new_tokens, self.length_penalty, self.early_stopping,
                          self.num_return_sequences or self.beam_width, tuple(sorted(eos_ids)))  # fmt: skip


@dataclass
class BeamCompletionOutput(CompletionOutput):
    """One hypothesis: a `CompletionOutput` plus its `score` (the cumulative log-probability over the length
    penalty, by which hypotheses are ranked)."""

    score: float = 0.0


@dataclass(eq=False)
class _Search:
    """One prompt's search: `beams[i]` is the engine sequence of row i of `search.sequences` (while the prompt is
    prefilled, its one sequence); `reserved` the blocks set aside for its worst case."""

    request: Request
    search: BeamSearch
    beams: list[Sequence]
    reserved: int

    @property
    def prefilling(self) -> bool:
        return self.search.parents is None


@dataclass
class _Run:
    """A beam search over `engine`'s pool (see the module docstring)."""

    engine: Engine
    params: BeamSearchParams
    waiting: deque[_Search] = field(default_factory=deque)
    live: list[_Search] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write copies for the next forward

    @property
    def blocks(self) -> BlockManager:
        return self.engine.blocks

    def search_of(self, request: Request) -> _Search:
        """The (not yet started) search of `request`; refuse one whose worst case the pool cannot hold."""
        n, k, blocks = len(request.prompt_ids), self.params.beam_width, self.blocks
        params = prompt_search_params(self.params, self.engine.tokenizer, n, self.engine.max_model_len)
        full = n // blocks.block_size
        worst = full + k * (blocks.blocks_for(n + params.max_new_tokens - 1) - full)
        if worst > blocks.num_blocks:
            raise GenerationInputError("beam_width", f"{k} beams of up to {n + params.max_new_tokens - 1} tokens "
                                       f"may need {worst} blocks; the pool holds {blocks.num_blocks}", k)  # fmt: skip
        seq = Sequence(list(request.prompt_ids), n, request_id=request.request_id, adapter=request.adapter)
        return _Search(request, BeamSearch(request.prompt_ids, params, self.engine.runner.device), [seq], worst)

    @torch.inference_mode()
    def run(self, on_finish: Callable[[], None]) -> dict[str, RequestOutput]:
        """Step until every search is done; free every live beam whatever happens."""
        results = {}
        try:
            while self.waiting or self.live:
                self.admit()
                self.step()
                for s in [s for s in self.live if s.search.done]:
                    self.free(s)
                    self.live.remove(s)
                    results[s.request.request_id] = self.output(s)
                    on_finish()
        finally:
            for s in self.live:
                self.free(s)
        return results

    def admit(self) -> None:
        """Start waiting searches, oldest first, while their worst case fits beside the live ones."""
        k = self.params.beam_width
        while self.waiting:
            s = self.waiting[0]
            rows = k * (len(self.live) + 1)
            if self.live and (rows > self.engine.max_num_seqs or
                              sum(r.reserved for r in self.live) + s.reserved > self.blocks.num_blocks):  # fmt: skip
                return
            self.waiting.popleft()
            self.blocks.allocate(s.beams[0])  # the pool is idle but for the live searches' reservations
            self.live.append(s)

    def step(self) -> None:
        """One forward: every decoding beam's new token, then prefill chunks within the token budget left."""
        budget = self.engine.scheduler.max_num_batched_tokens
        budget -= sum(len(s.beams) for s in self.live if not s.prefilling)
        rows: list[tuple[Sequence, int]] = []
        fed: list[tuple[_Search, int]] = []  # each search with logits this step, and its rows of them
        for s in self.live:
            if not s.prefilling:
                rows += [(seq, 1) for seq in s.beams]
                fed.append((s, len(s.beams)))
            elif budget > 0:
                seq = s.beams[0]
                n = min(seq.remaining, budget)
                budget -= n
                rows.append((seq, n))
                if n == seq.remaining:
                    fed.append((s, 1))
        logits = self.engine.runner.run(ScheduledBatch(rows, self.copies))
        self.copies = []
        for seq, n in rows:
            self.blocks.computed(seq, seq.num_computed + n)
        start = 0
        for s, n in fed:
            logp = self.logprobs(logits[start : start + n])
            start += n
            s.search.advance(logp.expand(self.params.beam_width, -1))  # a prompt's one row: the k start rows
            if not s.search.done:
                self.fork(s)

    def logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """The (R, V) log-probabilities beams are ranked by (see `BeamSearchParams`)."""
        if not bool(logits.isfinite().all()):
            raise NonFiniteLogitsError("the model's logits are NaN or inf during beam search: its weights or "
                                       "activations overflow (float32 may help)")  # fmt: skip
        known = self.engine.tokenizer.vocab_size
        logits[..., known:] = float("-inf")  # ids past the tokenizer's vocabulary (a padded embedding)
        if self.params.temperature > 0:
            logits = logits / self.params.temperature
        return logits.log_softmax(-1)

    def fork(self, s: _Search) -> None:
        """The new running beams of `s`: each forks its parent row's sequence and takes its token; the old beams
        are freed, then each new one grows room for its token (copy-on-write of a still shared last block)."""
        old, tokens = s.beams, s.search.sequences.tolist()
        parents = s.search.parents.tolist()
        rows = old if len(old) == len(parents) else old * len(parents)  # the prompt's sequence serves every row
        s.beams = []
        for i, p in enumerate(parents):
            child = Sequence(tokens[i], s.search.prompt_len, request_id=s.request.request_id, index=i,
                             adapter=s.request.adapter)  # fmt: skip
            self.blocks.fork(rows[p], child)
            s.beams.append(child)
        for seq in dict.fromkeys(old):
            self.blocks.free(seq)
        for child in s.beams:
            self.copies += self.blocks.grow(child, len(child.tokens))

    def free(self, s: _Search) -> None:
        for seq in dict.fromkeys(s.beams):
            self.blocks.free(seq)

    def output(self, s: _Search) -> RequestOutput:
        request = s.request
        return search_output(request.request_id, request.prompt, request.prompt_ids, s.search, self.engine.tokenizer)


def prompt_search_params(
    params: BeamSearchParams, tokenizer: BaseTokenizer, prompt_len: int, max_model_len: int
) -> BeamParams:
    """infer.beam's parameters for a prompt of `prompt_len` tokens: stop_token_ids, and the tokenizer's eos and eot
    unless ignore_eos, end a beam; max_tokens is cut to the room the prompt leaves in `max_model_len` (at least one
    token: a prompt that leaves none is refused before the search steps)."""
    eos = stop_token_ids(tokenizer, params.stop_token_ids, params.ignore_eos)
    return params.search_params(eos, min(params.max_tokens, max(1, max_model_len - prompt_len)))


def search_output(
    request_id: str, prompt: str | None, prompt_ids: Seq[int], search: BeamSearch, tokenizer: BaseTokenizer
) -> RequestOutput:
    """The finished `RequestOutput` of a stopped `search`: its hypotheses best first (see the module docstring)."""
    eos = search.params.eos_token_ids
    outputs = [_completion(i, beam, eos, tokenizer) for i, beam in enumerate(search.best())]
    return RequestOutput(request_id, prompt, list(prompt_ids), outputs, True)


def _completion(index: int, beam: Beam, eos: tuple[int, ...], tokenizer: BaseTokenizer) -> BeamCompletionOutput:
    stopped = bool(beam.tokens) and beam.tokens[-1] in eos
    text = tokenizer.decode(beam.tokens[:-1] if stopped else beam.tokens)
    return BeamCompletionOutput(index, text, beam.tokens, "stop" if stopped else "length", None, beam.logprob,
                                beam.score)  # fmt: skip


def run_beam_search(
    engine: Engine, requests: Seq[Request], params: BeamSearchParams, on_finish: Callable[[], None] = lambda: None
) -> list[RequestOutput]:
    """Beam search for every request (checked by `Engine.make_request`) over `engine`'s pool, all prompts batched;
    one finished `RequestOutput` per request, in order. `on_finish` is called as each one finishes."""
    if engine.has_unfinished() or engine.scheduler.has_work():
        raise RuntimeError(f"beam search runs only while the engine is idle: {len(engine.requests)} requests are "
                           "in flight (finish or abort them first)")  # fmt: skip
    if engine.lead:
        raise GenerationInputError("use_beam_search", "beam search of a prompt- or prefix-tuned model is not "
                                   "supported; sample instead")  # fmt: skip
    k = params.beam_width
    if k > engine.max_num_seqs:
        raise GenerationInputError("beam_width", f"must be at most max_num_seqs ({engine.max_num_seqs})", k)
    run = _Run(engine, params)
    run.waiting.extend(run.search_of(r) for r in requests)
    results = run.run(on_finish)
    return [results[r.request_id] for r in requests]
