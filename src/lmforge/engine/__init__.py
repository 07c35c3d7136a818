"""The serving engine: paged KV cache blocks, continuous batching with chunked prefill, prefix caching,
preemption, per-request sampling; `LLM` (offline) and `AsyncLLM` (streaming), in vLLM's shape.

    from lmforge.engine import LLM, SamplingParams
    llm = LLM("path/to/model")
    out = llm.generate(["Hello", "The sky is"], SamplingParams(temperature=0, max_tokens=16))
    out[0].outputs[0].text

Files, in the order a request meets them: params.py (what a request asks, what it gets), sequence.py,
block_manager.py (blocks, prefix cache, copy-on-write), scheduler.py (who runs each step), runner.py (one
forward), engine.py (the step loop), llm.py (LLM), async_llm.py (AsyncLLM).
"""

from lmforge.engine.async_llm import AsyncLLM
from lmforge.engine.beam_search import BeamSearchParams
from lmforge.engine.llm import LLM
from lmforge.engine.params import CompletionOutput, EngineStats, RequestOutput, SamplingParams

__all__ = ["LLM", "AsyncLLM", "BeamSearchParams", "CompletionOutput", "EngineStats", "RequestOutput", "SamplingParams"]
