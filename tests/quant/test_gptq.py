"""GPTQ (quant/gptq.py) against an independent float64 reference written here: the paper's Algorithm 1 column by
column over the whole matrix with the explicit inverse Hessian and its rank-one elimination (OBS, the paper's eq. 2-3
and Lemma 1) instead of the Cholesky factor and lazy blocks, on the GPTQ repository's quantization grid (quant.py
`find_params` / `quantize`) and its group, act-order and static-group rules. Plus: GPTQ against round-to-nearest on
the layer objective, the loss as the damped objective, the Hessian accumulator, dead inputs, bad inputs, and
gptq_quantize_model on a tiny Transformer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from lmforge import ModelConfig, Transformer
from lmforge.quant.calibration import calibration_windows
from lmforge.quant.gptq import GPTQResult, HessianAccumulator, gptq_quantize, gptq_quantize_model
from lmforge.quant.primitives import QuantError, quantize_asymmetric

# ----------------------------------------------------------------------------------------------------- reference


def ref_grid(w: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """GPTQ's quant.py Quantizer.find_params(weight=True, perchannel=True) per row of w, float64: (scale, zero)."""
    maxq = 2**bits - 1
    xmin = torch.minimum(w.min(1).values, torch.zeros(w.shape[0], dtype=w.dtype))
    xmax = torch.maximum(w.max(1).values, torch.zeros(w.shape[0], dtype=w.dtype))
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1.0, 1.0
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def ref_quant(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """quant.py's quantize: (dequantized value, unsigned code 0..2^bits-1)."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return scale * (q - zero), q


@dataclass
class Reference:
    q: Tensor  # (out, in) dequantized Q
    codes: Tensor  # (out, in) unsigned codes 0..2^bits-1, as float64
    g_idx: Tensor
    loss: float
    order: list[int]  # the processing order of the columns
    tie: Tensor  # (out, in) bool: w / s was within 1e-9 of a rounding midpoint (the code is then up to rounding)


def reference_gptq(weight: Tensor, hessian: Tensor, bits: int = 4, group_size: int | None = 128, damp: float = 0.01,
                   act_order: bool = False, static_groups: bool = False, sym: bool = False) -> Reference:  # fmt: skip
    """Algorithm 1, unoptimized, float64, in original column order.

    Each step quantizes the next column q of the remaining set F and moves the others by the OBS update
    δ_F = -(w_q - quant(w_q)) / [H_F⁻¹]_qq · (H_F⁻¹)_{:,q}, then removes q from the inverse by Gaussian elimination,
    H_{F-q}⁻¹ = H_F⁻¹ - H_F⁻¹_{:,q} H_F⁻¹_{q,:} / [H_F⁻¹]_qq (whose row and column q are then 0)."""
    W, H = weight.double().clone(), hessian.double().clone()
    n = W.shape[1]
    gs = n if group_size is None else group_size
    if group_size is None:
        fixed = ref_grid(W, bits, sym)  # once, before the dead columns are zeroed
    dead = torch.diag(H) == 0
    for j in range(n):
        if dead[j]:
            H[j, j] = 1.0
            W[:, j] = 0.0
    if static_groups:
        groups = [ref_grid(W[:, k : k + gs], bits, sym) for k in range(0, n, gs)]
    order = sorted(range(n), key=lambda j: -H[j, j].item()) if act_order else list(range(n))
    W, H = W[:, order], H[order][:, order]
    H = H + damp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q, codes, loss = torch.zeros_like(W), torch.zeros_like(W), 0.0
    tie = torch.zeros_like(W, dtype=torch.bool)
    g_idx = torch.zeros(n, dtype=torch.long)
    for p in range(n):
        if group_size is None:
            params = fixed
        elif static_groups:
            params = groups[order[p] // gs]
        elif p % gs == 0:
            params = ref_grid(W[:, p : p + gs], bits, sym)
        g_idx[order[p]] = 0 if group_size is None else order[p] // gs if static_groups else p // gs
        Q[:, p], codes[:, p] = ref_quant(W[:, p], *params, bits)
        tie[:, p] = ((W[:, p] / params[0]).frac().abs() - 0.5).abs() < 1e-9
        d = Hinv[p, p]
        err = W[:, p] - Q[:, p]
        loss += (err**2).sum().item() / d.item() / 2
        W -= torch.outer(err / d, Hinv[p])  # Hinv[p, :p] = 0: only the remaining columns move
        Hinv = Hinv - torch.outer(Hinv[:, p], Hinv[p]) / d
    inverse = torch.argsort(torch.tensor(order))
    return Reference(Q[:, inverse], codes[:, inverse], g_idx, loss, order, tie[:, inverse])


def assert_matches(r: GPTQResult, ref: Reference) -> None:
    """>= 99.9% of the codes equal and the weight within 1e-5 relative, except in a row where the reference sat on
    an exact rounding tie: the symmetric grid puts a group's negative extreme -absmax at -(2^(b-1) - 1/2) steps
    (-7.5 at 4 bits), so when a group's first column holds it, the last bits of float64 (in which the two
    computations differ, summing the updates in other orders) pick the code -8 or -7 and the row's errors then part
    ways (which rows do depends on the machine's BLAS: on one CPU one row of 64, on another two). Such a row must
    first differ exactly on a tie, at most one row in 32 may, and every other row must match code for code."""
    same = unsigned_codes(r) == ref.codes
    parted = ~same.all(dim=1)
    for row in parted.nonzero().flatten().tolist():
        first = next(c for c in ref.order if not same[row, c])
        assert ref.tie[row, first], f"row {row} differs first at column {first}, not on a rounding tie"
    assert parted.sum().item() <= max(1, r.codes.shape[0] // 32)
    assert relative(r.weight[~parted], ref.q[~parted]) < 1e-5
    assert r.loss == pytest.approx(ref.loss, rel=1e-5 if not parted.any() else 1e-3)
    assert torch.equal(r.g_idx, ref.g_idx)


def ref_rtn(weight: Tensor, bits: int, group_size: int, sym: bool = False) -> Tensor:
    """Round to nearest on the same grid: every group from the original weights, no error feedback."""
    W = weight.double()
    out = torch.empty_like(W)
    for k in range(0, W.shape[1], group_size):
        scale, zero = ref_grid(W[:, k : k + group_size], bits, sym)
        out[:, k : k + group_size] = ref_quant(W[:, k : k + group_size], scale[:, None], zero[:, None], bits)[0]
    return out


# ----------------------------------------------------------------------------------------------------- data


def correlated_hessian(n: int, tokens: int | None = None, seed: int = 0, dead: tuple[int, ...] = ()) -> Tensor:
    """2 X Xᵀ / m for m correlated activations, as a layer's inputs are: a rank-n/8 signal plus 30% isotropic noise,
    with per-feature scales spread over a decade in random order (some inputs far more active), and zero columns
    for `dead` inputs. float64."""
    g = torch.Generator().manual_seed(seed)
    m, r = tokens or 2 * n, max(n // 8, 1)
    f64 = dict(generator=g, dtype=torch.float64)
    x = torch.randn(m, r, **f64) @ torch.randn(r, n, **f64) / math.sqrt(r) + 0.3 * torch.randn(m, n, **f64)
    x = x * torch.logspace(-0.5, 0.5, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    x[:, list(dead)] = 0.0
    return 2 * x.T @ x / m


def random_weight(out_features: int, in_features: int, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g, dtype=torch.float64) * 0.02


def unsigned_codes(r: GPTQResult) -> Tensor:
    return r.codes.double() + (2 ** (r.bits - 1) if r.zero_point is None else 0)


def objective(weight: Tensor, q: Tensor, hessian: Tensor) -> float:
    d = (weight.double() - q.double()).T
    return torch.einsum("io,ij,jo->", d, hessian.double(), d).item()


def relative(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CASES = {
    "per-channel": dict(shape=(64, 256), group_size=None),
    "per-channel, 3 bits, act-order": dict(shape=(64, 256), group_size=None, bits=3, act_order=True),
    "group 128": dict(shape=(96, 384), group_size=128),
    "group 128, act-order": dict(shape=(96, 384), group_size=128, act_order=True),
    "group 128, act-order, static groups": dict(shape=(96, 384), group_size=128, act_order=True, static_groups=True),
    "group 128, static groups": dict(shape=(96, 384), group_size=128, static_groups=True),
    "group 128, symmetric": dict(shape=(96, 384), group_size=128, symmetric=True),
    "group 64, symmetric, act-order": dict(shape=(64, 256), group_size=64, symmetric=True, act_order=True),
    "group 128, 3 bits": dict(shape=(96, 384), group_size=128, bits=3),
    "group 128, 8 bits": dict(shape=(96, 384), group_size=128, bits=8),
    "group 32, 2 bits": dict(shape=(64, 256), group_size=32, bits=2),
    "group 128, block 48": dict(shape=(96, 384), group_size=128, block_size=48),
    "group 128, block 48, act-order": dict(shape=(96, 384), group_size=128, block_size=48, act_order=True),
    "group 32, block 80": dict(shape=(64, 256), group_size=32, block_size=80),
}


# ----------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_codes_and_weights_equal_the_reference_algorithm(case: dict) -> None:
    case = dict(case)
    out_features, in_features = case.pop("shape")
    bits, group_size = case.get("bits", 4), case["group_size"]
    w, h = random_weight(out_features, in_features), correlated_hessian(in_features)
    r = gptq_quantize(w, h, **case)
    ref = reference_gptq(w, h, bits, group_size, act_order=case.get("act_order", False),
                         static_groups=case.get("static_groups", False), sym=case.get("symmetric", False))  # fmt: skip
    assert_matches(r, ref)
    n_groups = 1 if group_size is None else in_features // group_size
    assert r.scale.shape == (out_features, n_groups) and r.g_idx.dtype == torch.long
    assert (r.zero_point is None) == case.get("symmetric", False)
    assert r.codes.dtype == (torch.int8 if r.zero_point is None else torch.uint8)
    torch.testing.assert_close(r.dequantize(torch.float64), r.weight, rtol=0, atol=0)  # codes, scales, g_idx agree
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if r.zero_point is None else (0, 2**bits - 1)
    assert lo <= r.codes.min().item() and r.codes.max().item() <= hi


def test_float32_matches_the_float64_reference_closely() -> None:
    w, h = random_weight(96, 384), correlated_hessian(384)
    r = gptq_quantize(w.float(), h.float(), group_size=128, act_order=True)
    ref = reference_gptq(w, h, 4, 128, act_order=True)
    assert r.weight.dtype == torch.float32
    assert (unsigned_codes(r) == ref.codes).double().mean().item() >= 0.99
    assert r.loss == pytest.approx(ref.loss, rel=1e-2)
    assert objective(w, r.weight, h) == pytest.approx(objective(w, ref.q, h), rel=1e-2)


def test_loss_is_half_the_damped_objective() -> None:
    w, h = random_weight(64, 256), correlated_hessian(256)
    r = gptq_quantize(w, h, group_size=64, damp=0.05)
    damped = h + 0.05 * h.diagonal().mean() * torch.eye(256, dtype=h.dtype)
    assert r.loss == pytest.approx(objective(w, r.weight, damped) / 2, rel=1e-9)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_round_to_nearest_on_the_layer_objective(bits: int) -> None:
    w, h = random_weight(96, 384), correlated_hessian(384)
    rtn = objective(w, ref_rtn(w, bits, 128), h)
    for act_order in (False, True):
        gptq = objective(w, gptq_quantize(w, h, bits=bits, group_size=128, act_order=act_order).weight, h)
        assert gptq < 0.3 * rtn, (act_order, gptq / rtn)


def test_an_identity_hessian_is_round_to_nearest_on_the_primitives_grid() -> None:
    w = random_weight(32, 128)
    w[3, 32:64] = 0.0  # a group of zeros: the reference's s = 2 / 15, z = 8 (primitives: s = 0, z = 0), codes of 0.0
    r = gptq_quantize(w, torch.eye(128, dtype=torch.float64), group_size=32)
    torch.testing.assert_close(r.weight, ref_rtn(w, 4, 32), rtol=1e-12, atol=0)
    assert r.scale[3, 1].item() == pytest.approx(2 / 15) and r.zero_point[3, 1].item() == 8
    # in float32 the grid is quant/primitives.py's zero-point quantization, bit for bit (but for the zero group)
    w32 = w.float()
    r32, prim = gptq_quantize(w32, torch.eye(128), group_size=32), quantize_asymmetric(w32, 4, group_size=32)
    nonzero = torch.ones_like(w32, dtype=torch.bool)
    nonzero[3, 32:64] = False
    assert torch.equal(r32.codes[nonzero], prim.codes()[nonzero]) and torch.equal(r32.weight, prim.dequantize())
    keep = prim.scale > 0
    assert torch.equal(r32.scale[keep], prim.scale[keep]) and torch.equal(r32.zero_point[keep], prim.zero_point[keep])


# ----------------------------------------------------------------------------------------------------- Hessian


def test_hessian_accumulator_is_the_mean_over_every_token_added() -> None:
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randn(2, 7, 16, generator=g), torch.randn(5, 16, generator=g), torch.randn(1, 3, 16, generator=g),
              torch.randn(0, 16)]  # fmt: skip
    acc = HessianAccumulator(16)
    for c in chunks:
        acc.add(c)
    x = torch.cat([c.reshape(-1, 16) for c in chunks]).double()
    assert acc.tokens == 22 and acc.hessian.dtype == torch.float32
    torch.testing.assert_close(acc.hessian.double(), 2 * x.T @ x / 22, rtol=1e-5, atol=1e-6)
    with pytest.raises(QuantError, match=r"shape \(4, 8\) for a layer of 16 input features"):
        acc.add(torch.randn(4, 8))


def test_dead_inputs_are_zeroed_and_stay_finite() -> None:
    dead = (3, 100, 101, 200)
    w, h = random_weight(64, 256), correlated_hessian(256, dead=dead)
    for options in (dict(group_size=64), dict(group_size=64, act_order=True), dict(group_size=None, symmetric=True)):
        r = gptq_quantize(w, h, **options)
        assert torch.isfinite(r.weight).all() and math.isfinite(r.loss)
        assert (r.weight[:, list(dead)] == 0).all() and (r.weight[:, [0, 1, 255]] != 0).any()
        ref = reference_gptq(w, h, 4, options["group_size"], act_order=options.get("act_order", False),
                             sym=options.get("symmetric", False))  # fmt: skip
        assert_matches(r, ref)


def test_bad_inputs_are_refused_naming_the_value() -> None:
    w, h = random_weight(8, 64), correlated_hessian(64)
    for kwargs, message in [
        (dict(bits=1), "bits=1"),
        (dict(bits=9), "bits=9"),
        (dict(group_size=0), "group_size=0"),
        (dict(group_size=48), "group_size=48 must divide the 64 input features"),
        (dict(damp=-0.1), "damp=-0.1"),
        (dict(damp=float("nan")), "damp=nan"),
        (dict(block_size=0), "block_size=0"),
        (dict(group_size=None, static_groups=True), "static_groups needs groups"),
        (dict(group_size=-1, static_groups=True), "group_size=-1"),
    ]:
        with pytest.raises(QuantError, match=message):
            gptq_quantize(w, h, **kwargs)
    with pytest.raises(QuantError, match=r"hessian of shape \(63, 63\) for a weight of shape \(8, 64\)"):
        gptq_quantize(w, h[:63, :63], group_size=32)
    bad = w.clone()
    bad[2, 5] = float("nan")
    with pytest.raises(QuantError, match="weight has non-finite values"):
        gptq_quantize(bad, h, group_size=32)
    with pytest.raises(QuantError, match=r"2-D float tensor .* shape \(64,\)"):
        gptq_quantize(w[0], h, group_size=32)
    with pytest.raises(QuantError, match="damp=0 is not positive definite"):
        gptq_quantize(w, torch.ones(64, 64, dtype=torch.float64), group_size=32, damp=0)  # rank one


# ----------------------------------------------------------------------------------------------------- a model


def _model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
    return Transformer(cfg).eval()


def _rtn_model(model: Transformer, names: list[str], bits: int, group_size: int) -> Transformer:
    rtn = _model()
    rtn.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name in names:
            layer = rtn.get_submodule(name)
            layer.weight.copy_(ref_rtn(layer.weight, bits, group_size).float())
    return rtn


def test_gptq_quantize_model_quantizes_every_selected_linear_and_beats_rtn() -> None:
    bits, group_size = 3, 32
    ids = torch.randint(0, 96, (4000,), generator=torch.Generator().manual_seed(5))
    windows, held = calibration_windows(ids[:2000], 32, 32), calibration_windows(ids[2000:], 16, 32)
    model = _model()
    with torch.no_grad():
        reference = model(held)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    rtn = _rtn_model(model, linears, bits, group_size)
    original = {n: model.get_submodule(n).weight.clone() for n in linears}
    results = gptq_quantize_model(model, windows, bits=bits, group_size=group_size, act_order=True, progress=False)
    assert sorted(results) == sorted(linears)
    for name, r in results.items():
        weight = model.get_submodule(name).weight
        assert torch.equal(weight, r.weight) and not torch.equal(weight, original[name])
        for k in range(r.scale.shape[1]):  # each row of a group holds at most 2^bits values
            group = weight[:, r.g_idx == k]
            assert max(len(row.unique()) for row in group) <= 2**bits
    with torch.no_grad():
        gptq_logits, rtn_logits = model(held), rtn(held)
    assert torch.isfinite(gptq_logits).all()
    gptq_error = (gptq_logits - reference).pow(2).mean().item()
    rtn_error = (rtn_logits - reference).pow(2).mean().item()
    assert gptq_error < 0.8 * rtn_error, gptq_error / rtn_error


def test_gptq_quantize_model_follows_where_and_refuses_what_it_cannot_calibrate() -> None:
    model = _model()
    windows = calibration_windows(torch.randint(0, 96, (512,)), 4, 32)
    before = model.blocks[0].mlp.down_proj.weight.clone()
    results = gptq_quantize_model(model, windows, group_size=32, where="blocks.*.attn.*_proj", progress=False)
    assert results and all(".attn." in n for n in results)
    assert torch.equal(model.blocks[0].mlp.down_proj.weight, before)
    with pytest.raises(QuantError, match=r"selects no nn\.Linear"):
        gptq_quantize_model(model, windows, where="blocks.*.nothing", progress=False)
    with pytest.raises(QuantError, match=r"group_size=48 must divide the 64 input features of blocks\.0"):
        gptq_quantize_model(model, windows, group_size=48, progress=False)
