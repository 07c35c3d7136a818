"""SmoothQuant (quant/smoothquant.py) against a reimplementation, in this file, of the reference code of
mit-han-lab/smoothquant: calibration.py `get_act_scales` (forward hooks on every linear, a max over all tokens),
smooth.py `smooth_ln_fcs` / `smooth_lm`, and fake_quant.py `quantize_weight_per_channel_absmax`,
`quantize_activation_per_token_absmax` and `W8A8Linear.forward` (fake quantization: F.linear on the dequantized
operands), written the way they are written there (in-place edits), in float64 where the exact values matter;
plus invariants: smoothing leaves a float model's function unchanged, smoothing lowers the W8A8 error on a model
with outlier channels, static scales are the calibrated absmax / 127, and what SmoothQuant cannot handle is
refused before any work."""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import MLAConfig, ModelConfig, MoEConfig
from lmforge.model.norm import LayerNorm, RMSNorm
from lmforge.model.surgery import swap_modules
from lmforge.model.transformer import Transformer
from lmforge.quant import smoothquant
from lmforge.quant.primitives import QuantError
from lmforge.quant.smoothquant import (
    W8A8Linear,
    activation_scales,
    quantize_model_smoothquant,
    smooth_model,
    smoothing_scales,
    static_input_scales,
    w8a8_matmul,
)

# ----------------------------------------------------------------------------------------------------- reference


@torch.no_grad()
def ref_smooth_ln_fcs(ln: nn.Module, fcs: list[nn.Linear], act_scales: torch.Tensor, alpha: float = 0.5):
    """smooth.py smooth_ln_fcs (the bias division guarded, for RMSNorm); returns the scales it applied."""
    device, dtype = fcs[0].weight.device, fcs[0].weight.dtype
    act_scales = act_scales.to(device=device, dtype=dtype)
    weight_scales = torch.cat([fc.weight.abs().max(dim=0, keepdim=True)[0] for fc in fcs], dim=0)
    weight_scales = weight_scales.max(dim=0)[0].clamp(min=1e-5)
    scales = (act_scales.pow(alpha) / weight_scales.pow(1 - alpha)).clamp(min=1e-5).to(device).to(dtype)
    ln.weight.div_(scales)
    if getattr(ln, "bias", None) is not None:
        ln.bias.div_(scales)
    for fc in fcs:
        fc.weight.mul_(scales.view(1, -1))
    return scales


@torch.no_grad()
def ref_smooth_lm(model: Transformer, scales: dict[str, torch.Tensor], alpha: float = 0.5) -> None:
    """smooth.py smooth_lm for lmforge blocks: attention norm -> q/k/v, MLP norm -> gate/up (or fc1 = up)."""
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        ref_smooth_ln_fcs(block.attn_norm, [attn.q_proj, attn.k_proj, attn.v_proj],
                          scales[f"blocks.{i}.attn.q_proj"], alpha)  # fmt: skip
        fcs = [m for m in (mlp.gate_proj, mlp.up_proj) if m is not None]
        ref_smooth_ln_fcs(block.mlp_norm, fcs, scales[f"blocks.{i}.mlp.up_proj"], alpha)


@torch.no_grad()
def ref_get_act_scales(model: Transformer, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """calibration.py get_act_scales: hooks on every linear, one full forward, max |x| per channel."""
    act_scales: dict[str, torch.Tensor] = {}

    def stat_input_hook(m, x, y, name):
        x = x[0] if isinstance(x, tuple) else x
        comming_max = torch.max(x.view(-1, x.shape[-1]).abs().detach(), dim=0)[0].float()
        act_scales[name] = torch.max(act_scales[name], comming_max) if name in act_scales else comming_max

    hooks = [m.register_forward_hook(functools.partial(stat_input_hook, name=name))
             for name, m in model.named_modules() if isinstance(m, nn.Linear)]  # fmt: skip
    model(ids)
    for h in hooks:
        h.remove()
    return act_scales


@torch.no_grad()
def ref_quantize_weight_per_channel_absmax(w: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    scales = w.abs().max(dim=-1, keepdim=True)[0]
    q_max = 2 ** (n_bits - 1) - 1
    scales.clamp_(min=1e-5).div_(q_max)
    w.div_(scales).round_().mul_(scales)
    return w


@torch.no_grad()
def ref_quantize_activation_per_token_absmax(t: torch.Tensor, n_bits: int = 8) -> torch.Tensor:
    scales = t.abs().max(dim=-1, keepdim=True)[0]
    q_max = 2 ** (n_bits - 1) - 1
    scales.clamp_(min=1e-5).div_(q_max)
    t.div_(scales).round_().mul_(scales)
    return t


def ref_w8a8(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """fake_quant.py W8A8Linear.from_float(per_channel, per_token) then forward."""
    w = ref_quantize_weight_per_channel_absmax(lin.weight.detach().clone())
    return F.linear(ref_quantize_activation_per_token_absmax(x.clone()), w, lin.bias)


# ----------------------------------------------------------------------------------------------------- fixtures


def tiny_model(seed: int = 0, outliers: bool = True, **overrides) -> Transformer:
    torch.manual_seed(seed)
    fields = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64)
    model = Transformer(ModelConfig(**{**fields, **overrides})).eval()
    if outliers:  # outlier input channels: a few norm weights scaled up (Gemma's (1 + w): the offset)
        with torch.no_grad():
            for block in model.blocks:
                for norm, chans in ((block.attn_norm, [3, 17, 40]), (block.mlp_norm, [5, 33])):
                    if getattr(norm, "unit_offset", False):
                        norm.weight[chans] = 29.0
                    else:
                        norm.weight[chans] *= 30
    return model


def windows(n: int = 6, t: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


def outlier_features(shape: tuple[int, ...], channels: tuple[int, ...], seed: int = 0,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    x[..., list(channels)] *= 40
    return x


def block_linears(model: nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks."))


VARIANTS = [
    {},  # Llama: RMSNorm, SwiGLU, MHA
    {"norm": "layernorm", "mlp": "gelu_tanh", "mlp_bias": True, "attn_bias": True, "attn_out_bias": True},  # GPT-2
    {"norm_unit_offset": True, "post_norms": True, "mlp": "geglu", "n_kv_heads": 2},  # Gemma 2 style, GQA
]


# ----------------------------------------------------------------------------------------------------- smoothing


def test_scales_and_folded_weights_equal_smooth_ln_fcs_on_a_toy_norm_and_linears() -> None:
    g = torch.Generator().manual_seed(0)
    x = outlier_features((50, 32), (2, 11, 29), dtype=torch.float64)
    for norm in (nn.LayerNorm(32), LayerNorm(32), RMSNorm(32)):
        norm = norm.double()
        with torch.no_grad():
            for p in norm.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        fcs = [nn.Linear(32, n, bias=b).double() for n, b in ((16, True), (24, False), (8, True))]
        with torch.no_grad():
            fcs[1].weight[:, 5] *= 9  # one linear's column dominates the max over the group
        act = norm(x).abs().amax(dim=0).detach()
        act[7] = 0.0  # a dead channel: s floors at 1e-5
        for alpha in (0.5, 0.0, 0.8, 1.0):
            ref_norm, ref_fcs = copy.deepcopy(norm), copy.deepcopy(fcs)
            expected = ref_smooth_ln_fcs(ref_norm, ref_fcs, act, alpha)
            got = smoothing_scales(act, fcs, alpha)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        assert got[7] == 1e-5
        ours_norm, ours_fcs = copy.deepcopy(norm), copy.deepcopy(fcs)
        ref_smooth_ln_fcs(norm, fcs, act, 0.5)
        smoothquant.fold_scales(ours_norm, ours_fcs, smoothing_scales(act, ours_fcs, 0.5))
        for a, b in zip(ours_norm.parameters(), norm.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        for a, b in zip(ours_fcs, fcs, strict=True):
            torch.testing.assert_close(a.weight, b.weight, rtol=1e-12, atol=0)


def test_activation_scales_equal_get_act_scales() -> None:
    model, ids = tiny_model(), windows()
    expected = ref_get_act_scales(model, ids)
    got = activation_scales(model, ids, batch_size=4, progress=False)  # two chunks per block
    assert sorted(got) == sorted(n for n in expected if n.startswith("blocks.")) == block_linears(model)
    for name, scale in got.items():
        assert scale.shape == (model.get_submodule(name).in_features,) and scale.dtype == torch.float32
        torch.testing.assert_close(scale, expected[name], rtol=1e-5, atol=1e-6)
    mlp = activation_scales(model, ids, "blocks.1.mlp.*", progress=False)
    assert sorted(mlp) == [f"blocks.1.mlp.{p}_proj" for p in ("down", "gate", "up")]


@pytest.mark.parametrize("overrides", VARIANTS[:2])
def test_smooth_model_equals_smooth_lm(overrides: dict) -> None:
    model, ids = tiny_model(**overrides).double(), windows()
    act = activation_scales(model, ids, progress=False)
    reference = copy.deepcopy(model)
    ref_smooth_lm(reference, act)
    applied = smooth_model(model, act)
    assert sorted(applied) == sorted(f"blocks.{i}.{n}" for i in range(2) for n in ("attn_norm", "mlp_norm"))
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=0, msg=name)
    assert not torch.equal(model.blocks[0].attn.q_proj.weight, tiny_model(**overrides).blocks[0].attn.q_proj.weight)


@pytest.mark.parametrize("fold_into_linears", [False, True])
@pytest.mark.parametrize("overrides", VARIANTS)
def test_smoothing_leaves_the_float_model_unchanged(overrides: dict, fold_into_linears: bool) -> None:
    model, ids = tiny_model(**overrides), windows()
    with torch.no_grad():
        expected = model(ids)
    applied = smooth_model(model, activation_scales(model, ids, progress=False), fold_into_linears=fold_into_linears)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, rtol=0, atol=1e-5)
    folded = {n.split(".", 2)[-1] for n in applied}
    gated, mha = "mlp" not in overrides or overrides["mlp"] == "geglu", "n_kv_heads" not in overrides
    extra = ({"mlp.up_proj"} if gated else set()) | ({"attn.v_proj"} if mha else set())
    assert folded == {"attn_norm", "mlp_norm"} | (extra if fold_into_linears else set())
    assert all(s.min() >= 1e-5 and (s != 1).any() for s in applied.values())


# ----------------------------------------------------------------------------------------------------- W8A8Linear


def test_w8a8_linear_equals_the_reference_fake_quantization() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 40)
    with torch.no_grad():
        lin.weight[3] *= 5  # rows of different ranges
        lin.weight[:, 9] *= 4
    x = outlier_features((2, 7, 64), (1, 30))
    q = W8A8Linear.from_linear(lin)
    w = lin.weight.detach()
    ref_step = w.abs().max(dim=-1, keepdim=True)[0].clamp(min=1e-5) / 127
    assert q.codes.dtype == torch.int8 and torch.equal(q.codes, (w / ref_step).round().to(torch.int8))
    assert torch.equal(q.weight, ref_quantize_weight_per_channel_absmax(w.clone()))
    y = q(x)
    assert y.shape == (2, 7, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref_w8a8(lin, x), rtol=1e-5, atol=1e-5)
    # the int32 product is exact: the output is the reference's codes multiplied exactly, rescaled once
    x2 = x.reshape(-1, 64)
    s_x = x2.abs().max(dim=-1, keepdim=True)[0].clamp(min=1e-5) / 127
    exact = ((x2 / s_x).round().double() @ q.codes.double().T) * s_x.double() * ref_step.double().T
    torch.testing.assert_close(y.reshape(-1, 40).double(), exact + lin.bias.double(), rtol=1e-6, atol=1e-6)
    assert torch.equal(w8a8_matmul(x, q.codes, q.weight_scale, q.bias), y)
    assert q.nbytes() == 64 * 40 + 4 * 40
    no_bias = nn.Linear(64, 40, bias=False)
    torch.testing.assert_close(W8A8Linear.from_linear(no_bias)(x), ref_w8a8(no_bias, x), rtol=1e-5, atol=1e-5)


def test_w8a8_linear_keeps_the_input_dtype_and_passes_the_gradient_straight_through() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(32, 16)
    q = W8A8Linear.from_linear(lin)
    x = torch.randn(3, 32, requires_grad=True)
    grad = torch.randn(3, 16)
    q(x).backward(grad)
    torch.testing.assert_close(x.grad, grad @ q.weight, rtol=1e-6, atol=1e-6)
    assert all(not p.requires_grad for p in q.parameters())
    xb = torch.randn(4, 32).to(torch.bfloat16)
    yb = q(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ref_w8a8(lin, xb.float()), rtol=2e-2, atol=2e-2)
    zeros = q(torch.zeros(2, 32))  # an all-zero token: codes 0, only the bias
    assert torch.equal(zeros, lin.bias.detach().expand(2, 16))


@pytest.mark.slow
def test_w8a8_linear_under_torch_compile() -> None:
    torch.manual_seed(2)
    q = W8A8Linear.from_linear(nn.Linear(32, 24))
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(torch.compile(q, fullgraph=True)(x), q(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------- outliers


@torch.no_grad()
def test_smoothing_lowers_the_w8a8_error_on_outlier_channels() -> None:
    # one layer: a norm's outlier channels dominate each token's absmax
    torch.manual_seed(4)
    x = outlier_features((200, 64), (4, 21, 50), seed=5)
    fcs = [nn.Linear(64, 48) for _ in range(3)]
    reference = [fc(x) for fc in fcs]
    plain = sum((W8A8Linear.from_linear(fc)(x) - r).pow(2).mean() for fc, r in zip(fcs, reference, strict=True))
    s = smoothing_scales(x.abs().amax(dim=0), fcs, 0.5)
    smoothed = [copy.deepcopy(fc) for fc in fcs]
    for fc in smoothed:
        fc.weight.mul_(s)
    err = sum((W8A8Linear.from_linear(fc)(x / s) - r).pow(2).mean() for fc, r in zip(smoothed, reference, strict=True))
    assert err < 0.2 * plain, (err, plain)
    # a model: the smoothed linears (q/k/v, gate/up) in W8A8, the rest float
    model, held_out = tiny_model(), windows(4, 24, seed=9)
    where = ["blocks.*.attn.[qkv]_proj", "blocks.*.mlp.gate_proj", "blocks.*.mlp.up_proj"]
    expected = model(held_out)
    unsmoothed = copy.deepcopy(model)
    swap_modules(unsmoothed, where, lambda _, old: W8A8Linear.from_linear(old))
    quantized = copy.deepcopy(model)
    quantize_model_smoothquant(quantized, windows(), where=where, progress=False)
    errors = [(m(held_out) - expected).pow(2).mean().item() for m in (quantized, unsmoothed)]
    assert errors[0] < 0.3 * errors[1], errors


@pytest.mark.parametrize("overrides", VARIANTS)
def test_quantize_model_swaps_the_block_linears_and_keeps_logits_close(overrides: dict) -> None:
    model, ids = tiny_model(**overrides), windows(4, 24, seed=9)
    float_model = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(ids)
        result = quantize_model_smoothquant(model, windows(), progress=False)
        names = block_linears(float_model)
        assert sorted(result.swap.replaced) == names and sorted(result.act_scales) == names
        assert all(isinstance(model.get_submodule(n), W8A8Linear) for n in names)
        assert all(model.get_submodule(n).activations == "per_token" for n in names) and not result.input_scales
        assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.equal(float_model.lm_head.weight)
        logits = model(ids)
        assert (logits - expected).norm() / expected.norm() < 0.05
        torch.testing.assert_close(result.swap.restore()(ids), expected, rtol=0, atol=1e-5)  # smoothed float model


def test_where_o_proj_alone_quantizes_without_smoothing() -> None:
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    result = quantize_model_smoothquant(model, windows(2, 8), where="blocks.*.attn.o_proj", progress=False)
    assert sorted(result.swap.replaced) == ["blocks.0.attn.o_proj", "blocks.1.attn.o_proj"] and not result.smoothing
    result.swap.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------------- static


def test_static_scales_are_the_calibrated_absmax_over_127_and_round_trip() -> None:
    model, calib = tiny_model(), windows()
    smoothed = copy.deepcopy(model)
    result = quantize_model_smoothquant(model, calib, activations="per_tensor", progress=False)
    smooth_model(smoothed, result.act_scales)
    absmax = {n: a.amax() for n, a in ref_get_act_scales(smoothed, calib).items() if n.startswith("blocks.")}
    assert sorted(result.input_scales) == sorted(absmax) == block_linears(smoothed)
    for name, a in absmax.items():
        layer = model.get_submodule(name)
        assert layer.activations == "per_tensor" and layer.input_scale.shape == ()
        torch.testing.assert_close(layer.input_scale, a / 127, rtol=1e-5, atol=0)
        torch.testing.assert_close(result.input_scales[name], a / 127, rtol=1e-5, atol=0)
    assert static_input_scales(smoothed, calib, "blocks.0.attn.q_proj", progress=False).keys() == {
        "blocks.0.attn.q_proj"}  # fmt: skip
    # one layer: the fixed scale, values beyond the calibrated range clip to ±127
    torch.manual_seed(3)
    lin = nn.Linear(32, 16)
    x = torch.randn(6, 32)
    scale = x.abs().amax() / 127
    q = W8A8Linear.from_linear(lin, "per_tensor", scale)
    for inputs in (x, 3 * x):
        x_hat = torch.clamp(torch.round(inputs / scale), -127, 127) * scale
        w_hat = ref_quantize_weight_per_channel_absmax(lin.weight.detach().clone())
        torch.testing.assert_close(q(inputs), F.linear(x_hat, w_hat, lin.bias), rtol=1e-5, atol=1e-5)
    assert (x - torch.round(x / scale) * scale).abs().max() <= scale / 2 * (1 + 1e-5)
    # the state dict round-trips through bytes into a fresh module
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    fresh = W8A8Linear.from_linear(nn.Linear(32, 16), "per_tensor", 1.0)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert torch.equal(fresh.input_scale, q.input_scale) and torch.equal(fresh.codes, q.codes)
    assert torch.equal(fresh(3 * x), q(3 * x))


# ----------------------------------------------------------------------------------------------------- refusals


@pytest.fixture
def no_work(monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("calibration started before the arguments were checked")

    monkeypatch.setattr(smoothquant, "for_each_block", fail)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"alpha": -0.1}, r"alpha=-0.1 must be a number in \[0, 1\]"),
    ({"alpha": 1.5}, "alpha=1.5"),
    ({"alpha": float("nan")}, "alpha=nan"),
    ({"alpha": True}, "alpha=True"),
    ({"alpha": "0.5"}, "alpha='0.5'"),
    ({"activations": "per_channel"}, "activations='per_channel' must be one of per_token, per_tensor"),
    ({"where": "lm_head"}, "SmoothQuant quantizes the projections inside the blocks; lm_head is outside them"),
    ({"where": "blocks.*.attn_norm"}, "selects no linear layer"),
])  # fmt: skip
def test_bad_arguments_are_refused_before_any_work(no_work, kwargs: dict, message: str) -> None:
    model = tiny_model(outliers=False)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(QuantError, match=message):
        quantize_model_smoothquant(model, windows(2, 8), **kwargs, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("overrides", "message"), [
    ({"moe": MoEConfig(n_experts=4, top_k=2, d_expert=32)}, r"SmoothQuant: blocks.0.mlp of the Transformer is a MoE"),
    ({"mla": MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)},
     r"blocks.0.attn of the Transformer is a LatentAttention \(multi-head latent attention"),
])  # fmt: skip
def test_unsupported_architectures_are_refused_before_any_work(no_work, overrides: dict, message: str) -> None:
    model = tiny_model(outliers=False, **overrides)
    with pytest.raises(QuantError, match=message):
        quantize_model_smoothquant(model, windows(2, 8), progress=False)


def test_a_shared_norm_and_bad_smoothing_inputs_are_refused(no_work) -> None:
    model = tiny_model(outliers=False)
    model.blocks[1].mlp_norm = model.blocks[0].mlp_norm  # one norm read by two blocks: a fold would change both
    with pytest.raises(QuantError, match=r"blocks\.0\.mlp_norm\.weight of the Transformer is shared"):
        quantize_model_smoothquant(model, windows(2, 8), progress=False)
    with pytest.raises(QuantError, match="not an lmforge Transformer"):
        quantize_model_smoothquant(nn.Sequential(nn.Linear(4, 4)), windows(2, 8), progress=False)
    model = tiny_model(outliers=False)
    before = copy.deepcopy(model.state_dict())
    good = {"blocks.0.attn.q_proj": torch.ones(64)}
    for act, kwargs, message in (
        (good, {"alpha": 2.0}, "alpha=2.0"),
        ({}, {}, "got no activation scales"),
        ({"blocks.0.attn.q_proj": torch.ones(32)}, {}, "32 activation scales for a linear with 64 inputs"),
        ({"blocks.0.attn.q_proj": torch.full((64,), float("nan"))}, {}, "finite and >= 0"),
        ({"blocks.0.attn.o_proj": torch.ones(64)}, {}, "need fold_into_linears=True"),
        ({"lm_head": torch.ones(64)}, {}, "lm_head is outside them"),
    ):
        with pytest.raises(QuantError, match=message):
            smooth_model(model, act, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(QuantError, match="lm_head is outside them"):
        activation_scales(model, windows(2, 8), "lm_head", progress=False)


def test_w8a8_linear_refuses_bad_modes_and_scales() -> None:
    lin = nn.Linear(8, 4)
    with pytest.raises(QuantError, match="activations='per_row' must be one of"):
        W8A8Linear.from_linear(lin, "per_row")
    with pytest.raises(QuantError, match="'per_tensor' needs a calibrated input_scale"):
        W8A8Linear.from_linear(lin, "per_tensor")
    with pytest.raises(QuantError, match="'per_token' takes no input_scale"):
        W8A8Linear.from_linear(lin, "per_token", 0.1)
    with pytest.raises(QuantError, match="input_scale must be one finite number >= 0"):
        W8A8Linear.from_linear(lin, "per_tensor", torch.ones(2))
    with pytest.raises(QuantError, match="2-D int8 codes"):
        W8A8Linear(torch.zeros(4, 8), torch.ones(4))
