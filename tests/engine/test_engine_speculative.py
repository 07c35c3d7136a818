"""Speculative decoding inside the engine (engine.spec_decode) against the plain paths.

Oracles: `infer.generate.generate` one prompt at a time and the engine without speculation (greedy outputs must be
token for token theirs, for 16 prompts of different lengths with chunked prefill, prefix caching and preemption
combined, with prompt lookup and with three draft models: the target itself, which must accept every draft, a
perturbed copy and a smaller random model, which are rejected often; and with preemption by swap, which must carry
the draft model's cache too); the exact target distribution of the third
token, marginalised over the first two with `sampling.process_logits` (a chi-square test over 1,000 seeded samples,
which a rule accepting every draft fails); the plain engine's stops, budgets and log-probabilities. After every
test the pool is fully free, and the prefix cache names only blocks of kept tokens.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_engine import GREEDY, TEXTS, alone, assert_logprobs_of_a_plain_forward, assert_pool_free
from test_speculative import chi_square_p_value

from lmforge import ModelConfig, Transformer
from lmforge.configfile import ConfigError
from lmforge.engine import LLM, SamplingParams, spec_decode
from lmforge.engine.block_manager import block_hash
from lmforge.engine.scheduler import Scheduler
from lmforge.engine.speculative import SpeculativeConfig, _emit
from lmforge.engine.swap import HostPools
from lmforge.infer.sampling import process_logits
from lmforge.tokenizer import train_bpe

COMBINED = dict(num_blocks=14, block_size=4, max_model_len=52, max_num_batched_tokens=16,
                swap_space_gib=0)  # chunked, preempting by recompute  # fmt: skip
K = 3


@pytest.fixture(scope="module")
def tok():
    t = train_bpe(texts=TEXTS, vocab_size=300, special_tokens=["<|endoftext|>"], progress=False)
    t.eos_token = "<|endoftext|>"
    return t


def random_model(vocab: int, seed: int, scale: float, **sizes) -> Transformer:
    """A Transformer with random weights: norms near 1, the rest N(0, scale^2) (peaked next-token distributions)."""
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(vocab_size=vocab, **sizes)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else scale * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def model(tok):
    return random_model(tok.vocab_size, 0, 0.08, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                        max_seq_len=96)  # fmt: skip


@pytest.fixture(scope="module")
def drafts(model, tok):
    """Draft models: the target itself, a perturbed copy (agrees often), a smaller random model (rarely)."""
    noisy = Transformer(model.config).eval()
    noisy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    small = random_model(tok.vocab_size, 3, 0.08, d_model=32, n_layers=1, n_heads=2, d_ff=48, max_seq_len=64)
    return {"self-draft": model, "noisy-draft": noisy, "small-draft": small}


def config(method: str, drafts: dict) -> dict:
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": K}
    return {"model": drafts[method], "num_speculative_tokens": K}


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 40, (16,), generator=g).tolist()
    return [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def expected(model, tok, prompts):
    """Each prompt's greedy tokens from `generate` alone, and from the engine without speculation."""
    plain = [o.outputs[0].token_ids for o in LLM(model, tok, **COMBINED).generate(prompts, GREEDY)]
    return alone(model, tok, prompts, GREEDY), plain


@pytest.fixture
def preemptions(monkeypatch):
    seen = []
    preempt = Scheduler.preempt

    def counting(self, seq):
        seen.append(seq)
        return preempt(self, seq)

    monkeypatch.setattr(Scheduler, "preempt", counting)
    return seen


def assert_cache_names_kept_tokens(llm: LLM, outs) -> None:
    """Every block named in the prefix cache holds a block of some request's final tokens (never a rejected
    draft): its chained hash is one of theirs."""
    bs = llm.engine.blocks.block_size
    kept = set()
    for out in outs:
        tokens, parent = out.prompt_token_ids + out.outputs[0].token_ids, None
        for i in range(len(tokens) // bs):
            parent = block_hash(parent, tuple(tokens[i * bs : (i + 1) * bs]))
            kept.add(parent)
    named = {b.hash for b in llm.engine.blocks.blocks if b.hash is not None}
    assert named and named <= kept


@pytest.mark.parametrize("method", ["ngram", "self-draft", "noisy-draft", "small-draft"])
def test_greedy_speculation_equals_generate_and_the_plain_engine(model, tok, prompts, drafts, expected, preemptions,
                                                                 method):  # fmt: skip
    n = 6 if method == "small-draft" else GREEDY.max_tokens  # it rejects nearly every draft: a shorter run
    llm = LLM(model, tok, speculative_config=config(method, drafts), **COMBINED)
    outs = llm.generate(prompts, dataclasses.replace(GREEDY, max_tokens=n))
    got = [o.outputs[0].token_ids for o in outs]
    assert got == [e[:n] for e in expected[0]] == [e[:n] for e in expected[1]]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert preemptions and llm.stats().prefix_cache_hit_rate > 0  # recomputed after preemption: prefix hits
    engine = llm.engine
    assert engine.accepted_draft_tokens <= engine.draft_tokens and engine.draft_tokens > 0
    if method == "self-draft":  # the draft cache holds what the target's does, prefix hits included
        assert engine.accepted_draft_tokens == engine.draft_tokens
    else:  # drafts were rejected (and, but for the random small model, some accepted)
        assert (engine.accepted_draft_tokens > 0) == (method != "small-draft")
        assert engine.accepted_draft_tokens < engine.draft_tokens
    assert_cache_names_kept_tokens(llm, outs)
    assert_pool_free(llm)


@pytest.mark.parametrize("method", ["ngram", "self-draft"])
def test_greedy_speculation_with_swapped_preemption_equals_generate(model, tok, prompts, drafts, expected,
                                                                    monkeypatch, method):  # fmt: skip
    swapped, swap_out = [], HostPools.swap_out
    monkeypatch.setattr(HostPools, "swap_out", lambda self, pools, pairs: swapped.append(pairs) or
                        swap_out(self, pools, pairs))  # fmt: skip
    llm = LLM(model, tok, speculative_config=config(method, drafts), **{**COMBINED, "swap_space_gib": 1})
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected[0]
    assert any(swapped)
    engine = llm.engine
    if method == "self-draft":  # the draft cache was swapped out and in with the target's: it still agrees
        assert engine.accepted_draft_tokens == engine.draft_tokens > 0
    assert_cache_names_kept_tokens(llm, outs)
    assert_pool_free(llm)


def test_speculation_takes_fewer_target_forwards(model, tok, prompts, drafts, monkeypatch):
    """With the target as its own draft, every target forward after the first emits K + 1 tokens per row."""
    forwards = []
    for spec in (None, config("self-draft", drafts)):
        llm = LLM(model, tok, speculative_config=spec)
        calls, run = [], llm.engine.runner.run
        monkeypatch.setattr(llm.engine.runner, "run", lambda *args, calls=calls, run=run: calls.append(1) or run(*args))
        llm.generate(prompts[:4], dataclasses.replace(GREEDY, max_tokens=13))
        forwards.append(len(calls))
        assert_pool_free(llm)
    assert forwards == [13, 1 + 3]  # the prompts and first tokens, then 12 tokens: 12 steps, or 3 rounds of 4


@pytest.mark.parametrize("method", ["ngram", "self-draft"])
def test_stops_budgets_logprobs_and_samples_are_those_of_the_plain_engine(model, tok, prompts, drafts, method):
    greedy_ids = alone(model, tok, [prompts[5]], GREEDY)[0]
    text = LLM(model, tok).generate([prompts[5]], GREEDY)[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    first = next(i for i in range(2, len(greedy_ids)) if greedy_ids[i] not in greedy_ids[:i])
    cases = [
        dataclasses.replace(GREEDY, stop=[stop]),
        dataclasses.replace(GREEDY, stop_token_ids=[greedy_ids[first]]),  # inside a round's accepted drafts
        dataclasses.replace(GREEDY, max_tokens=6, logprobs=3),
        dataclasses.replace(GREEDY, n=2, max_tokens=7),
    ]
    plain = [LLM(model, tok).generate([prompts[5]], params)[0] for params in cases]
    llm = LLM(model, tok, speculative_config=config(method, drafts))
    for params, want in zip(cases, plain, strict=True):
        got = llm.generate([prompts[5]], params)[0]
        assert len(got.outputs) == len(want.outputs)
        for g, w in zip(got.outputs, want.outputs, strict=True):
            assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
            assert g.cumulative_logprob == pytest.approx(w.cumulative_logprob, abs=1e-3)
            if w.logprobs is not None:
                assert [set(e) for e in g.logprobs] == [set(e) for e in w.logprobs]
                for ge, we in zip(g.logprobs, w.logprobs, strict=True):
                    assert list(ge.values()) == pytest.approx(list(we.values()), abs=1e-4)
    assert plain[1].outputs[0].finish_reason == "stop" and len(plain[1].outputs[0].token_ids) == first + 1
    assert llm.engine.accepted_draft_tokens > 0
    assert_pool_free(llm)


def test_scaled_logprobs_of_verified_tokens_are_those_of_logits_over_the_temperature(model, tok, prompts, drafts):
    llm = LLM(model, tok, speculative_config=config("self-draft", drafts))
    params = SamplingParams(temperature=0.7, seed=5, max_tokens=9, logprobs=2, scaled_logprobs=True)
    out = llm.generate([prompts[5]], params)[0].outputs[0]
    assert llm.engine.accepted_draft_tokens > 0
    assert_logprobs_of_a_plain_forward(model, prompts[5], out, temperature=0.7, top=2)
    assert_pool_free(llm)


# ---- sampling: the tokens are distributed as the target's ------------------------------------------------------

V = 8  # a vocabulary small enough for a chi-square test over a few hundred samples per cell
PROMPT = [1, 2, 3]
SAMPLED = dict(temperature=0.8, repetition_penalty=1.5, top_p=0.95, max_tokens=4, ignore_eos=True)
REQUESTS, SAMPLES = 20, 50  # 1,000 samples, each request's n samples seeded seed + index


@pytest.fixture(scope="module")
def tiny():
    """A target and a different draft over 8 token ids (the tokenizer's first 8: bytes)."""
    sizes = dict(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16)
    return random_model(V, 0, 1.0, **sizes), random_model(V, 1, 1.0, **sizes)


@pytest.fixture(scope="module")
def byte_tok():
    return train_bpe(texts=["abc abc"], vocab_size=260, progress=False)


def third_token_distribution(target: Transformer) -> torch.Tensor:
    """P(y3) = sum over y1, y2 of p(y1) p(y2 | y1) p(y3 | y1, y2), each p the processed target distribution."""
    params = SamplingParams(**SAMPLED)

    @torch.no_grad()
    def p(generated: list[int]) -> torch.Tensor:
        history = torch.tensor([PROMPT + generated])
        logits = target(history)[0, -1:].float()
        return process_logits(logits, params, history, torch.tensor([generated], dtype=torch.long))[0].softmax(-1)

    first = p([])
    total = torch.zeros(V, dtype=torch.float64)
    for a in range(V):
        second = p([a])
        for b in range(V):
            total += float(first[a] * second[b]) * p([a, b]).double()
    return total


def sampled_third_tokens(target, draft, tok, method: str) -> tuple[torch.Tensor, LLM]:
    spec = {"model": draft, "num_speculative_tokens": 2} if method == "draft" else {"method": "ngram",
                                                                                     "num_speculative_tokens": 2}
    llm = LLM(target, tok, speculative_config=spec, max_num_seqs=SAMPLES)
    params = [SamplingParams(**SAMPLED, n=SAMPLES, seed=1000 * i) for i in range(REQUESTS)]
    outs = llm.generate([PROMPT] * REQUESTS, params)
    return torch.tensor([c.token_ids[2] for o in outs for c in o.outputs]), llm


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_sampled_tokens_follow_the_target_distribution(tiny, byte_tok, method):
    target, draft = tiny
    third, llm = sampled_third_tokens(target, draft, byte_tok, method)
    assert chi_square_p_value(third, third_token_distribution(target)) > 1e-3
    engine = llm.engine
    assert 0 < engine.accepted_draft_tokens < engine.draft_tokens  # accepted and rejected drafts both happened
    assert_pool_free(llm)


def accept_every_draft(proposal, p, generators):
    """A wrong rule: keep every draft, then draw the bonus token from the target."""
    accepted = proposal.counts.to(p.device)
    bonus = [torch.multinomial(p[b, accepted[b]], 1, generator=g)[0] for b, g in enumerate(generators)]
    return _emit(proposal.to(p.device), accepted, torch.stack(bonus))


def test_the_distribution_test_fails_a_rule_that_accepts_every_draft(tiny, byte_tok, monkeypatch):
    target, draft = tiny
    monkeypatch.setattr(spec_decode, "accept_sampled", accept_every_draft)
    third, llm = sampled_third_tokens(target, draft, byte_tok, "draft")
    with pytest.raises(AssertionError):  # the draft's tokens show: counts off, or tokens the target never emits
        assert chi_square_p_value(third, third_token_distribution(target)) > 1e-3
    assert_pool_free(llm)


# ---- options ---------------------------------------------------------------------------------------------------


def test_a_draft_checkpoint_path_is_loaded(model, tok, prompts, tmp_path):
    import lmforge

    lmforge.save(model, tmp_path / "draft", tokenizer=tok)
    llm = LLM(model, tok, speculative_config={"model": str(tmp_path / "draft"), "num_speculative_tokens": 2})
    outs = llm.generate(prompts[:3], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == alone(model, tok, prompts[:3], GREEDY)
    assert llm.engine.accepted_draft_tokens == llm.engine.draft_tokens > 0
    assert_pool_free(llm)


def test_the_config_takes_vllms_dict_or_the_dataclass(model, tok):
    as_dict = SpeculativeConfig.of({"num_speculative_tokens": 5, "prompt_lookup_max": 4})
    assert as_dict == SpeculativeConfig.of(as_dict) and as_dict.method == "ngram"
    assert (as_dict.num_speculative_tokens, as_dict.prompt_lookup_max, as_dict.prompt_lookup_min) == (5, 4, 1)
    assert SpeculativeConfig.of({"model": model}).method == "draft_model"
    assert SpeculativeConfig.of(None) is None


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"method": "medusa"}, r"speculative_config\.method='medusa': must be one of ngram, draft_model"),
        ({"num_speculative_tokens": 0}, r"speculative_config\.num_speculative_tokens=0"),
        ({"prompt_lookup_max": 1, "prompt_lookup_min": 2}, r"speculative_config\.prompt_lookup_max=1: must be >="),
        ({"prompt_lookup_min": 0}, r"speculative_config\.prompt_lookup_min=0"),
        ({"num_speculative_token": 2}, r"unknown speculative_config field 'num_speculative_token'"),
        ({"method": "draft_model"}, r"speculative_config\.model=None: method \"draft_model\" needs"),
        ({"method": "ngram", "model": "x"}, r"speculative_config\.model='x': is for method \"draft_model\" only"),
        ({"model": 3}, r"speculative_config\.model=3: must be an nn.Module or a checkpoint path"),
        ("ngram", r"speculative_config='ngram': must be None, a dict"),
        ("other-vocab", r"speculative_config\.model='Transformer': its vocabulary has 200 ids, the target's 300"),
        ("short-context", r"speculative_config\.model='Transformer': its context \(32\) must hold max_model_len"),
    ],
)  # fmt: skip
def test_bad_speculative_configs_raise_naming_the_field(model, tok, spec, match):
    sizes = dict(d_model=16, n_layers=1, n_heads=2, d_ff=16)
    models = {"other-vocab": random_model(200, 0, 0.1, max_seq_len=96, **sizes),
              "short-context": random_model(300, 0, 0.1, max_seq_len=32, **sizes)}  # fmt: skip
    spec = {"model": models[spec]} if isinstance(spec, str) and spec in models else spec
    with pytest.raises(ConfigError, match=match) as error:
        LLM(model, tok, speculative_config=spec)
    assert "\n" not in str(error.value)


def test_compile_swap_space_and_max_rows_reach_both_runners(model, tok, drafts, monkeypatch):
    seen = []
    real = spec_decode.ModelRunner

    class Recording(real):
        def __init__(self, model, num_blocks, block_size, compile=False, swap_blocks=0, max_rows=1):
            seen.append((compile, swap_blocks, max_rows))
            super().__init__(model, num_blocks, block_size, swap_blocks=swap_blocks)

    monkeypatch.setattr("lmforge.engine.engine.ModelRunner", Recording)
    monkeypatch.setattr(spec_decode, "ModelRunner", Recording)
    llm = LLM(model, tok, speculative_config=config("self-draft", drafts), compile=True, max_num_seqs=8)
    host, rows = llm.engine.scheduler.host.num_blocks, 8 * (1 + K)  # a verification step: 1 + K tokens a row
    LLM(model, tok, swap_space_gib=0, max_num_seqs=8)
    assert seen == [(True, host, rows), (True, host, rows), (False, 0, 8)] and host > 0
    with pytest.raises(ConfigError, match="compile='yes'"):
        LLM(model, tok, compile="yes")
