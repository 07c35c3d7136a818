"""A deterministic stand-in for `lmforge.engine.AsyncLLM`, for testing the HTTP server without a model.

It has AsyncLLM's interface (generate, abort, stats, shutdown) and its data (the engine's `SamplingParams`,
`RequestOutput`, `CompletionOutput`, `EngineStats`), and a rule simple enough for a test to predict every answer:

    sample j of a prompt emits the prompt's ordinary (byte) tokens cyclically, starting at the j-th of them

A prompt is checked as the real engine checks it (`infer.generate.check_prompt`: not empty, shorter than
max_model_len, ids in the vocabulary), and must hold an ordinary token. It emits one token per step, after `delay`
seconds, each yield carrying the cumulative text and ids. It honours max_tokens
(cut to the context), stop strings (the text ends before the first one, finish "stop") and stop_token_ids, and
reports logprobs: the sampled token -ln 2, then the next ids (t+1, t+2, ... mod 256) at -ln 2 - 1, -ln 2 - 2, ...

Engine-side state lives in `active` until a request finishes or is aborted; a consumer that merely stops iterating
leaves it there (as it would hold blocks in the real engine), which is how a test sees a missing `abort`.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from lmforge.engine.params import CompletionOutput, EngineStats, RequestOutput, SamplingParams
from lmforge.infer.generate import check_prompt
from lmforge.infer.sampling import GenerationInputError
from lmforge.tokenizer.bpe import Tokenizer
from lmforge.tokenizer.pretokenize import GPT2_PATTERN

LN2 = math.log(2)


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges (ids 0-255 are bytes) and the ChatML specials, so lmforge's default chat
    template applies; eos is <|im_end|>."""
    tokenizer = Tokenizer({i: bytes([i]) for i in range(256)}, [], GPT2_PATTERN,
                          {"<|im_start|>": 256, "<|im_end|>": 257})  # fmt: skip
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer


def script(prompt_ids: list[int], sample: int, length: int) -> list[int]:
    """The tokens sample `sample` emits for a prompt (the rule in the module docstring)."""
    ordinary = [t for t in prompt_ids if t < 256]
    return [ordinary[(sample + i) % len(ordinary)] for i in range(length)]


def fake_logprobs(token: int, k: int) -> dict[int, float]:
    return {token: -LN2} | {(token + 1 + i) % 256: -LN2 - 1 - i for i in range(k)}


@dataclass
class FakeRequest:
    prompt_ids: list[int]
    params: SamplingParams
    outputs: list[CompletionOutput] = field(default_factory=list)
    aborted: bool = False


class FakeEngine:
    """AsyncLLM's interface over the rule above (module docstring)."""

    def __init__(self, tokenizer: Tokenizer, *, delay: float = 0.0, max_model_len: int = 128,
                 block_size: int = 4) -> None:  # fmt: skip
        self.tokenizer, self.delay, self.max_model_len, self.block_size = tokenizer, delay, max_model_len, block_size
        self.active: dict[str, FakeRequest] = {}
        self.requests: dict[str, FakeRequest] = {}  # every request ever submitted, in order
        self.aborted: list[str] = []
        self.prompt_tokens = self.generated_tokens = 0
        self.shut_down = False

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str):
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_prompt(ids, self.tokenizer.vocab_size, self.max_model_len, from_text=isinstance(prompt, str))
        if not any(t < 256 for t in ids):
            raise GenerationInputError("prompt", "must hold at least one ordinary token")
        assert request_id not in self.requests, f"request id {request_id} used twice"
        request = FakeRequest(ids, params)
        request.outputs = [CompletionOutput(j, "", [], None, [] if params.logprobs is not None else None)
                           for j in range(params.n)]  # fmt: skip
        self.requests[request_id] = self.active[request_id] = request
        self.prompt_tokens += len(ids)
        max_tokens = min(params.max_tokens, self.max_model_len - len(ids))
        while True:
            await asyncio.sleep(self.delay)
            if request.aborted:
                for o in request.outputs:
                    o.finish_reason = o.finish_reason or "abort"
                yield self._snapshot(request_id, request, finished=True)
                return
            for j, o in enumerate(request.outputs):
                if o.finish_reason is None:
                    self._step(request, j, o, max_tokens)
            finished = all(o.finish_reason is not None for o in request.outputs)
            if finished:
                del self.active[request_id]
            yield self._snapshot(request_id, request, finished)
            if finished:
                return

    def _step(self, request: FakeRequest, j: int, o: CompletionOutput, max_tokens: int) -> None:
        token = script(request.prompt_ids, j, len(o.token_ids) + 1)[-1]
        o.token_ids.append(token)
        self.generated_tokens += 1
        if o.logprobs is not None:
            o.logprobs.append(fake_logprobs(token, request.params.logprobs))
        if token in request.params.stop_token_ids:
            o.finish_reason = "stop"
            return
        o.text = self.tokenizer.decode(o.token_ids)
        hits = [o.text.index(s) for s in request.params.stop if s in o.text]
        if hits:
            o.text, o.finish_reason = o.text[: min(hits)], "stop"
        elif len(o.token_ids) >= max_tokens:
            o.finish_reason = "length"

    def _snapshot(self, request_id: str, request: FakeRequest, finished: bool) -> RequestOutput:
        outputs = [CompletionOutput(o.index, o.text, list(o.token_ids), o.finish_reason,
                                    None if o.logprobs is None else list(o.logprobs))
                   for o in request.outputs]  # fmt: skip
        return RequestOutput(request_id, None, list(request.prompt_ids), outputs, finished)

    async def abort(self, request_id: str) -> None:
        if (request := self.active.pop(request_id, None)) is not None:
            request.aborted = True
            self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        used = sum(-(-(len(r.prompt_ids) + len(o.token_ids)) // self.block_size)
                   for r in self.active.values() for o in r.outputs)  # fmt: skip
        return EngineStats(running=len(self.active), waiting=0, blocks_used=used, blocks_free=1000 - used,
                           prefix_cache_hit_rate=0.25, prompt_tokens=self.prompt_tokens,
                           generated_tokens=self.generated_tokens, draft_tokens=7 * self.generated_tokens,
                           accepted_draft_tokens=5 * self.generated_tokens)  # fmt: skip

    def shutdown(self) -> None:
        """Abort every request in flight (as AsyncLLM.shutdown does)."""
        for request_id in list(self.active):
            self.active.pop(request_id).aborted = True
            self.aborted.append(request_id)
        self.shut_down = True
