"""Quantization-aware training (quant/qat.py): the fake-quantized forward against primitives' quantize -> dequantize
(exactly), the straight-through gradient against a mask computed here and against PyTorch's own fake quantization
(`torch.fake_quantize_per_tensor_affine` / `_per_channel_affine`, an independent implementation: identical outputs
and gradients for the same scales and zero points, clipping included), FakeQuantLinear's forward and gradients,
prepare_qat / convert_qat on a tiny Transformer (parameters shared, codes re-found from the baked weights), and QAT
fine-tuning against round-to-nearest after the same amount of float training.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge import ModelConfig, Transformer
from lmforge.configfile import ConfigError
from lmforge.model.surgery import SurgeryError
from lmforge.quant.primitives import (
    quantize_asymmetric,
    quantize_per_token,
    quantize_symmetric,
    top_code,
)
from lmforge.quant.qat import FakeQuantLinear, convert_qat, fake_quantize, fake_quantize_per_token, prepare_qat

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "shakespeare"
LAYOUTS = [{}, {"axis": 0}, {"axis": 1}, {"group_size": 16}]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_model(seed: int = 0, seq: int = 32) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=seq)
    return Transformer(cfg)


# ----------------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_forward_is_primitives_quantize_dequantize(bits, layout, symmetric) -> None:
    x = randn(8, 64) * 2
    q = (quantize_symmetric if symmetric else quantize_asymmetric)(x, bits, **layout)
    y = fake_quantize(x, q.scale, q.zero_point, bits, **layout)
    assert torch.equal(y, q.dequantize())


def test_forward_keeps_the_dtype_and_clips_beyond_a_static_range() -> None:
    x = torch.tensor([-3.0, -0.26, 0.0, 0.24, 0.5, 2.0])
    y = fake_quantize(x, torch.tensor(0.1), None, 4)  # codes -7..7: the range is [-0.7, 0.7]
    torch.testing.assert_close(y, torch.tensor([-0.7, -0.3, 0.0, 0.2, 0.5, 0.7]), rtol=0, atol=1e-7)
    y = fake_quantize(x.bfloat16(), torch.tensor(0.1), torch.tensor(8, dtype=torch.uint8), 4)  # 0..15: [-0.8, 0.7]
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), torch.tensor([-0.8, -0.3, 0.0, 0.2, 0.5, 0.7]), rtol=0, atol=4e-3)


# ----------------------------------------------------------------------------------------------------- STE


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_gradient_is_one_inside_the_range_and_zero_where_clipped(symmetric) -> None:
    x = (randn(6, 40) * 2).requires_grad_()
    q = (quantize_symmetric if symmetric else quantize_asymmetric)(x, 4, axis=0)
    scale = q.scale * torch.linspace(0.3, 1.0, 6)  # static scales narrower than the data: clipping
    y = fake_quantize(x, scale, q.zero_point, 4, axis=0)
    g = randn(6, 40, seed=1)
    y.backward(g)
    # reference mask in float64: the code before clamping lies on the grid
    r = torch.round(x.detach().double() / scale.double()[:, None])
    if symmetric:
        inside = (r >= -7) & (r <= 7)
    else:
        r = r + q.zero_point.double()[:, None]
        inside = (r >= 0) & (r <= 15)
    assert 0.1 < (~inside).float().mean() < 0.9  # both cases occur
    assert torch.equal(x.grad, g * inside)


@pytest.mark.parametrize("bits", [8, 4])
def test_per_tensor_matches_torch_fake_quantize(bits) -> None:
    x = randn(16, 48) * 3
    q = quantize_asymmetric(x, bits)
    scale = q.scale * 0.5  # half the range: a quarter of the values clip
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = fake_quantize(ours, scale, q.zero_point, bits)
    y_ref = torch.fake_quantize_per_tensor_affine(ref, scale.item(), int(q.zero_point), 0, top_code(bits))
    g = randn(16, 48, seed=2)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(y, y_ref)
    assert torch.equal(ours.grad, ref.grad) and (ref.grad == 0).any()


@pytest.mark.parametrize(
    ("bits", "symmetric", "layout"),
    [(8, False, {"axis": 0}), (8, False, {"axis": 1}), (8, False, {"group_size": 16}), (4, True, {"axis": 0}),
     (4, False, {"group_size": 8}), (8, True, {"group_size": 16})],
    ids=str,
)  # fmt: skip
def test_per_channel_and_per_group_match_torch_fake_quantize(bits, symmetric, layout) -> None:
    x = randn(12, 64, seed=3) * 2
    q = (quantize_symmetric if symmetric else quantize_asymmetric)(x, bits, **layout)
    shrink = torch.linspace(0.4, 1.0, q.scale.numel()).reshape(q.scale.shape)
    scale = q.scale * shrink
    zero = torch.zeros(q.scale.shape, dtype=torch.int32) if symmetric else q.zero_point.int()
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, top_code(bits))
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = fake_quantize(ours, scale, q.zero_point, bits, **layout)
    if "group_size" in layout:  # a group is a channel of the (rows * groups, group_size) view
        g = layout["group_size"]
        y_ref = torch.fake_quantize_per_channel_affine(ref.reshape(-1, g), scale.reshape(-1), zero.reshape(-1), 0, lo,
                                                       hi).reshape(x.shape)  # fmt: skip
    else:
        y_ref = torch.fake_quantize_per_channel_affine(ref, scale, zero, layout["axis"], lo, hi)
    grad = randn(12, 64, seed=4)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(y, y_ref)
    assert torch.equal(ours.grad, ref.grad) and (ref.grad == 0).any()


def test_scale_and_zero_point_get_no_gradient_and_bad_arguments_are_refused() -> None:
    x = randn(4, 8).requires_grad_()
    scale = torch.full((4,), 0.05, requires_grad=True)
    fake_quantize(x, scale, None, 8, axis=0).sum().backward()
    assert scale.grad is None and x.grad is not None
    with pytest.raises(ConfigError, match="scale of shape"):
        fake_quantize(x, torch.ones(8), None, 8, axis=0)
    with pytest.raises(ConfigError, match="group_size"):
        fake_quantize(x, torch.ones(4, 1), None, 8, group_size=3)
    with pytest.raises(ConfigError, match="bits"):
        fake_quantize(x, torch.tensor(1.0), None, 9)
    with pytest.raises(TypeError):
        fake_quantize(torch.ones(3, dtype=torch.int32), torch.tensor(1.0))


# ----------------------------------------------------------------------------------------------------- the layer


@pytest.mark.parametrize(("group_size", "symmetric"), [(None, True), (16, True), (32, False)])
def test_fake_quant_linear_forward_and_latent_weight_gradient(group_size, symmetric) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    layer = FakeQuantLinear.from_linear(lin, bits=4, group_size=group_size, symmetric=symmetric, activations=8)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    layout = {"axis": 0} if group_size is None else {"group_size": group_size}
    q_w = (quantize_symmetric if symmetric else quantize_asymmetric)(lin.weight, 4, **layout)
    x = (randn(3, 5, 64) * 4).requires_grad_()
    x_hat = quantize_per_token(x.detach()).dequantize()
    y = layer(x)
    assert torch.equal(y, F.linear(x_hat, q_w.dequantize(), lin.bias))
    assert torch.equal(layer.quantized().dequantize(), q_w.dequantize())
    assert torch.equal(layer.quantized().codes(), q_w.codes())
    # STE: the latent weight gets the gradient the quantized weight would get, the input the one x̂ would get
    g = randn(3, 5, 24, seed=5)
    y.backward(g)
    w_hat, xh = q_w.dequantize().requires_grad_(), x_hat.clone().requires_grad_()
    F.linear(xh, w_hat, lin.bias).backward(g)
    torch.testing.assert_close(lin.weight.grad, w_hat.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, xh.grad, rtol=1e-6, atol=1e-6)


def test_per_token_activation_fake_quant_is_primitives() -> None:
    x = randn(2, 7, 32) * 5
    x[0, 3] = 0.0  # an all-zero token stays zero
    assert torch.equal(fake_quantize_per_token(x), quantize_per_token(x).dequantize())
    assert torch.equal(fake_quantize_per_token(x, 4), quantize_symmetric(x, 4, group_size=32).dequantize())


def test_prepare_qat_swaps_block_linears_and_shares_parameters() -> None:
    model = tiny_model()
    before = dict(model.named_parameters())
    ids = torch.randint(0, 256, (2, 16))
    swap = prepare_qat(model, bits=8, group_size=16)
    swapped = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    assert len(swapped) == 2 * 7 and all(n.startswith("blocks.") for n in swapped)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, FakeQuantLinear)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    with torch.no_grad():
        y = model(ids)
    swap.restore()
    with torch.no_grad():
        y_float = model(ids)
    assert 0 < (y - y_float).abs().max() < 0.05  # 8 bits: close to float, but not equal
    with pytest.raises(ConfigError, match=r"blocks\.0\.attn\.q_proj"):  # d_model 64 is no multiple of 48
        prepare_qat(model, bits=4, group_size=48)
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())  # nothing was swapped


def test_convert_qat_bakes_the_grid_weights_into_plain_linears() -> None:
    model = tiny_model()
    prepare_qat(model, bits=4, group_size=32, symmetric=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    codes = {n: m.quantized() for n, m in layers.items()}
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        y_qat = model(ids)
    assert convert_qat(model) is model
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids), y_qat)
    for name, q in codes.items():
        w = model.get_submodule(name).weight
        assert type(model.get_submodule(name)) is nn.Linear and torch.equal(w, q.dequantize())
        again = quantize_asymmetric(w.detach(), 4, group_size=32)  # a later quantizer re-finds the codes
        assert torch.equal(again.codes(), q.codes()) and torch.equal(again.zero_point, q.zero_point)
        torch.testing.assert_close(again.scale, q.scale, rtol=1e-6, atol=0)
    with pytest.raises(SurgeryError):
        convert_qat(model)


# ----------------------------------------------------------------------------------------------------- training


SEQ = 64


def _batch(data: torch.Tensor, step: int, rows: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - SEQ - 1, (rows,), generator=g)
    r = torch.stack([data[s : s + SEQ + 1] for s in starts.tolist()])
    return r[:, :-1], r[:, 1:]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _train(model: nn.Module, data: torch.Tensor, steps: int, lr: float, start: int = 0) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for s in range(steps):
        loss = _loss(model, *_batch(data, start + s))
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def _val(model: nn.Module, data: torch.Tensor) -> float:
    return sum(_loss(model, *_batch(data, i, rows=32, seed=7)).item() for i in range(4)) / 4


def test_qat_fine_tuning_beats_round_to_nearest_after_the_same_training() -> None:
    """A byte-level model trained 100 steps in float, then 30 more steps two ways: in float, then 2-bit RTN; or with
    2-bit fake quantization (QAT), then converted. QAT must recover most of what RTN loses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and steadier on a busy machine
    try:
        ids = torch.tensor(list((DATA / "hamlet_gut.txt").read_bytes()[:200_000]))
        split = len(ids) * 9 // 10
        train, val = ids[:split], ids[split:]
        base = tiny_model(seq=SEQ)
        _train(base, train, 100, 3e-3)
        rtn0 = copy.deepcopy(base)
        prepare_qat(rtn0, bits=2, group_size=16)

        float_more = copy.deepcopy(base)
        _train(float_more, train, 30, 1e-3, start=100)
        float_loss = _val(float_more, val)
        prepare_qat(float_more, bits=2, group_size=16)
        rtn_loss = _val(float_more, val)  # the fake-quantized forward is RTN of the float weights

        qat = copy.deepcopy(base)
        prepare_qat(qat, bits=2, group_size=16)
        qat_start = _val(qat, val)
        _train(qat, train, 30, 1e-3, start=100)
        qat_loss = _val(convert_qat(qat), val)
    finally:
        torch.set_num_threads(threads)
    assert qat_start == _val(rtn0, val)
    assert qat_loss < qat_start - 0.05  # QAT lowers the fake-quantized loss
    assert rtn_loss - float_loss > 0.03  # 2 bits cost something after float training ...
    assert qat_loss < rtn_loss - 0.5 * (rtn_loss - float_loss)  # ... and QAT wins back more than half of it


def test_quantized_needs_a_stored_width() -> None:
    layer = FakeQuantLinear(nn.Parameter(randn(4, 8)), bits=3, group_size=None)
    with pytest.raises(ConfigError, match="bits"):
        layer.quantized()
    scale, _ = layer.weight_qparams()
    assert torch.equal(layer.fake_quantized_weight(), fake_quantize(layer.weight, scale, None, 3, axis=0))
    torch.testing.assert_close(scale, layer.weight.detach().abs().amax(1) / 3, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="activations"):
        FakeQuantLinear(nn.Parameter(randn(4, 8)), group_size=None, activations=1)
