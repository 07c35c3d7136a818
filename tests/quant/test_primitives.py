"""Quantization primitives (quant/primitives.py) against closed forms: hand-computed codes of small tensors, the
round-trip bound |x - x̂| <= s/2 at each granularity with scales recomputed here from plain reductions, the int4 nibble
layout (bitsandbytes' order, as quant/nf4.py packs it), exact zeros, all-zero groups, errors that name the bad value,
per-token and calibrated (static) activation quantization, and the companded block-wise quantizer of 8-bit AdamW."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.configfile import ConfigError
from lmforge.quant.nf4 import pack_nibbles
from lmforge.quant.primitives import (
    QuantError,
    QuantizedTensor,
    RangeObserver,
    dequantize_blockwise_companded,
    pack_int4,
    quantize_asymmetric,
    quantize_blockwise_companded,
    quantize_per_token,
    quantize_static,
    quantize_symmetric,
    scale_shape,
    unpack_int4,
)
from lmforge.utils.errors import LmforgeError

EPS = torch.finfo(torch.float32).eps
QUANTIZERS = {"symmetric": quantize_symmetric, "asymmetric": quantize_asymmetric}


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def expected_stats(x: torch.Tensor, axis: int | None, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) over the elements sharing a scale, by plain reductions, in the scale's shape."""
    if group_size is not None:
        g = x.view(*x.shape[:-1], x.shape[-1] // group_size, group_size)
        return g.amin(-1), g.amax(-1)
    if axis is not None:
        others = tuple(d for d in range(x.ndim) if d != axis % x.ndim)
        return x.amin(others), x.amax(others)
    return x.min(), x.max()


def expand(scale: torch.Tensor, shape: torch.Size, axis: int | None, group_size: int | None) -> torch.Tensor:
    """A scale (or zero point) of `scale_shape` broadcast to every element it covers."""
    if group_size is not None:
        return scale.repeat_interleave(group_size, dim=-1)
    if axis is not None:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return scale.view(view).expand(shape)
    return scale.expand(shape)


# ----------------------------------------------------------------------------------------------------- hand examples


def test_symmetric_codes_by_hand() -> None:
    """absmax 127 -> s = 1: codes are round(x), half to even (0.5 -> 0, 2.5 -> 2), as torch.round rounds."""
    q = quantize_symmetric(torch.tensor([127.0, -3.4, 0.5, 2.5]), bits=8)
    assert q.codes().dtype == torch.int8 and q.codes().tolist() == [127, -3, 0, 2]
    assert q.scale.shape == () and q.scale.item() == 1.0 and q.zero_point is None
    assert q.dequantize().tolist() == [127.0, -3.0, 0.0, 2.0]

    q4 = quantize_symmetric(torch.tensor([7.0, -7.0, 1.5, -0.4]), bits=4)  # s = 7 / 7: codes -7..7
    assert q4.codes().tolist() == [7, -7, 2, 0] and q4.scale.item() == 1.0
    assert q4.data.tolist() == [0x79, 0x20]  # two's-complement nibbles, the first element high: 7, -7 = 0x9; 2, 0


def test_asymmetric_codes_by_hand() -> None:
    """[lo, hi] = [-5, 10] in 4 bits: s = 15 / 15 = 1, z = round(5 / 1) = 5, q = round(x / s) + z."""
    q = quantize_asymmetric(torch.tensor([-5.0, 0.0, 2.4, 10.0]), bits=4)
    assert q.codes().dtype == torch.uint8 and q.codes().tolist() == [0, 5, 7, 15]
    assert (q.scale.item(), q.zero_point.item()) == (1.0, 5)
    assert q.dequantize().tolist() == [-5.0, 0.0, 2.0, 10.0]

    q8 = quantize_asymmetric(torch.tensor([-55.0, 0.0, 3.6, 200.0]), bits=8)  # s = 255 / 255, z = 55
    assert q8.codes().tolist() == [0, 55, 59, 255] and (q8.scale.item(), q8.zero_point.item()) == (1.0, 55)

    positive = quantize_asymmetric(torch.tensor([1.0, 2.0, 3.0, 15.0]), bits=4)  # the range is widened to hold 0
    assert positive.codes().tolist() == [1, 2, 3, 15] and positive.zero_point.item() == 0


def test_per_channel_and_per_group_by_hand() -> None:
    x = torch.tensor([[1.0, -2.2, 0.6, 4.0], [-8.0, 3.0, 1.0, 0.0]])
    rows = quantize_symmetric(x, bits=4, axis=0)  # per row: absmax 4 and 8, s = absmax / 7
    assert rows.scale.tolist() == pytest.approx([4 / 7, 8 / 7])
    assert rows.codes().tolist() == [[2, -4, 1, 7], [-7, 3, 1, 0]]  # x · 7 / absmax: 1.75, -3.85, 1.05; 2.625, 0.875
    cols = quantize_symmetric(x, bits=4, axis=1)  # per column: absmax 8, 3, 1, 4
    assert cols.scale.tolist() == pytest.approx([8 / 7, 3 / 7, 1 / 7, 4 / 7])
    assert cols.codes().tolist() == [[1, -5, 4, 7], [-7, 7, 7, 0]]  # 0.875, -5.13, 4.2
    groups = quantize_symmetric(x, bits=4, group_size=2)  # groups of 2 along the last dim: absmax 2.2, 4, 8, 1
    assert groups.scale.shape == (2, 2)
    assert groups.scale.flatten().tolist() == pytest.approx([2.2 / 7, 4 / 7, 8 / 7, 1 / 7])
    assert groups.codes().tolist() == [[3, -7, 1, 7], [-7, 3, 7, 0]]  # 3.18, 1.05; 2.625


# ----------------------------------------------------------------------------------------------------- round trips

LAYOUTS = [
    ((64, 96), None, None),
    ((64, 96), 0, None),
    ((64, 96), 1, None),
    ((4, 6, 96), -2, None),
    ((64, 96), None, 32),
    ((4, 6, 256), None, 128),
]
LAYOUT_IDS = ["tensor", "channel0", "channel1", "channel-2", "group32", "group128"]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
@pytest.mark.parametrize(("shape", "axis", "group_size"), LAYOUTS, ids=LAYOUT_IDS)
def test_round_trip_within_half_a_step(shape, axis, group_size, kind: str, bits: int) -> None:
    x = randn(*shape) * torch.logspace(-2, 1, shape[-1])  # ranges that differ across channels and groups
    q = QUANTIZERS[kind](x, bits, axis=axis, group_size=group_size)
    lo, hi = expected_stats(x, axis, group_size)
    assert q.scale.shape == scale_shape(x.shape, axis, group_size) == lo.shape and q.scale.dtype == torch.float32
    if kind == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        torch.testing.assert_close(q.scale, torch.maximum(-lo, hi) / qmax, rtol=0, atol=0)
        assert q.zero_point is None and q.codes().abs().max() <= qmax
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        torch.testing.assert_close(q.scale, (hi - lo) / (2**bits - 1), rtol=0, atol=0)
        torch.testing.assert_close(q.zero_point, torch.round(-lo / q.scale).to(torch.uint8), rtol=0, atol=0)
        assert q.codes().dtype == torch.uint8 and q.codes().max() <= 2**bits - 1
    x_hat = q.dequantize()
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    step = expand(q.scale, x.shape, axis, group_size)
    error = (x - x_hat).abs()
    assert torch.all(error <= step / 2 + 2 * EPS * x.abs())
    assert error.max() > 0.4 * step.max()  # the bound is not vacuous


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
def test_bfloat16_input_returns_its_dtype(kind: str) -> None:
    x = randn(8, 64).bfloat16()
    q = QUANTIZERS[kind](x, 8, group_size=32)
    assert q.dtype == torch.bfloat16 and q.dequantize().dtype == torch.bfloat16
    reference = QUANTIZERS[kind](x.float(), 8, group_size=32)  # quantized from the same values, in float32
    assert torch.equal(q.codes(), reference.codes()) and torch.equal(q.scale, reference.scale)
    assert torch.equal(q.dequantize(torch.float32), reference.dequantize())


def test_zero_is_exact_in_asymmetric_quantization() -> None:
    x = randn(16, 64) + 1.5  # mostly positive groups, so the zero point is not at the edge
    x[:, ::7] = 0.0
    for bits in (4, 8):
        q = quantize_asymmetric(x, bits, group_size=16)
        x_hat = q.dequantize()
        assert torch.all(x_hat[:, ::7] == 0.0)
        assert torch.equal(q.codes()[:, ::7], expand(q.zero_point, x.shape, None, 16)[:, ::7])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
def test_all_zero_tensors_and_groups(kind: str, bits: int) -> None:
    q = QUANTIZERS[kind](torch.zeros(3, 8), bits)
    assert q.scale.item() == 0.0 and torch.all(q.dequantize() == 0)
    x = randn(4, 64)
    x[1, 32:] = 0.0  # one all-zero group
    x[2] = 0.0  # one all-zero row
    for layout in ({"group_size": 32}, {"axis": 0}):
        q = QUANTIZERS[kind](x, bits, **layout)
        x_hat = q.dequantize()
        assert not torch.isnan(x_hat).any() and torch.all(x_hat[2] == 0) and torch.all(x_hat[1, 32:] == 0)
        assert (q.scale == 0).sum() == (3 if "group_size" in layout else 1)  # groups: 1 + the row's 2
        if kind == "asymmetric":
            assert torch.all(q.zero_point[q.scale == 0] == 0)


# ----------------------------------------------------------------------------------------------------- int4 storage


def test_pack_int4_nibble_order_by_hand() -> None:
    """Byte j = n_{2j} << 4 | n_{2j+1}, the first element in the high nibble; an odd count padded with nibble 0."""
    signed = torch.tensor([1, -2, 7], dtype=torch.int8)
    assert pack_int4(signed).tolist() == [0x1E, 0x70]
    assert unpack_int4(pack_int4(signed), 3, signed=True).tolist() == [1, -2, 7]
    unsigned = torch.tensor([15, 0, 9, 3, 12], dtype=torch.uint8)
    assert pack_int4(unsigned).tolist() == [0xF0, 0x93, 0xC0]
    assert torch.equal(pack_int4(unsigned), pack_nibbles(unsigned, pad=0))  # the layout of bitsandbytes' 4-bit
    assert unpack_int4(torch.tensor([0x8F], dtype=torch.uint8), 2, signed=True).tolist() == [-8, -1]


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 1001])
def test_pack_int4_round_trip(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    signed = torch.randint(-8, 8, (n,), generator=g, dtype=torch.int8)
    unsigned = torch.randint(0, 16, (n,), generator=g, dtype=torch.uint8)
    for codes, is_signed in ((signed, True), (unsigned, False)):
        packed = pack_int4(codes)
        assert packed.dtype == torch.uint8 and packed.shape == ((n + 1) // 2,)
        out = unpack_int4(packed, n, signed=is_signed)
        assert out.dtype == codes.dtype and torch.equal(out, codes)
    assert torch.equal(unpack_int4(pack_int4(signed.view(1, n)), n, signed=True), signed)  # any shape, flattened


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
def test_int4_tensor_of_odd_size(kind: str) -> None:
    x = randn(5, 7)
    q4, q8 = QUANTIZERS[kind](x, 4, axis=0), QUANTIZERS[kind](x, 8, axis=0)
    assert q4.data.shape == (18,) and q8.data.shape == (5, 7)
    assert torch.equal(unpack_int4(q4.data, 35, signed=kind == "symmetric").view(5, 7), q4.codes())
    assert q4.codes().shape == (5, 7)


def test_nbytes() -> None:
    """Codes (1 byte, or half a byte in int4), float32 scales, uint8 zero points."""
    w = randn(16, 64)
    assert quantize_symmetric(w, 8, axis=0).nbytes() == 16 * 64 + 4 * 16
    assert quantize_symmetric(w, 4, group_size=32).nbytes() == 16 * 64 // 2 + 4 * 32
    assert quantize_asymmetric(w, 4, group_size=32).nbytes() == 16 * 64 // 2 + 4 * 32 + 32
    assert quantize_asymmetric(randn(3, 5), 4).nbytes() == 8 + 4 + 1


def test_quantized_tensor_is_a_plain_record() -> None:
    q = quantize_asymmetric(randn(4, 8), 4, group_size=4)
    copy = QuantizedTensor(q.data, q.scale, q.zero_point, q.bits, q.shape, q.dtype, q.axis, q.group_size)
    assert torch.equal(copy.dequantize(), q.dequantize()) and not copy.symmetric and q.group_size == 4


# ----------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
def test_bad_arguments_name_the_value(kind: str) -> None:
    quantize = QUANTIZERS[kind]
    x = randn(3, 100)
    with pytest.raises(ConfigError, match=r"invalid bits=3: must be 4 or 8"):
        quantize(x, 3)
    with pytest.raises(ConfigError, match=r"invalid group_size=48: must divide the last dimension \(100\)"):
        quantize(x, 8, group_size=48)
    with pytest.raises(ConfigError, match=r"invalid group_size=0"):
        quantize(x, 8, group_size=0)
    with pytest.raises(ConfigError, match=r"invalid group_size=1: must divide the last dimension \(none\)"):
        quantize(torch.tensor(1.0), 8, group_size=1)
    with pytest.raises(ConfigError, match=r"invalid axis=2: must be a dimension of a 2-D tensor"):
        quantize(x, 8, axis=2)
    with pytest.raises(ConfigError, match=r"axis=0 and group_size=4: give one"):
        quantize(x, 8, axis=0, group_size=4)
    with pytest.raises(TypeError, match=r"torch\.int64"):
        quantize(torch.arange(4), 8)
    assert issubclass(ConfigError, LmforgeError)


# ----------------------------------------------------------------------------------------------------- activations


def test_per_token_quantization() -> None:
    """Dynamic: each token's own absmax, at run time: s_t = max_j |x_tj| / 127."""
    x = randn(2, 5, 64) * torch.logspace(-1, 1, 5)[:, None]  # tokens of very different ranges
    q = quantize_per_token(x)
    assert q.bits == 8 and q.scale.shape == (2, 5, 1)
    torch.testing.assert_close(q.scale, x.abs().amax(-1, keepdim=True) / 127, rtol=0, atol=0)
    assert torch.equal(q.codes(), torch.round(x / q.scale).to(torch.int8))
    assert torch.all((x - q.dequantize()).abs() <= q.scale / 2 + 2 * EPS * x.abs())


def test_observer_records_the_range_of_every_batch() -> None:
    batches = [randn(4, 16, seed=i) * (i + 1) for i in range(3)]
    observer = RangeObserver()
    for b in batches:
        observer.update(b)
    everything = torch.cat(batches)
    assert observer.lo == everything.min() and observer.hi == everything.max() and observer.batches == 3

    per_channel = RangeObserver(axis=-1)
    for b in batches:
        per_channel.update(b)
    assert torch.equal(per_channel.lo, everything.amin(0)) and torch.equal(per_channel.hi, everything.amax(0))


def test_observer_moving_average_by_hand() -> None:
    """momentum c: the first batch sets the range, then lo <- lo + c (lo_batch - lo), the same for hi."""
    observer = RangeObserver(momentum=0.25)
    for lo, hi in ((-4.0, 8.0), (-8.0, 4.0), (0.0, 12.0)):
        observer.update(torch.tensor([lo, 1.0, hi]))
    # lo: -4 -> -4 + (-8 + 4) / 4 = -5 -> -5 + 5/4 = -3.75; hi: 8 -> 7 -> 8.25
    assert observer.lo.item() == -3.75 and observer.hi.item() == 8.25


def test_static_quantization_with_calibrated_scales() -> None:
    """The scale is fixed from calibration: calibrated values round within s/2, values beyond the range clip."""
    calibration = [randn(8, 32, seed=i) for i in range(4)]
    observer = RangeObserver()
    for b in calibration:
        observer.update(b)
    scale, zero = observer.qparams(bits=8, symmetric=True)
    assert zero is None and scale == torch.maximum(-observer.lo, observer.hi) / 127
    x = calibration[0].clone()
    q = quantize_static(x, scale, None, 8)
    assert torch.all((x - q.dequantize()).abs() <= scale / 2 + 2 * EPS * x.abs())
    assert torch.equal(q.codes(), quantize_symmetric(torch.cat(calibration), 8).codes()[:8])  # the same grid
    big = quantize_static(torch.tensor([1e3, -1e3]), scale, None, 8)
    assert big.codes().tolist() == [127, -127]

    scale, zero = observer.qparams(bits=4, symmetric=False)
    assert zero.dtype == torch.uint8 and scale == (observer.hi - observer.lo) / 15
    q = quantize_static(x, scale, zero, 4)
    assert torch.all((x - q.dequantize()).abs() <= scale / 2 + 2 * EPS * x.abs())
    assert quantize_static(torch.tensor([1e3, -1e3]), scale, zero, 4).codes().tolist() == [15, 0]


def test_static_per_channel_quantization() -> None:
    observer = RangeObserver(axis=1)
    observer.update(randn(8, 6, 16))
    scale, _ = observer.qparams(bits=8, symmetric=True)
    assert scale.shape == (6,)
    x = randn(8, 6, 16)
    q = quantize_static(x, scale, None, 8, axis=1)
    assert q.axis == 1 and torch.equal(q.scale, scale)
    with pytest.raises(QuantError, match=r"scale of shape \(6,\).*axis=2 needs \(16,\)"):
        quantize_static(x, scale, None, 8, axis=2)


def test_observer_errors() -> None:
    with pytest.raises(QuantError, match="no batch observed"):
        RangeObserver().qparams()
    with pytest.raises(ConfigError, match=r"invalid momentum=1.5"):
        RangeObserver(momentum=1.5)
    observer = RangeObserver(axis=0)
    observer.update(randn(4, 3))
    with pytest.raises(QuantError, match=r"a batch of shape \(5, 3\).*4 channels along axis 0"):
        observer.update(randn(5, 3))


# ----------------------------------------------------------------------------------------------------- companded


def test_companded_codes_by_hand() -> None:
    """Signed, power 2: code = round(127 sign(y) |y|^(1/2)); unsigned, power 4: code = round(255 y^(1/4))."""
    x = torch.tensor([0.5, -0.36, 0.01, 0.0, -1.0])  # absmax 1: y = x
    codes, absmax = quantize_blockwise_companded(x, signed=True, power=2.0)
    assert codes.dtype == torch.int8 and codes.tolist() == [90, -76, 13, 0, -127] and absmax.tolist() == [1.0]
    y = dequantize_blockwise_companded(codes, absmax, x.shape, power=2.0)
    torch.testing.assert_close(y, torch.tensor([(90 / 127) ** 2, -((76 / 127) ** 2), (13 / 127) ** 2, 0, -1]))

    v = torch.tensor([1.0, 1 / 256, 0.0016, 0.0])  # fourth roots 1, 1/4, 1/5, 0
    codes, absmax = quantize_blockwise_companded(v, signed=False, power=4.0)
    assert codes.dtype == torch.uint8 and codes.tolist() == [255, 64, 51, 0]
    w = dequantize_blockwise_companded(codes, absmax, v.shape, power=4.0)
    torch.testing.assert_close(w, torch.tensor([1.0, (64 / 255) ** 4, (51 / 255) ** 4, 0.0]))


def test_companded_blocks_and_tail() -> None:
    x = torch.tensor([1.0, 0.5, -4.0, 2.0, 3.0])  # blocks of 2: absmax 1, 4 and a tail block of one value
    codes, absmax = quantize_blockwise_companded(x, signed=True, power=2.0, block_size=2)
    assert absmax.tolist() == [1.0, 4.0, 3.0] and codes.tolist() == [127, 90, -127, 90, 127]
    y = dequantize_blockwise_companded(codes, absmax, (5,), power=2.0, block_size=2)
    assert y[[0, 2, 4]].tolist() == [1.0, -4.0, 3.0]  # the top code of each block is exact
    assert math.isclose(y[3].item(), 4 * (90 / 127) ** 2, rel_tol=1e-6)
    zeros, zero_absmax = quantize_blockwise_companded(torch.zeros(3), signed=False, power=4.0)
    assert zeros.tolist() == [0, 0, 0] and zero_absmax.tolist() == [0.0]
