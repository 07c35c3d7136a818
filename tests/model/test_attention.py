"""Attention: both backends equal a naive per-query loop; every position kind decodes through the cache."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.infer.kv_cache import CacheFullError, KVCache
from lmforge.model.attention import attend, build_mask
from lmforge.model.position import alibi_bias
from lmforge.model.transformer import Transformer


def naive_attention(q, k, v, allowed, scale, softcap=None, bias=None):
    """One query at a time, written out: the oracle."""
    b, h, tq, _ = q.shape
    out = torch.zeros(b, h, tq, v.shape[-1], dtype=torch.float64)
    group = h // k.shape[1]
    for bi in range(b):
        for hi in range(h):
            for i in range(tq):
                s = [float(q[bi, hi, i] @ k[bi, hi // group, j]) * scale for j in range(k.shape[2])]
                if softcap:
                    s = [softcap * math.tanh(x / softcap) for x in s]
                if bias is not None:
                    s = [x + float(bias[0, hi, i, j]) for j, x in enumerate(s)]
                s = [x if allowed[bi, i, j] else -math.inf for j, x in enumerate(s)]
                m = max(s)
                w = [math.exp(x - m) for x in s]
                total = sum(w)
                for j, wj in enumerate(w):
                    out[bi, hi, i] += wj / total * v[bi, hi // group, j].double()
    return out.float()


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "window", "padded", "softcap", "alibi", "past"),
    [
        (4, 4, None, False, None, False, 0),  # MHA, plain causal
        (4, 2, None, True, None, False, 0),  # GQA with padding
        (4, 1, 3, False, None, False, 0),  # MQA with a sliding window
        (2, 2, None, False, 5.0, False, 0),  # soft-capping
        (4, 2, None, True, None, True, 0),  # ALiBi with padding
        (4, 2, 4, True, None, False, 5),  # decoding 3 queries against 8 keys, window and padding
    ],
)
def test_backends_equal_naive_loop(backend, heads, kv_heads, window, padded, softcap, alibi, past):
    g = torch.Generator().manual_seed(0)
    tq = 3 if past else 6
    tk = past + tq
    q = torch.randn(2, heads, tq, 8, generator=g)
    k = torch.randn(2, kv_heads, tk, 8, generator=g)
    v = torch.randn(2, kv_heads, tk, 5, generator=g)  # value size differs from the key size
    valid = torch.ones(2, tk, dtype=torch.bool)
    if padded:
        valid[1, :2] = False
    q_slots, k_slots = torch.arange(past, tk), torch.arange(tk)
    mask = build_mask(q_slots, k_slots, valid if padded else None, window)
    bias = alibi_bias(heads, q_slots, k_slots) if alibi else None
    got = attend(q, k, v, mask, 0.3, softcap, bias, backend)
    want = naive_attention(q, k, v, mask[:, 0].expand(2, tq, tk), 0.3, softcap, bias)
    rows = slice(None) if not padded or past else slice(2, None)  # padding queries are ignored
    torch.testing.assert_close(got[1, :, rows], want[1, :, rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)


def test_mask_semantics():
    m = build_mask(torch.arange(4), torch.arange(4), torch.tensor([[False, True, True, True]]), window=2)[0, 0]
    want = torch.tensor(
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool
    )  # diagonal always on; key 0 is padding; window 2
    assert torch.equal(m, want)


VARIANTS = {
    "sinusoidal-layernorm-gelu": dict(position="sinusoidal", norm="layernorm", mlp="gelu", mlp_bias=True),
    "learned-mqa": dict(position="learned", n_kv_heads=1, attn_bias=True, attn_out_bias=True),
    "alibi-gqa": dict(position="alibi", n_kv_heads=2),
    "rope-partial-interleaved": dict(rotary_fraction=0.5, rope_layout="interleaved", qk_norm=True),
    "rope-window-softcap": dict(sliding_window=5, attn_softcap=20.0, final_softcap=10.0, post_norms=True),
    "rope-dynamic-ntk": dict(rope_scaling=None, embed_scale=True, norm_unit_offset=True),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_decode_and_backends_agree(name):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64, **VARIANTS[name])
    model = Transformer(cfg).eval()
    x = torch.randint(0, 64, (2, 14))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(x, attention_mask=mask)
        eager = Transformer(cfg).eval()
        eager.runtime.attn_backend = "eager"
        eager.load_state_dict(model.state_dict())
        torch.testing.assert_close(eager(x, attention_mask=mask), full, atol=1e-5, rtol=1e-5)
        cache = KVCache(16)
        parts = [model(x[:, :6], attention_mask=mask[:, :6], cache=cache)]
        parts += [model(x[:, t : t + 1], cache=cache) for t in range(6, 14)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_a_clear_error():
    model = Transformer(ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, d_ff=16)).eval()
    cache = KVCache(4)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        with pytest.raises(CacheFullError, match="holds 4 tokens; 3 used, 2 more"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


def test_bad_inputs_are_clear_errors():
    model = Transformer(ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, d_ff=16))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="attention_mask has 2 columns; expected 3"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 2))
