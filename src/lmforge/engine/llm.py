"""`LLM`: offline generation over the engine, in vLLM's shape.

    llm = LLM("path/to/model")          # or LLM(module, tokenizer)
    outs = llm.generate(["Hello", "The sky is"], SamplingParams(temperature=0, max_tokens=16))
    outs[0].outputs[0].text
    llm.chat([{"role": "user", "content": "Hi"}], params)      # the tokenizer's chat template
    llm.beam_search(["Hello"], BeamSearchParams(beam_width=4, max_tokens=16))[0].outputs[0].text

`generate` checks every prompt before it queues any, queues them all (they batch together: continuous batching
with chunked prefill), steps the engine until each is finished and returns one `RequestOutput` per prompt, in
order. A failure mid-way (NaN logits) aborts the prompts still running, so the pool is left free. `beam_search`
runs transformers' beam search over the same pool (`engine/beam_search.py`: the beams fork copy-on-write).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.engine.beam_search import BeamSearchParams, run_beam_search
from lmforge.engine.engine import Engine, Prompt, Request
from lmforge.engine.params import EngineStats, RequestOutput
from lmforge.infer import sampling
from lmforge.infer.sampling import GenerationInputError
from lmforge.io import load as loading
from lmforge.tokenizer.base import BaseTokenizer


class LLM:
    """Offline generation over the engine: `LLM(model_dir_or_module, tokenizer)`, then `generate` / `chat`.

    `engine_options` are `Engine`'s (max_num_seqs, max_model_len, block_size, num_blocks, max_num_batched_tokens,
    enable_prefix_caching, kv_cache_gib, swap_space_gib, speculative_config, compile), passed on unchanged; `dtype`
    casts the model's weights. A path loads as `lmforge.load` does (a GGUF file kept quantized unless a float
    `dtype` is given), its 4-bit layers on the int4 CPU kernel."""

    def __init__(
        self,
        model: str | Path | nn.Module,
        tokenizer: BaseTokenizer | None = None,
        *,
        dtype: torch.dtype | None = None,
        **engine_options: Any,
    ) -> None:
        if isinstance(model, str | Path):
            from lmforge.quant.weight_only import use_kernel

            model, found = loading.load_model(model, dtype)
            use_kernel(model)  # a quantized file's 4-bit layers on torch's int4 CPU kernel
            tokenizer = tokenizer or found
        elif dtype is not None:
            model = model.to(dtype)
        if tokenizer is None:
            raise GenerationInputError("tokenizer", "the model has no tokenizer files: pass tokenizer=")
        self.engine = Engine(model.eval(), tokenizer, **engine_options)
        self._ids = itertools.count()

    @property
    def model(self) -> nn.Module:
        return self.engine.model

    @property
    def tokenizer(self) -> BaseTokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: sampling.SamplingParams | Seq[sampling.SamplingParams] | None = None,
        use_tqdm: bool = False,
        adapter: str | Seq[str | None] | None = None,
    ) -> list[RequestOutput]:
        """One finished `RequestOutput` per prompt, in order; every prompt is checked before any is scheduled.
        `adapter`: the LoRA adapter (one of `adapters`; None: the base model) of every prompt, or one per prompt."""
        prompts, single = _prompt_list(prompts)
        each = _per_prompt(params, len(prompts), "params", "SamplingParams")
        adapters = _per_prompt(adapter, len(prompts), "adapter", "adapters")
        requests = [self._request(p, q, i, single, a)
                    for i, (p, q, a) in enumerate(zip(prompts, each, adapters, strict=True))]  # fmt: skip
        for request in requests:
            self.engine.add(request)
        return self._run(requests, use_tqdm)

    def beam_search(
        self, prompts: Prompt | Seq[Prompt], params: BeamSearchParams, use_tqdm: bool = False,
        adapter: str | None = None,
    ) -> list[RequestOutput]:  # fmt: skip
        """Beam search (vLLM's `LLM.beam_search`; transformers' `generate(num_beams=...)` results): one finished
        `RequestOutput` per prompt, in order, whose `outputs` are its hypotheses best first
        (`beam_search.BeamCompletionOutput`: text, token_ids, finish_reason, cumulative_logprob, score). Every
        prompt is checked first; all run batched through the engine's pool, which must be idle."""
        if not isinstance(params, BeamSearchParams):
            raise GenerationInputError("params", f"expected BeamSearchParams, got {type(params).__name__}")
        prompts, single = _prompt_list(prompts)
        requests = [self._request(p, None, i, single, adapter) for i, p in enumerate(prompts)]
        bar = _progress(len(requests), "beam search") if use_tqdm else None
        try:
            return run_beam_search(self.engine, requests, params, bar.update if bar else lambda: None)
        finally:
            if bar is not None:
                bar.close()

    def chat(
        self, messages: list[dict] | list[list[dict]], params: sampling.SamplingParams | None = None,
        adapter: str | None = None,
    ) -> list[RequestOutput]:  # fmt: skip
        """`generate` over conversations rendered with the tokenizer's chat template (a generation prompt added)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        render = self.tokenizer.apply_chat_template
        prompts = [render(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        return self.generate(prompts, params, adapter=adapter)

    @property
    def adapters(self) -> list[str]:
        """The LoRA adapters a request may name (`finetune.multi_lora.stack_adapters`)."""
        return list(self.engine.adapters)

    def _request(
        self, prompt: Prompt, params: sampling.SamplingParams | None, i: int, single: bool, adapter: str | None
    ) -> Request:
        try:
            return self.engine.make_request(f"llm-{next(self._ids)}", prompt, params, adapter)
        except GenerationInputError as error:
            if single or error.name != "prompt":
                raise
            raise GenerationInputError(f"prompts[{i}]", error.rule) from None

    def _run(self, requests: list[Request], use_tqdm: bool) -> list[RequestOutput]:
        """Step until every request of `requests` is finished; on a failure abort those still running."""
        pending = {r.request_id for r in requests}
        final: dict[str, RequestOutput] = {}
        bar = _progress(len(requests)) if use_tqdm else None
        try:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        final[out.request_id] = out
                        pending.discard(out.request_id)
                        if bar is not None:
                            bar.update()
        except BaseException:
            for request_id in pending:
                self.engine.abort(request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [final[r.request_id] for r in requests]


def _per_prompt(value: Any, n: int, name: str, what: str) -> list[Any]:
    """`value` for each of n prompts: a list or tuple gives one each (it must hold n), anything else is shared."""
    each = list(value) if isinstance(value, list | tuple) else [value] * n
    if len(each) != n:
        raise GenerationInputError(name, f"has {len(each)} {what} for {n} prompts")
    return each


def _prompt_list(prompts: Prompt | Seq[Prompt]) -> tuple[list[Prompt], bool]:
    """(the prompts as a list, whether one prompt was given rather than a list); refuses an empty list."""
    single = isinstance(prompts, str) or (len(prompts) > 0 and not isinstance(prompts[0], str | Seq))
    prompts = [prompts] if single else list(prompts)
    if not prompts:
        raise GenerationInputError("prompts", "expected a prompt or a non-empty list of prompts")
    return prompts, single


def _progress(total: int, desc: str = "generate"):
    from tqdm import tqdm  # lazy: only for use_tqdm

    return tqdm(total=total, desc=desc)
