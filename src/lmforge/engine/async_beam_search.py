"""Beam search over a running `AsyncLLM`, as vLLM's frontend does it (`EngineClient.beam_search`): the search runs
in the caller's event loop and every step is ordinary engine requests, so it shares the engine with every other
request in flight (the offline `engine.beam_search` needs an idle engine).

The search is `infer.beam.BeamSearch` (transformers' `generate(num_beams=k, do_sample=False)`). One step, for the
search's rows `sequences` (k rows; at the first step k copies of the prompt):

    submit   one engine request per distinct row: prompt = the row's ids (prompt + the beam's tokens), max_tokens 1,
             ignore_eos (an eos is a candidate like any token), logprobs K of logits / T (`scaled_logprobs` at the
             search's temperature T; the token it samples is not used); all at once through
             `AsyncLLM.generate`, so they batch with each other and with other requests, and prefix caching finds
             the row's full blocks computed by the step before: only the tokens past them are fed
    rank     the (k, V) log-probabilities: each row's top K from its request (the log softmax of the model's
             logits, over T when T > 0), -inf elsewhere; `BeamSearch.advance` picks the next beams
    stop     when `BeamSearch.done`; its hypotheses, best first, become the `RequestOutput` `LLM.beam_search` gives

K = `BeamSearch.keep` = max(2, 1 + #eos) * k is how many candidates a step keeps, and the K best candidates of the
whole step are among the top K of the rows they extend, so the sparse rows rank exactly as the full ones: the
search is the offline one, step for step, temperature included. The engine gives at most `MAX_LOGPROBS` = 20
log-probabilities per token, so K must fit: k <= 10 with one eos token.

If the search fails or is cancelled (its client went away), every engine request of the step in flight is aborted
(shielded from the cancellation), so the engine frees its blocks. `beam_search_prompts` runs one search per prompt,
all concurrently, and cancels the others when one fails.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Sequence
from typing import Any

import anyio
import torch

from lmforge.engine.async_llm import AsyncLLM
from lmforge.engine.beam_search import BeamSearchParams, prompt_search_params, search_output
from lmforge.engine.engine import Prompt
from lmforge.engine.params import MAX_LOGPROBS, RequestOutput, SamplingParams
from lmforge.infer.beam import BeamSearch
from lmforge.infer.generate import encode_prompt
from lmforge.infer.sampling import GenerationInputError
from lmforge.tokenizer.base import BaseTokenizer

__all__ = ["beam_search", "beam_search_prompts"]


async def beam_search(
    engine: AsyncLLM, prompt: Prompt, params: BeamSearchParams, request_id: str, *,
    tokenizer: BaseTokenizer | None = None, max_model_len: int | None = None, adapter: str | None = None,
) -> RequestOutput:  # fmt: skip
    """Beam search for `prompt` (text or token ids) over `engine` (an `AsyncLLM`, or anything with its `generate`
    and `abort`): the finished `RequestOutput` whose outputs are the hypotheses best first, as `LLM.beam_search`
    returns them. `tokenizer` and `max_model_len` default to the engine's; `adapter` names the LoRA adapter the
    steps run with. The step requests are named `{request_id}-{step}-{row}`. A prompt or width the engine cannot
    serve raises `GenerationInputError` before any token is generated."""
    if adapter is not None:
        engine = _WithAdapter(engine, adapter)
    tokenizer = engine.llm.tokenizer if tokenizer is None else tokenizer
    max_model_len = engine.llm.max_model_len if max_model_len is None else max_model_len
    ids = encode_prompt(tokenizer, prompt)
    _within_int64("prompt", ids)  # the engine checks the vocabulary at the first step; a tensor needs this first
    _within_int64("stop_token_ids", params.stop_token_ids)
    search = BeamSearch(ids, prompt_search_params(params, tokenizer, len(ids), max_model_len))
    if search.keep > MAX_LOGPROBS:
        raise GenerationInputError("beam_width", f"needs the top {search.keep} log-probabilities of each beam a step "
                                   f"(max(2, 1 + eos tokens) * beam_width); the engine gives at most {MAX_LOGPROBS}",
                                   params.beam_width)  # fmt: skip
    step_params = SamplingParams(max_tokens=1, temperature=params.temperature, ignore_eos=True, logprobs=search.keep,
                                 scaled_logprobs=True)  # ranked as `engine.beam_search` ranks: logits / T
    step = 0
    while not search.done:
        rows = search.sequences.tolist()
        search.advance(await _step_logprobs(engine, rows, step_params, f"{request_id}-{step}", tokenizer.vocab_size))
        step += 1
    return search_output(request_id, prompt if isinstance(prompt, str) else None, ids, search, tokenizer)


class _WithAdapter:
    """`engine` whose requests run with LoRA adapter `adapter`."""

    def __init__(self, engine: AsyncLLM, adapter: str) -> None:
        self.engine, self.adapter, self.llm = engine, adapter, engine.llm

    def generate(self, prompt: Prompt, params: SamplingParams, request_id: str):
        return self.engine.generate(prompt, params, request_id, adapter=self.adapter)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)


def _within_int64(name: str, ids: Sequence[int]) -> None:
    bad = next((i for i in ids if not -(2**63) <= i < 2**63), None)
    if bad is not None:
        raise GenerationInputError(name, f"holds the id {bad}, beyond any vocabulary (token ids are 64-bit)")


async def beam_search_prompts(
    engine: AsyncLLM, prompts: Sequence[Prompt], params: BeamSearchParams, request_id: str, **options: Any
) -> list[RequestOutput]:
    """`beam_search` for every prompt, all concurrently (search i named `{request_id}-{i}`), in order; `options`
    are `beam_search`'s. One that fails cancels the others (their step requests aborted) and raises."""
    return await gather_or_cancel([beam_search(engine, p, params, f"{request_id}-{i}", **options)
                                   for i, p in enumerate(prompts)])  # fmt: skip


async def gather_or_cancel(work: Sequence[Awaitable[Any]]) -> list[Any]:
    """The results of `work`, run concurrently, in order. If one fails or the caller is cancelled, the others are
    cancelled and awaited (shielded: their own cleanup runs to its end) before the error propagates."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        with anyio.CancelScope(shield=True):
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _step_logprobs(
    engine: AsyncLLM, rows: list[list[int]], params: SamplingParams, prefix: str, vocab: int
) -> torch.Tensor:
    """(len(rows), vocab) next-token log-probabilities of `rows`: each distinct row's top `params.logprobs` from one
    engine request (`{prefix}-{i}`), -inf elsewhere."""
    distinct = list(dict.fromkeys(map(tuple, rows)))
    entries = await _requests(engine, [list(row) for row in distinct], params, prefix)
    dense = torch.full((len(distinct), vocab), float("-inf"))
    for row, entry in zip(dense, entries, strict=True):
        known = [(token, lp) for token, lp in entry.items() if 0 <= token < vocab and math.isfinite(lp)]
        row[[token for token, _ in known]] = torch.tensor([lp for _, lp in known])
    where = {row: i for i, row in enumerate(distinct)}
    return dense[[where[tuple(row)] for row in rows]]


async def _requests(
    engine: AsyncLLM, prompts: list[list[int]], params: SamplingParams, prefix: str
) -> list[dict[int, float]]:
    """One engine request per prompt (`{prefix}-{i}`), all at once: the top log-probabilities of each one's next
    token. Those still running when one fails or the caller is cancelled are aborted (shielded)."""
    ids = [f"{prefix}-{i}" for i in range(len(prompts))]
    finished: set[str] = set()
    try:
        return await gather_or_cancel([_top_logprobs(engine, prompt, params, request_id, finished)
                                       for prompt, request_id in zip(prompts, ids, strict=True)])  # fmt: skip
    finally:
        with anyio.CancelScope(shield=True):
            for request_id in ids:
                if request_id not in finished:
                    await engine.abort(request_id)


async def _top_logprobs(
    engine: AsyncLLM, prompt: list[int], params: SamplingParams, request_id: str, finished: set[str]
) -> dict[int, float]:
    """The top log-probabilities of the token after `prompt` (one engine request, added to `finished` once done)."""
    final = None
    async for output in engine.generate(prompt, params, request_id):
        final = output
    finished.add(request_id)
    sample = final.outputs[0] if final is not None else None
    if sample is None or sample.finish_reason == "abort" or not sample.logprobs:
        raise RuntimeError(f"beam search step request {request_id} was aborted by the engine (shutting down?)")
    return sample.logprobs[0]
