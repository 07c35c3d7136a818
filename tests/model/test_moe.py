"""MoE: parity with the Hugging Face MoE blocks, reference vs grouped path, aux/z losses, config validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.nn import functional as F
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from lmforge.config import ConfigError, ModelConfig, MoEConfig
from lmforge.model.moe import ExpertLinear, MoE
from lmforge.model.surgery import swap_modules

D, H, E = 32, 16, 8


def _model_cfg(moe: MoEConfig, d_model: int = D) -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=d_model, n_layers=1, n_heads=1, d_ff=64, moe=moe)


# name -> (HF block factory, our MoEConfig)
CASES = {
    "mixtral": (
        lambda: MixtralSparseMoeBlock(
            transformers.MixtralConfig(hidden_size=D, intermediate_size=H, num_local_experts=E, num_experts_per_tok=2)
        ),
        MoEConfig(n_experts=E, top_k=2, d_expert=H),
    ),
    "qwen3_norm": (
        lambda: Qwen3MoeSparseMoeBlock(
            transformers.Qwen3MoeConfig(
                hidden_size=D, moe_intermediate_size=H, num_experts=E, num_experts_per_tok=2, norm_topk_prob=True
            )
        ),
        MoEConfig(n_experts=E, top_k=2, d_expert=H, norm_topk_prob=True),
    ),
    "qwen3_nonorm": (
        lambda: Qwen3MoeSparseMoeBlock(
            transformers.Qwen3MoeConfig(
                hidden_size=D, moe_intermediate_size=H, num_experts=E, num_experts_per_tok=3, norm_topk_prob=False
            )
        ),
        MoEConfig(n_experts=E, top_k=3, d_expert=H, norm_topk_prob=False),
    ),
}
for method in ("greedy", "group_limited_greedy"):
    CASES[f"deepseek_v2_{method}"] = (
        lambda method=method: DeepseekV2Moe(
            transformers.DeepseekV2Config(
                hidden_size=D,
                moe_intermediate_size=H,
                n_routed_experts=E,
                num_experts_per_tok=3,
                n_shared_experts=2,
                routed_scaling_factor=1.7,
                topk_method=method,
                n_group=4,
                topk_group=2,
            )
        ),
        # HF's DeepSeek-V2 router never renormalises; "greedy" is group-limited routing with a single group.
        MoEConfig(
            n_experts=E,
            top_k=3,
            d_expert=H,
            norm_topk_prob=False,
            routed_scaling_factor=1.7,
            n_group=4 if method == "group_limited_greedy" else 1,
            topk_group=2 if method == "group_limited_greedy" else 1,
            group_score="max",
            n_shared_experts=2,
        ),
    )
for norm in (True, False):
    CASES[f"deepseek_v3_norm{norm}"] = (
        lambda norm=norm: DeepseekV3MoE(
            transformers.DeepseekV3Config(
                hidden_size=D,
                moe_intermediate_size=H,
                n_routed_experts=E,
                num_experts_per_tok=3,
                n_shared_experts=1,
                routed_scaling_factor=2.5,
                n_group=4,
                topk_group=2,
                norm_topk_prob=norm,
            )
        ),
        MoEConfig(
            n_experts=E,
            top_k=3,
            d_expert=H,
            scoring="sigmoid",
            norm_topk_prob=norm,
            routed_scaling_factor=2.5,
            n_group=4,
            topk_group=2,
            group_score="top2_sum",
            score_correction_bias=True,
            n_shared_experts=1,
        ),
    )


def _pair(name: str) -> tuple[torch.nn.Module, MoE]:
    """A randomised HF block and our MoE holding the same weights."""
    make_hf, moe_cfg = CASES[name]
    torch.manual_seed(0)
    hf = make_hf()
    for t in list(hf.parameters()) + list(hf.buffers()):
        with torch.no_grad():
            t.normal_(0.0, 0.3)
    ours = MoE(_model_cfg(moe_cfg))
    gate, up = hf.experts.gate_up_proj.detach().chunk(2, dim=1)
    sd = {
        "router.weight": hf.gate.weight,
        "w_gate": gate,
        "w_up": up,
        "w_down": hf.experts.down_proj,
    }
    if hasattr(hf.gate, "e_score_correction_bias"):
        sd["score_bias"] = hf.gate.e_score_correction_bias
    if hasattr(hf, "shared_experts"):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            sd[f"shared.{proj}.weight"] = getattr(hf.shared_experts, proj).weight
    ours.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    return hf, ours


def _hf_out(hf: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = hf(x)
    return out[0] if isinstance(out, tuple) else out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", list(CASES))
def test_matches_hf(name: str) -> None:
    hf, ours = _pair(name)
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _hf_out(hf, x)
        for path in (ours.forward_reference, ours.forward_grouped):
            assert (path(x) - ref).abs().max().item() <= 1e-5
            assert ours.aux_loss is not None and ours.z_loss is not None


def test_hf_cases_exercise_routing_features() -> None:
    """Guard against vacuous parity: the correction bias and the group limit really change the selection."""
    x = torch.randn(14, D, generator=torch.Generator().manual_seed(1))
    for name in ("deepseek_v3_normTrue", "deepseek_v2_group_limited_greedy"):
        _, ours = _pair(name)
        with torch.no_grad():
            _, _, idx = ours.route(x)
            if ours.score_bias is not None:
                ours.score_bias.zero_()
            ours.moe = dataclasses.replace(ours.moe, n_group=1, topk_group=1)
            _, _, plain = ours.route(x)
        assert not torch.equal(idx.sort(dim=-1).values, plain.sort(dim=-1).values), name


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3_normTrue", "deepseek_v2_group_limited_greedy"])
def test_grads_match_hf(name: str) -> None:
    hf, ours = _pair(name)
    x0 = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(2))
    g = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(3))
    x_hf = x0.clone().requires_grad_()
    (_hf_out(hf, x_hf) * g).sum().backward()
    hf_gate, hf_up = hf.experts.gate_up_proj.grad.chunk(2, dim=1)
    for path in (ours.forward_reference, ours.forward_grouped):
        ours.zero_grad()
        x = x0.clone().requires_grad_()
        (path(x) * g).sum().backward()
        assert _rel(x.grad, x_hf.grad) <= 1e-4
        assert _rel(ours.w_gate.grad, hf_gate) <= 1e-4
        assert _rel(ours.w_up.grad, hf_up) <= 1e-4
        assert _rel(ours.w_down.grad, hf.experts.down_proj.grad) <= 1e-4
        assert _rel(ours.router.weight.grad, hf.gate.weight.grad) <= 1e-4


def _check_paths_agree(moe: MoE, x: torch.Tensor) -> None:
    g = torch.randn_like(x)
    outs, grads = [], []
    for path in (moe.forward_reference, moe.forward_grouped):
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        y = path(xi)
        (y * g).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in moe.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(
    n_group=st.sampled_from([1, 2, 4]),
    per_group=st.integers(2, 3),
    top_k=st.integers(1, 3),
    sigmoid=st.booleans(),
    norm=st.booleans(),
    shared=st.integers(0, 2),
    n_tokens=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_reference_equals_grouped(n_group, per_group, top_k, sigmoid, norm, shared, n_tokens, seed) -> None:
    n_experts = n_group * per_group
    topk_group = max(1, n_group // 2)
    top_k = min(top_k, topk_group * per_group)
    cfg = MoEConfig(
        n_experts=n_experts,
        top_k=top_k,
        d_expert=8,
        scoring="sigmoid" if sigmoid else "softmax",
        norm_topk_prob=norm,
        routed_scaling_factor=1.5,
        n_group=n_group,
        topk_group=topk_group,
        group_score="top2_sum" if sigmoid else "max",
        score_correction_bias=sigmoid,
        n_shared_experts=shared,
    )
    torch.manual_seed(seed)
    moe = MoE(_model_cfg(cfg, d_model=16))
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)
        if moe.score_bias is not None:
            moe.score_bias.normal_(0, 0.3)
    _check_paths_agree(moe, torch.randn(1, n_tokens, 16))
    moe.runtime.moe_reference = True
    ref = moe(torch.ones(1, 2, 16))
    moe.runtime.moe_reference = False
    torch.testing.assert_close(moe(torch.ones(1, 2, 16)), ref, rtol=1e-5, atol=1e-6)


def test_reference_equals_grouped_with_idle_experts() -> None:
    torch.manual_seed(0)
    moe = MoE(_model_cfg(MoEConfig(n_experts=16, top_k=2, d_expert=8), d_model=16))
    x = torch.randn(1, 3, 16)
    _, _, idx = moe.route(x.reshape(-1, 16))
    assert torch.bincount(idx.flatten(), minlength=16).eq(0).sum() >= 10  # 3 tokens * 2 slots: most experts idle
    _check_paths_agree(moe, x)


def _hand_moe(top_k: int) -> tuple[MoE, torch.Tensor, list[list[float]]]:
    """2 experts, router = identity, so each token's logits are the token itself."""
    moe = MoE(_model_cfg(MoEConfig(n_experts=2, top_k=top_k, d_expert=4), d_model=2))
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2))
    logits = [[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 0.5]]
    return moe, torch.tensor([logits]), logits


def test_aux_and_z_loss_hand_computed() -> None:
    moe, x, logits = _hand_moe(top_k=1)
    moe(x)
    probs = [[math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))] for a, b in logits]
    f = [3 / 4, 1 / 4]  # top-1 choices: experts 0, 0, 1, 0
    P = [sum(p[e] for p in probs) / 4 for e in range(2)]
    aux = 2 * (f[0] * P[0] + f[1] * P[1])
    z = sum(math.log(math.exp(a) + math.exp(b)) ** 2 for a, b in logits) / 4
    assert moe.aux_loss.item() == pytest.approx(aux, rel=1e-6)
    assert moe.z_loss.item() == pytest.approx(z, rel=1e-6)
    for loss in (moe.aux_loss, moe.z_loss):
        moe.zero_grad()
        loss.backward(retain_graph=True)
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_aux_loss_is_one_when_every_expert_gets_every_token() -> None:
    moe, x, _ = _hand_moe(top_k=2)  # f = (1/2, 1/2), sum_e P_e = 1
    moe.runtime.moe_reference = True
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(1.0, rel=1e-6)


def test_state_dict_names_and_bf16() -> None:
    cfg = MoEConfig(n_experts=4, top_k=2, d_expert=8, scoring="sigmoid", score_correction_bias=True, n_shared_experts=1)
    moe = MoE(_model_cfg(cfg, d_model=16))
    assert set(moe.state_dict()) == {
        "router.weight",
        "score_bias",
        "w_gate",
        "w_up",
        "w_down",
        "shared.gate_proj.weight",
        "shared.up_proj.weight",
        "shared.down_proj.weight",
    }
    assert moe.score_bias.dtype == torch.float32
    assert MoE(_model_cfg(MoEConfig(n_experts=4, top_k=2, d_expert=8), d_model=16)).score_bias is None
    moe = moe.to(torch.bfloat16)
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    logits, w, _ = moe.route(x.reshape(-1, 16))
    assert logits.dtype == torch.float32 and w.dtype == torch.float32
    assert moe(x).dtype == torch.bfloat16


class _Base(nn.Module):
    """A wrapper keeping the module it replaces as `base` (as a LoRA adapter does)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self.base(x, e)


def test_expert_matrices_are_modules_under_the_checkpoint_names() -> None:
    torch.manual_seed(0)
    moe = MoE(_model_cfg(MoEConfig(n_experts=4, top_k=2, d_expert=8, n_shared_experts=1), d_model=16))
    assert [type(moe.get_submodule(n)) for n in ("gate_proj", "up_proj", "down_proj")] == [ExpertLinear] * 3
    assert moe.w_gate is moe.gate_proj.weight and moe.w_down is moe.down_proj.weight
    assert moe.w_up.shape == (4, 8, 16) and moe.w_down.shape == (4, 16, 8)
    x = torch.randn(3, 16)
    torch.testing.assert_close(moe.expert(2, x), (F.silu(x @ moe.w_gate[2].T) * (x @ moe.w_up[2].T)) @ moe.w_down[2].T)
    names = list(moe.state_dict())
    assert names[:4] == ["w_gate", "w_up", "w_down", "router.weight"]  # where the MoE's own parameters stood
    assert [n for n, _ in moe.named_parameters()][:3] == ["gate_proj.w_gate", "up_proj.w_up", "down_proj.w_down"]
    state = {k: torch.randn_like(v) for k, v in moe.state_dict().items()}
    moe.load_state_dict(state)  # checkpoint names in, module names inside
    assert all(torch.equal(moe.state_dict()[k], v) for k, v in state.items())
    assert list(get_model_state_dict(moe)) == names  # torch.distributed.checkpoint (FSDP2) sees the same names
    state = {k: torch.randn_like(v) for k, v in state.items()}
    set_model_state_dict(moe, state)
    assert torch.equal(moe.w_down, state["w_down"]) and torch.equal(moe.w_gate, state["w_gate"])
    swap_modules(moe, "up_proj", lambda _, old: _Base(old))  # a replaced matrix shows its own names
    assert list(moe.state_dict())[:3] == ["w_gate", "w_down", "up_proj.base.w_up"]
    assert list(get_model_state_dict(moe)) == list(moe.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"top_k": 9}, "moe.top_k"),
        ({"n_experts": 0}, "moe.n_experts"),
        ({"scoring": "relu"}, "moe.scoring"),
        ({"group_score": "mean"}, "moe.group_score"),
        ({"n_group": 3}, "moe.n_group"),
        ({"n_group": 4, "topk_group": 5}, "moe.topk_group"),
        ({"top_k": 5, "n_group": 4, "topk_group": 2}, "moe.top_k"),  # only 2 groups * 2 experts selectable
        ({"n_group": 8, "topk_group": 2, "group_score": "top2_sum"}, "moe.n_group"),  # 1 expert per group
    ],
)
def test_bad_config_raises(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        MoEConfig(**{"n_experts": 8, "top_k": 2, "d_expert": 4, **kwargs})


def test_non_gated_mlp_rejected() -> None:
    with pytest.raises(ConfigError, match="mlp"):
        MoE(_model_cfg(MoEConfig(n_experts=4, top_k=2, d_expert=8), d_model=16).replace(mlp="gelu"))
