"""Positions: RoPE frequencies and scalings vs transformers, rotation layouts vs closed forms,
sinusoidal and ALiBi vs their definitions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.config import ModelConfig, RopeScaling
from lmforge.model.position import alibi_slopes, apply_rope, rope_cos_sin, rope_frequencies, sinusoidal_embedding

SCALINGS = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, RopeScaling("linear", 4.0)),
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, RopeScaling("dynamic", 2.0, original_max_seq_len=64)),
    "llama3": (
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 32},
        RopeScaling("llama3", 8.0, original_max_seq_len=32, low_freq_factor=1.0, high_freq_factor=4.0),
    ),
    "yarn": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2},
        RopeScaling("yarn", 4.0, original_max_seq_len=32, beta_fast=16, beta_slow=2),
    ),
    "yarn-mscale": (
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "mscale": 0.707,
         "mscale_all_dim": 0.707},
        RopeScaling("yarn", 8.0, original_max_seq_len=32, mscale=0.707, mscale_all_dim=0.707),
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", ["default", *SCALINGS])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_frequencies_match_transformers(kind, partial):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_params, ours = SCALINGS.get(kind, ({"rope_type": "default"}, None))
    hf_params = {**hf_params, "rope_theta": 5000.0, "partial_rotary_factor": partial}
    hf_cfg = transformers.LlamaConfig(
        hidden_size=128, num_attention_heads=4, max_position_embeddings=64, rope_parameters=hf_params
    )
    cfg = ModelConfig(d_model=128, n_heads=4, max_seq_len=64, rope_theta=5000.0, rope_scaling=ours,
                      rotary_fraction=partial)  # fmt: skip
    seq_len = 200  # beyond max_position_embeddings: only dynamic NTK depends on it
    if kind == "default":  # linear scaling by 1 is the unscaled RoPE (and honours partial_rotary_factor)
        hf_cfg.rope_parameters = {**hf_params, "rope_type": "linear", "factor": 1.0}
        want, want_scale = ROPE_INIT_FUNCTIONS["linear"](hf_cfg, "cpu")
    else:
        want, want_scale = ROPE_INIT_FUNCTIONS[hf_params["rope_type"]](hf_cfg, "cpu", seq_len=seq_len)
    got, scale = rope_frequencies(cfg, seq_len)
    assert got.shape == (cfg.rotary_dim // 2,)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-7)


def test_half_layout_matches_transformers_rotate_half():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = ModelConfig(d_model=64, n_heads=2)
    pos = torch.arange(10)[None]
    cos, sin = rope_cos_sin(cfg, pos)
    q, k = torch.randn(2, 1, 2, 10, 32).unbind(0)
    full_cos, full_sin = torch.cat([cos, cos], -1)[:, 0], torch.cat([sin, sin], -1)[:, 0]
    want_q, want_k = apply_rotary_pos_emb(q, k, full_cos, full_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin, "half"), want_q)
    torch.testing.assert_close(apply_rope(k, cos, sin, "half"), want_k)


def test_interleaved_layout_is_complex_multiplication():
    cfg = ModelConfig(d_model=64, n_heads=2, rope_layout="interleaved")
    pos = torch.arange(7)[None]
    cos, sin = rope_cos_sin(cfg, pos)
    x = torch.randn(1, 2, 7, 32)
    inv_freq, _ = rope_frequencies(cfg)
    rotor = torch.polar(torch.ones(7, 16), pos[0, :, None].float() * inv_freq)
    want = torch.view_as_real(torch.view_as_complex(x.reshape(1, 2, 7, 16, 2)) * rotor).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin, "interleaved"), want)


def test_partial_rotary_leaves_the_tail_alone():
    cfg = ModelConfig(d_model=64, n_heads=2, rotary_fraction=0.25)
    cos, sin = rope_cos_sin(cfg, torch.arange(5)[None])
    x = torch.randn(1, 2, 5, 32)
    y = apply_rope(x, cos, sin)
    assert cos.shape[-1] == 4
    torch.testing.assert_close(y[..., 8:], x[..., 8:])
    torch.testing.assert_close(y[..., :8], apply_rope(x[..., :8], cos, sin))


@settings(max_examples=25, deadline=None)
@given(offset=st.integers(0, 500), layout=st.sampled_from(["half", "interleaved"]))
def test_rope_scores_depend_only_on_relative_offset(offset, layout):
    cfg = ModelConfig(d_model=32, n_heads=1, rope_layout=layout)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32, generator=g), torch.randn(1, 1, 1, 32, generator=g)

    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rope_cos_sin(cfg, torch.tensor([[pq]]))
        ck, sk = rope_cos_sin(cfg, torch.tensor([[pk]]))
        return (apply_rope(q, cq, sq, layout) * apply_rope(k, ck, sk, layout)).sum()

    torch.testing.assert_close(score(7 + offset, 3 + offset), score(7, 3), atol=2e-4, rtol=1e-4)


def test_sinusoidal_matches_definition():
    pos = torch.tensor([[0, 1, 5, 100]])
    pe = sinusoidal_embedding(pos, 16)
    for j, p in enumerate(pos[0].tolist()):
        for i in range(8):
            angle = p / 10000 ** (2 * i / 16)
            assert pe[0, j, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[0, j, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


@pytest.mark.parametrize("n_heads", [1, 4, 8, 12, 20])
def test_alibi_slopes_match_bloom(n_heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    # BLOOM's alibi is slope_h * key_position; at position 1 it is the slope itself
    mask = torch.ones(1, 2)
    bloom = build_alibi_tensor(mask, n_heads, torch.float32)[:, 0, 1]
    torch.testing.assert_close(alibi_slopes(n_heads), bloom)
    assert alibi_slopes(8).tolist() == pytest.approx([2 ** -(i + 1) for i in range(8)])
