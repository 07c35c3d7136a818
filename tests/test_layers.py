"""Norms and MLP activations against torch's and transformers' own definitions."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lmforge.model.mlp import ACTIVATIONS, MLP
from lmforge.model.norm import LayerNorm, RMSNorm


def test_rmsnorm_matches_torch():
    x = torch.randn(3, 5, 16)
    norm = RMSNorm(16, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (16,), norm.weight, eps=1e-5))


def test_gemma_rmsnorm_is_one_plus_w():
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    x = torch.randn(3, 16)
    ours, ref = RMSNorm(16, eps=1e-6, unit_offset=True), Gemma2RMSNorm(16, eps=1e-6)
    torch.nn.init.normal_(ours.weight)
    ref.weight.data.copy_(ours.weight)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours(x.bfloat16()), ref(x.bfloat16()))


def test_layernorm_matches_torch():
    x = torch.randn(4, 16)
    ours, ref = LayerNorm(16, eps=1e-5), torch.nn.LayerNorm(16, eps=1e-5)
    torch.nn.init.normal_(ours.weight)
    torch.nn.init.normal_(ours.bias)
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize(
    ("kind", "hf_name"),
    [("swiglu", "silu"), ("geglu", "gelu_pytorch_tanh"), ("geglu_exact", "gelu"), ("gelu", "gelu"),
     ("gelu_tanh", "gelu_new")],
)  # fmt: skip
def test_activations_match_transformers(kind, hf_name):
    from transformers.activations import ACT2FN

    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(ACTIVATIONS[kind](x), ACT2FN[hf_name](x))


def test_gated_and_plain_mlp_shapes():
    gated, plain = MLP(8, 24, "swiglu"), MLP(8, 24, "gelu", bias=True)
    x = torch.randn(2, 3, 8)
    assert gated(x).shape == plain(x).shape == (2, 3, 8)
    want = gated.down_proj(F.silu(gated.gate_proj(x)) * gated.up_proj(x))
    torch.testing.assert_close(gated(x), want)
    assert plain.gate_proj is None and plain.up_proj.bias is not None
