"""The static-cache (compiled) decode path computes what the plain `KVCache` path computes.

The plain path is itself checked against transformers (test_hf_parity.py); here every architecture's
prefill + single-token steps through `StaticDecoder` must equal it, eager and compiled.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import lmforge
from hf_reference import VOCAB, hf_model
from lmforge import ModelConfig, Transformer
from lmforge.infer import static_decode
from lmforge.infer.generate import generate
from lmforge.infer.kv_cache import CacheFullError, KVCache
from lmforge.infer.matvec import MatVecLinear, matvec, matvec_view
from lmforge.infer.static_decode import StaticDecoder, decoder_for
from lmforge.tokenizer import train_bpe

ARCHES = ["gpt2", "llama", "mistral", "qwen3", "gemma2", "qwen3_moe", "deepseek_v3"]
PROMPT, STEPS = 7, 9


def lmforge_model(arch: str, tmp_path) -> Transformer:
    hf_model(arch).save_pretrained(tmp_path)
    return lmforge.load(tmp_path)[0]


def ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, PROMPT + STEPS), generator=torch.Generator().manual_seed(seed))


def plain_logits(model: Transformer, x: torch.Tensor) -> list[torch.Tensor]:
    """Last-position logits after the prompt, then after each single token (the plain cache path)."""
    cache = KVCache(x.shape[1])
    with torch.no_grad():
        out = [model(x[:, :PROMPT], cache=cache)[:, -1]]
        out += [model(x[:, t : t + 1], cache=cache)[:, -1] for t in range(PROMPT, x.shape[1])]
    return out


def static_logits(decoder: StaticDecoder, x: torch.Tensor) -> list[torch.Tensor]:
    return [decoder.prefill(x[:, :PROMPT])] + [decoder.step(x[:, t : t + 1]) for t in range(PROMPT, x.shape[1])]


@pytest.mark.parametrize("arch", ARCHES)
def test_eager_static_decoder_equals_the_plain_cache(arch, tmp_path):
    """Sliding windows (mistral, gemma2), learned positions (gpt2), soft-capping, MLA and MoE included."""
    model = lmforge_model(arch, tmp_path)
    x = ids()
    decoder = StaticDecoder(model, max_len=32)
    for _ in range(2):  # a second sequence reuses the cache from a clean start
        for got, want in zip(static_logits(decoder, x), plain_logits(model, x), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_compiled_static_decoder_equals_the_plain_cache_without_recompiling(arch, tmp_path):
    model = lmforge_model(arch, tmp_path)
    x = ids(batch=1)
    want = plain_logits(model, x)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for max_len in (32, 64):  # the slot dimension is symbolic: a second cache size reuses the graph
        decoder = StaticDecoder(model, max_len=max_len, compile=True)
        for got, w in zip(static_logits(decoder, x), want, strict=True):
            torch.testing.assert_close(got, w, rtol=0, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_matvec_equals_linear_when_compiled():
    torch.manual_seed(0)
    w, b = torch.randn(96, 64), torch.randn(96)
    compiled = torch.compile(matvec, fullgraph=True)
    for x in (torch.randn(1, 1, 64), torch.randn(64)):
        torch.testing.assert_close(compiled(x, w, b), nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 64)  # several rows: plain linear
    torch.testing.assert_close(compiled(x, w, b), nn.functional.linear(x, w, b))


def test_matvec_view_shares_parameters_and_leaves_the_model_alone():
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64))
    view = matvec_view(model)
    assert type(model.blocks[0].attn.q_proj) is nn.Linear
    assert type(view.blocks[0].attn.q_proj) is MatVecLinear
    ours = dict(model.named_parameters())
    theirs = dict(view.named_parameters())
    assert ours.keys() == theirs.keys() and all(ours[k] is theirs[k] for k in ours)


def test_cache_full_and_weak_model_reference():
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=128))
    decoder = StaticDecoder(model, max_len=8)
    with pytest.raises(CacheFullError, match="holds 8 tokens; the prompt has 9"):
        decoder.prefill(torch.zeros(1, 9, dtype=torch.long))
    decoder.prefill(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(CacheFullError, match="all are used"):
        decoder.step(torch.zeros(1, 1, dtype=torch.long))
    assert decoder_for(model, 100).max_len == 128 and decoder_for(model, 100) is decoder_for(model, 70)
    del model, decoder
    gc.collect()
    assert len(static_decode._DECODERS) == 0  # a cached decoder does not keep its model alive


@pytest.fixture(scope="module")
def tiny():
    text = "the quick brown fox jumps over the lazy dog. " * 20
    tok = train_bpe([text], vocab_size=300, special_tokens=["<|endoftext|>"], progress=False, workers=1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96)
    return Transformer(cfg).eval(), tok


@pytest.mark.slow
def test_generate_with_compile_gives_the_same_tokens(tiny):
    model, tok = tiny
    plain = [e.token_id for e in generate(model, tok, "the quick", temperature=0, max_tokens=40, ignore_eos=True)]
    fast = list(generate(model, tok, "the quick", temperature=0, max_tokens=40, ignore_eos=True, compile=True))
    assert [e.token_id for e in fast] == plain
    assert fast[-1].stats.warmup_s > 0  # the first step compiled the decoder: reported apart from the decode rate
    sampled = [list(generate(model, tok, "the", max_tokens=20, seed=3, top_k=5, compile=c)) for c in (False, True)]
    assert [e.token_id for e in sampled[0]] == [e.token_id for e in sampled[1]]
    assert sampled[1][-1].stats.warmup_s == 0.0  # the same (cached, compiled) decoder: nothing to compile


def test_generate_with_compile_falls_back_for_alibi(tiny):
    _, tok = tiny
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4, d_ff=64, position="alibi")
    model = Transformer(cfg).eval()
    assert not static_decode.supports(model)
    plain = [e.token_id for e in generate(model, tok, "the", temperature=0, max_tokens=5, ignore_eos=True)]
    fast = [e.token_id for e in generate(model, tok, "the", temperature=0, max_tokens=5, ignore_eos=True, compile=True)]
    assert fast == plain


@pytest.mark.slow
def test_models_of_different_shapes_compile_in_one_process(tiny):
    """A second model recompiles the same decoder code with its head counts made symbolic by torch.compile; the
    GQA flag must stay a constant (SDPA refuses a symbolic one)."""
    _, tok = tiny
    for seed, (d, layers, heads, kv) in enumerate(((64, 2, 4, None), (16, 1, 2, None), (32, 1, 4, 1))):
        torch.manual_seed(seed)
        cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, d_ff=96)
        model = Transformer(cfg).eval()
        run = [generate(model, tok, "the", temperature=0, max_tokens=6, ignore_eos=True, compile=c) for c in (0, 1)]
        assert [e.token_id for e in run[1]] == [e.token_id for e in run[0]]
