"""The engine against the one-at-a-time oracle, `infer.generate.generate`, on a tiny random Llama: greedy and
seeded outputs for 16 prompts of different lengths, with chunked prefill, prefix caching and preemption (by
recompute, and by swap to host memory: nothing recomputed); n > 1
(forked samples, copy-on-write) and best_of; logprobs against a plain forward; stop rules; input errors raised
before scheduling; AsyncLLM streaming and abort. After every test the pool is fully free."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.config import MLAConfig
from lmforge.configfile import ConfigError
from lmforge.engine import LLM, AsyncLLM, SamplingParams
from lmforge.engine.scheduler import Scheduler
from lmforge.engine.swap import HostPools
from lmforge.infer.decode import NonFiniteLogitsError
from lmforge.infer.generate import generate
from lmforge.infer.paged_cache import BlockTableCache
from lmforge.infer.sampling import GenerationInputError, SamplingParamsError
from lmforge.tokenizer import train_bpe

TEXTS = ["the quick brown fox jumps over the lazy dog. " * 3, "to be or not to be, that is the question"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.2, max_tokens=10, seed=5,
                        ignore_eos=True)  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    t = train_bpe(texts=TEXTS, vocab_size=300, special_tokens=["<|endoftext|>"], progress=False)
    t.eos_token = "<|endoftext|>"
    return t


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                      max_seq_len=96)  # fmt: skip
    m = Transformer(cfg).eval()
    with torch.no_grad():  # peaked next-token distributions (far from ties)
        for name, p in m.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 40, (16,), generator=g).tolist()
    return [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]


def alone(model, tok, prompts, params):
    """The oracle: each prompt through `generate` on its own."""
    return [[e.token_id for e in generate(model, tok, p, params)] for p in prompts]


def assert_pool_free(llm: LLM) -> None:
    engine = llm.engine
    assert engine.requests == {} and not engine.scheduler.has_work()
    assert engine.blocks.free_blocks == engine.blocks.num_blocks
    assert all(b.refs == 0 for b in engine.blocks.blocks) and llm.stats().blocks_used == 0
    host = engine.scheduler.host
    assert llm.stats().swapped == 0 and (host is None or host.free_blocks == host.num_blocks)


@pytest.fixture
def spy(monkeypatch):
    """Counts preemptions, blocks swapped out and in, block copies and the real tokens of each forward (the mask
    the model is given)."""
    seen = {"preempted": 0, "copies": 0, "forwards": [], "swap_out": 0, "swap_in": 0}
    preempt, copy_blocks, hidden = Scheduler.preempt, BlockTableCache.copy_blocks, Transformer.hidden_states

    def counting_preempt(self, seq):
        seen["preempted"] += 1
        return preempt(self, seq)

    def counting(way):
        swap = getattr(HostPools, way)

        def counting_swaps(self, pools, pairs):
            seen[way] += len(pairs)
            swap(self, pools, pairs)

        return counting_swaps

    for way in ("swap_out", "swap_in"):
        monkeypatch.setattr(HostPools, way, counting(way))

    def counting_copies(self, pairs):
        seen["copies"] += len(pairs)
        copy_blocks(self, pairs)

    def counting_hidden(self, ids, attention_mask=None, *args, **kwargs):
        seen["forwards"].append(ids.numel() if attention_mask is None else int(attention_mask.sum()))
        return hidden(self, ids, attention_mask, *args, **kwargs)

    monkeypatch.setattr(Scheduler, "preempt", counting_preempt)
    monkeypatch.setattr(BlockTableCache, "copy_blocks", counting_copies)
    monkeypatch.setattr(Transformer, "hidden_states", counting_hidden)
    return seen


SETUPS = {
    "one-step-prefill": dict(),
    "chunked-prefill": dict(max_num_batched_tokens=16),
    "no-prefix-cache": dict(max_num_batched_tokens=16, enable_prefix_caching=False),
    "preemption": dict(num_blocks=14, block_size=4, max_model_len=52, swap_space_gib=0),  # 16 prompts: ~70 blocks
    "swap": dict(num_blocks=14, block_size=4, max_model_len=52),  # preempted ones swap to host memory (the default)
}


@pytest.mark.parametrize("setup", SETUPS)
def test_greedy_outputs_equal_generate_alone(model, tok, prompts, spy, setup):
    expected = alone(model, tok, prompts, GREEDY)
    spy["forwards"].clear()
    llm = LLM(model, tok, **SETUPS[setup])
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert [o.prompt_token_ids for o in outs] == prompts and all(o.finished for o in outs)
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert max(spy["forwards"]) <= llm.engine.scheduler.max_num_batched_tokens
    if setup == "chunked-prefill":
        assert len(spy["forwards"]) > 12  # the prompts' 300-odd tokens took several 16-token steps
    assert (spy["preempted"] > 0) == (setup in ("preemption", "swap"))
    assert (spy["swap_out"] > 0) == (setup == "swap") and spy["swap_in"] == spy["swap_out"]
    assert_pool_free(llm)


@pytest.mark.parametrize("setup", ["preemption", "swap"])
def test_seeded_sampling_equals_generate_with_the_same_seed_even_when_preempted(model, tok, prompts, spy, setup):
    expected = alone(model, tok, prompts, SEEDED)
    llm = LLM(model, tok, **SETUPS[setup])
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, SEEDED)] == expected
    assert spy["preempted"] > 0 and (spy["swap_out"] > 0) == (setup == "swap")
    assert_pool_free(llm)


def test_swapped_sequences_resume_without_recomputing_and_aborts_free_host_blocks(model, tok, prompts, spy):
    expected = alone(model, tok, prompts, GREEDY)
    recompute, swap = (LLM(model, tok, **SETUPS[setup]) for setup in ("preemption", "swap"))
    recompute.generate(prompts, GREEDY)
    spy["preempted"] = 0
    assert [o.outputs[0].token_ids for o in swap.generate(prompts, GREEDY)] == expected
    computed = [llm.engine.runner.tokens_computed for llm in (recompute, swap)]
    once = sum(len(p) + GREEDY.max_tokens - 1 for p in prompts)  # every token fed once
    # recompute feeds the victims' tokens again; swap only those of a victim with under a block (4) computed
    assert once <= computed[1] < once + 4 * spy["preempted"] and computed[1] < computed[0]
    assert_pool_free(swap)
    engine = swap.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, GREEDY)
    while not engine.stats().swapped:
        engine.step()
    for i in range(len(prompts)):
        engine.abort(f"r{i}")
    assert_pool_free(swap)


def test_a_shared_prefix_is_computed_once(model, tok, spy):
    system = list(range(10, 50))  # 40 tokens: 2 full blocks of 16 are shared
    first, second = [*system, 60, 61, 62], [*system, 70, 71]
    llm = LLM(model, tok)
    params = dataclasses.replace(GREEDY, max_tokens=4)
    llm.generate([first], params)
    spy["forwards"].clear()
    out = llm.generate([second], params)
    assert spy["forwards"] == [len(second) - 32, 1, 1, 1]  # the new tokens, then three decode steps
    assert out[0].outputs[0].token_ids == alone(model, tok, [second], params)[0]
    assert llm.stats().prefix_cache_hit_rate == pytest.approx(32 / (len(first) + len(second)))
    assert_pool_free(llm)


def test_n_samples_fork_the_prompt_and_each_equals_generate_with_its_seed(model, tok, prompts, spy):
    params = dataclasses.replace(SEEDED, n=3, max_tokens=6)
    some = prompts[:4]
    assert any(len(p) % 16 for p in some)  # a partly filled last block is shared: copy-on-write
    expected = [alone(model, tok, some, dataclasses.replace(params, seed=params.seed + k)) for k in range(3)]
    spy["forwards"].clear()
    llm = LLM(model, tok)
    outs = llm.generate(some, params)
    assert sum(spy["forwards"]) == sum(map(len, some)) + 3 * 4 * (6 - 1)  # each prompt computed once, then 3 rows
    assert spy["copies"] > 0
    for i, out in enumerate(outs):
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert [c.token_ids for c in out.outputs] == [expected[k][i] for k in range(3)]
    assert_pool_free(llm)


def test_best_of_returns_the_n_samples_of_highest_cumulative_logprob(model, tok, prompts):
    llm = LLM(model, tok)
    params = dataclasses.replace(SEEDED, max_tokens=5)
    every = llm.generate(prompts[:2], dataclasses.replace(params, n=4))
    best = llm.generate(prompts[:2], dataclasses.replace(params, n=2, best_of=4))
    picked = []
    for all_four, two in zip(every, best, strict=True):
        ranked = sorted(all_four.outputs, key=lambda c: -c.cumulative_logprob)[:2]
        assert [c.token_ids for c in two.outputs] == [c.token_ids for c in ranked]
        assert [c.index for c in two.outputs] == [0, 1]
        picked += [c.index for c in ranked]
    assert picked != [0, 1, 0, 1]  # not merely the first two samples
    assert_pool_free(llm)


def assert_logprobs_of_a_plain_forward(model, prompt: list[int], out, temperature: float = 1.0, top: int = 3) -> None:
    """`out`'s logprobs (top `top` + the sampled token) and cumulative logprob are the log softmax of a plain
    forward's logits / `temperature` over the prompt and its tokens."""
    tokens = prompt + out.token_ids
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0].float()[len(prompt) - 1 : -1]
    reference = (logits / temperature).log_softmax(-1)
    total = 0.0
    for step, (entry, token) in enumerate(zip(out.logprobs, out.token_ids, strict=True)):
        best = reference[step].topk(top)
        assert set(entry) == set(best.indices.tolist()) | {token}
        for t, lp in entry.items():
            assert lp == pytest.approx(float(reference[step, t]), abs=1e-4)
        total += float(reference[step, token])
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-3)


def test_logprobs_are_those_of_a_plain_forward(model, tok, prompts):
    llm = LLM(model, tok)
    out = llm.generate(prompts[2], dataclasses.replace(GREEDY, max_tokens=5, logprobs=3))[0].outputs[0]
    assert_logprobs_of_a_plain_forward(model, prompts[2], out)


def test_scaled_logprobs_are_those_of_logits_over_the_temperature(model, tok, prompts):
    """The same seeded draws, reported as log softmax(logits / T); at temperature 0 the model's own."""
    llm = LLM(model, tok)
    params = SamplingParams(temperature=0.5, seed=3, max_tokens=6, logprobs=3)
    plain = llm.generate(prompts[2], params)[0].outputs[0]
    scaled = llm.generate(prompts[2], dataclasses.replace(params, scaled_logprobs=True))[0].outputs[0]
    assert scaled.token_ids == plain.token_ids
    assert_logprobs_of_a_plain_forward(model, prompts[2], plain)
    assert_logprobs_of_a_plain_forward(model, prompts[2], scaled, temperature=0.5)
    greedy = llm.generate(prompts[2], dataclasses.replace(GREEDY, max_tokens=4, logprobs=3, scaled_logprobs=True))
    assert_logprobs_of_a_plain_forward(model, prompts[2], greedy[0].outputs[0])
    with pytest.raises(SamplingParamsError, match="scaled_logprobs"):
        SamplingParams(scaled_logprobs="yes")
    assert_pool_free(llm)
    assert_pool_free(llm)


def test_stop_strings_ids_and_text_match_generate(model, tok, prompts):
    text = "".join(e.text for e in generate(model, tok, prompts[5], GREEDY))
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip()
    params = dataclasses.replace(GREEDY, stop=[stop])
    events = list(generate(model, tok, prompts[5], params))
    llm = LLM(model, tok)
    out = llm.generate([prompts[5]], params)[0].outputs[0]
    assert out.text == "".join(e.text for e in events) and out.finish_reason == "stop" == events[-1].finish_reason
    assert out.token_ids == [e.token_id for e in events]
    greedy_ids = alone(model, tok, [prompts[5]], GREEDY)[0]
    params = dataclasses.replace(GREEDY, stop_token_ids=[greedy_ids[3]])
    out = llm.generate([prompts[5]], params)[0].outputs[0]
    assert out.token_ids == greedy_ids[: greedy_ids.index(greedy_ids[3]) + 1] and out.finish_reason == "stop"
    assert_pool_free(llm)


def test_bad_inputs_raise_naming_the_field_before_anything_is_scheduled(model, tok, prompts):
    llm = LLM(model, tok, max_model_len=40, max_num_seqs=4)
    with pytest.raises(GenerationInputError, match=r"prompts\[1\].*40"):
        llm.generate([prompts[0], list(range(40))], GREEDY)  # the second fills max_model_len
    with pytest.raises(SamplingParamsError, match=r"SamplingParams\.n=0"):
        SamplingParams(n=0)
    with pytest.raises(SamplingParamsError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(SamplingParamsError, match="logprobs"):
        SamplingParams(logprobs=-1)
    with pytest.raises(GenerationInputError, match="n: asks for 5 samples"):
        llm.generate([prompts[0]], SamplingParams(n=5))
    with pytest.raises(GenerationInputError, match=r"prompt.*vocabulary"):
        llm.generate([[1, 999]], GREEDY)
    assert llm.stats().prompt_tokens == 0  # nothing was queued
    assert_pool_free(llm)


def test_outputs_are_capped_by_max_model_len(model, tok, prompts):
    llm = LLM(model, tok, max_model_len=24)
    out = llm.generate([prompts[0][:20]], dataclasses.replace(GREEDY, max_tokens=50))[0].outputs[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    assert_pool_free(llm)


def test_async_llm_streams_cumulative_outputs_and_aborts(model, tok, prompts):
    llm = LLM(model, tok)
    expected = llm.generate(prompts[:3], GREEDY)
    engine = AsyncLLM(llm)

    async def stream(i: int) -> list:
        return [out async for out in engine.generate(prompts[i], GREEDY, f"r{i}")]

    async def main():
        streams = await asyncio.gather(*(stream(i) for i in range(3)))
        long = dataclasses.replace(GREEDY, max_tokens=60)
        seen = []
        async for out in engine.generate(prompts[3], long, "aborted"):
            seen.append(out)
            if len(out.outputs[0].token_ids) == 2:
                await engine.abort("aborted")
        left = engine.generate(prompts[4], long, "left")  # a consumer that goes away mid-stream
        async for _ in left:
            break
        await left.aclose()
        return streams, seen

    streams, seen = asyncio.run(main())
    for outs, want in zip(streams, expected, strict=True):
        ids = [o.outputs[0].token_ids for o in outs]
        assert all(ids[i] == ids[-1][: len(ids[i])] for i in range(len(ids)))  # cumulative, growing
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert ids[-1] == want.outputs[0].token_ids and outs[-1].outputs[0].text == want.outputs[0].text
    assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
    assert len(seen[-1].outputs[0].token_ids) < 60
    engine.shutdown()
    assert_pool_free(llm)


def test_chat_renders_the_template_then_generates(model, tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip
    llm = LLM(model, tok)
    conversations = [[{"role": "user", "content": "the fox"}], [{"role": "user", "content": "to be"}]]
    chats = llm.chat(conversations, GREEDY)
    rendered = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    assert rendered[0] == "<user>the fox<assistant>"
    plain = llm.generate(rendered, GREEDY)
    assert [c.outputs[0].token_ids for c in chats] == [p.outputs[0].token_ids for p in plain]
    assert llm.chat(conversations[0], GREEDY)[0].outputs[0].text == plain[0].outputs[0].text
    assert_pool_free(llm)


def test_a_pool_that_cannot_hold_one_sequence_is_refused(model, tok):
    with pytest.raises(ConfigError, match="num_blocks=3"):
        LLM(model, tok, num_blocks=3, block_size=16)  # max_model_len 96 needs 6 blocks
    with pytest.raises(ConfigError, match="max_model_len=97"):
        LLM(model, tok, max_model_len=97)


def test_the_default_pool_holds_max_num_seqs_sequences_within_the_memory_budget(model, tok):
    """By default the pool holds max_num_seqs full sequences, capped by kv_cache_gib (never below one sequence)."""
    from lmforge.infer.cache_memory import model_bytes_per_token

    per_seq = -(-model.config.max_seq_len // 16)  # blocks of one max_model_len sequence
    block_bytes = 16 * model_bytes_per_token(model.config, 4)
    assert LLM(model, tok, max_num_seqs=4).engine.blocks.num_blocks == 4 * per_seq  # the budget is not reached
    budget = 2.5 * per_seq * block_bytes / 2**30  # two and a half sequences' worth
    assert LLM(model, tok, max_num_seqs=4, kv_cache_gib=budget).engine.blocks.num_blocks == int(2.5 * per_seq)
    assert LLM(model, tok, max_num_seqs=4, kv_cache_gib=1e-9).engine.blocks.num_blocks == per_seq
    with pytest.raises(ConfigError, match="kv_cache_gib"):
        LLM(model, tok, kv_cache_gib=0)


def test_stats_count_requests_and_blocks_while_running_and_abort_frees_waiting_ones(model, tok, prompts):
    llm = LLM(model, tok, max_num_seqs=2, block_size=4)
    engine = llm.engine
    for i in range(3):
        engine.add_request(f"r{i}", prompts[i], GREEDY)
    engine.step()
    stats = llm.stats()
    assert (stats.running, stats.waiting) == (2, 1)
    held = sum(-(-len(p) // 4) for p in prompts[:2])
    assert stats.blocks_used == held == engine.blocks.num_blocks - stats.blocks_free
    assert stats.prompt_tokens == sum(map(len, prompts[:3])) and stats.generated_tokens == 2
    out = engine.abort("r2")  # still waiting
    assert out.finished and out.outputs[0].finish_reason == "abort" and out.outputs[0].token_ids == []
    out = engine.abort("r0")  # running
    assert out.outputs[0].finish_reason == "abort" and len(out.outputs[0].token_ids) == 1
    assert engine.abort("r0") is None
    while engine.has_unfinished():
        engine.step()
    assert_pool_free(llm)


@pytest.fixture
def broken(model, tok):
    """A copy of the model whose logits are NaN."""
    bad = Transformer(model.config).eval()
    bad.load_state_dict(model.state_dict())
    with torch.no_grad():
        bad.norm.weight.fill_(float("nan"))
    return bad


def test_a_failing_step_frees_everything_sync_and_async(broken, tok, prompts):
    llm = LLM(broken, tok)
    with pytest.raises(NonFiniteLogitsError):
        llm.generate(prompts[:3], GREEDY)
    assert_pool_free(llm)
    engine = AsyncLLM(llm)

    async def main():
        with pytest.raises(NonFiniteLogitsError):
            async for _ in engine.generate(prompts[0], GREEDY, "x"):
                pass

    asyncio.run(main())
    engine.shutdown()
    assert_pool_free(llm)


@pytest.mark.parametrize(
    "variant",
    [dict(n_kv_heads=1, sliding_window=5, layer_types=("sliding", "full")),
     dict(mla=MLAConfig(kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=12))],
    ids=["sliding-window", "mla"],
)  # fmt: skip
def test_sliding_window_and_latent_attention_models_equal_generate(tok, prompts, spy, variant):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=52, **variant)
    m = Transformer(cfg).eval()
    some = prompts[:6]
    llm = LLM(m, tok, num_blocks=14, block_size=4, max_num_batched_tokens=16)  # chunked, preempting
    assert [o.outputs[0].token_ids for o in llm.generate(some, GREEDY)] == alone(m, tok, some, GREEDY)
    assert spy["preempted"] > 0
    assert_pool_free(llm)
