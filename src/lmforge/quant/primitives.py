"""Quantization primitives: integer codes and scales for a float tensor, at three granularities, in 8 and 4 bits.

Symmetric (absmax). With qmax = 2^(b-1) - 1 (127 for int8, 7 for int4) and absmax = max |x| over the elements that
share a scale:

    s = absmax / qmax        q = clamp(round(x / s), -qmax, qmax)        x̂ = q · s

The codes are -qmax..qmax: the grid is symmetric (-x gets -q) and the code -2^(b-1) (-128, -8) is never produced,
the "restricted range" of LLM.int8() / bitsandbytes and of NVIDIA's integer-quantization recipe (Wu et al. 2020).
torchao's and gpt-fast's symmetric mode instead take s = absmax / ((qmax - qmin) / 2) = absmax / 7.5 (int4) or
/ 127.5 and clamp to -8..7 / -128..127: one more code, an asymmetric grid. Stored int4 weights are mostly unsigned
with a zero point, as below: GPTQ checkpoints hold codes 0..15 and a zero point per group (8 in its symmetric mode,
where s = 2 absmax / 15), torchao's int4 weight-only layout codes 0..15 with a float-domain zero point.

Asymmetric (zero point). With L = 2^b - 1 (255, 15) and the range widened to hold 0, lo = min(min x, 0),
hi = max(max x, 0):

    s = (hi - lo) / L        z = round(-lo / s)        q = clamp(round(x / s) + z, 0, L)        x̂ = (q - z) · s

0.0 is exact (x = 0 gives q = z, x̂ = 0), so zeros and padding stay zeros. z is an integer in 0..L (stored uint8).

Both round half to even (torch.round) and divide by s in float32. Inside the range the error is half a step,
|x - x̂| <= s / 2 (up to float32 rounding of x / s and q · s: a few ulps of x); a static scale (below) clips what
lies outside the range it was calibrated on. A group whose values are all 0 has s = 0, codes 0 (z = 0) and x̂ = 0.

Granularity: which elements share s (and z); the scale's shape (`scale_shape`) for x of shape (d_0, ..., d_{n-1}):
    per-tensor                 one scale                                            ()
    per-channel  (axis = a)    one per index along dimension a, over all others     (d_a,)
    per-group    (group_size)  one per g consecutive elements of the last dimension (d_0, ..., d_{n-1} / g)
g must divide d_{n-1}. Per-group int4 with g = 32..128 is the weight-only format of GPTQ/AWQ/torchao.

Storage. 8-bit codes are int8 (symmetric) or uint8 (asymmetric) in x's shape. 4-bit codes are packed two per byte
over the flattened tensor, the first element of each pair in the high nibble (byte_j = n_{2j} << 4 | n_{2j+1}, the
order of bitsandbytes' 4-bit formats and of quant/nf4.py; GPTQ's int32 packing and llama.cpp's Q4 blocks order
nibbles differently), an odd count padded with the nibble 0; a signed code is its two's-complement nibble
(-8..7 <-> 0x8..0x7). `QuantizedTensor` holds codes, scales, zero points and the layout; it costs
numel · b / 8 bytes of codes + 4 per scale + 1 per zero point.

Activations. Dynamic: per-token absmax int8 at run time, s_t = max_j |x_tj| / 127 for each row of the last dimension
(`quantize_per_token`; LLM.int8() and SmoothQuant's dynamic mode). Static: a `RangeObserver` records the range over
calibration batches (per tensor or per channel), either the running min and max (PyTorch's MinMaxObserver) or their
moving average with momentum c (lo <- lo + c (lo_batch - lo), MovingAverageMinMaxObserver); `qparams` turns it into a
fixed scale (and zero point) that `quantize_static` then applies to every batch.

Companded block-wise codes (8-bit AdamW's moments, train/optim/adamw8bit.py). The flattened x is cut into blocks of B
(256) values with one float32 absmax each, y = x / absmax ∈ [-1, 1], and y is companded before a uniform code:

    signed (int8):      q = round(127 · sign(y) |y|^(1/p))        y = sign(q) (|q| / 127)^p
    unsigned (uint8):   q = round(255 · y^(1/p))                  y = (q / 255)^p

p = 2 for the first moment and 4 for the second spend the codes on small magnitudes. This is not quant/nf4.py's
code-book `quantize_blockwise` (nearest of a sorted code book by linear midpoints): rounding here happens in the
companded domain, so the two pick different codes near midpoints and stay distinct functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.configfile import ConfigError, check, check_positive
from lmforge.utils.errors import LmforgeError

BITS = (4, 8)
_TINY = torch.finfo(torch.float32).tiny  # floor of a scale before dividing by it: an all-zero group maps to 0


class QuantError(LmforgeError):
    """Quantization parameters that do not fit the tensor (a static scale's shape), or an observer with no data."""


def qmax(bits: int) -> int:
    """The largest symmetric code, 2^(bits-1) - 1: 127 for int8, 7 for int4."""
    return 2 ** (bits - 1) - 1


def top_code(bits: int) -> int:
    """The largest asymmetric code, 2^bits - 1: 255 for 8 bits, 15 for 4."""
    return 2**bits - 1


# ----------------------------------------------------------------------------------------------------- layout


def _check_layout(shape: torch.Size, bits: int, axis: int | None, group_size: int | None) -> int | None:
    """Validate bits and the granularity for a tensor of `shape`; returns `axis` made non-negative."""
    check(bits in BITS, "bits", bits, "must be 4 or 8")
    if axis is not None and group_size is not None:
        raise ConfigError(f"invalid axis={axis} and group_size={group_size}: give one (per-channel or per-group)")
    if group_size is not None:
        check_positive("group_size", group_size)
        last = shape[-1] if shape else "none"
        check(len(shape) > 0 and shape[-1] % group_size == 0, "group_size", group_size,
              f"must divide the last dimension ({last}) of a tensor of shape {tuple(shape)}")  # fmt: skip
    if axis is None:
        return None
    check(-len(shape) <= axis < len(shape), "axis", axis, f"must be a dimension of a {len(shape)}-D tensor")
    return axis % len(shape)


def scale_shape(shape: Sequence[int], axis: int | None = None, group_size: int | None = None) -> tuple[int, ...]:
    """The shape of the scales (and zero points) of a tensor of `shape` at a granularity (module doc)."""
    if group_size is not None:
        return (*shape[:-1], shape[-1] // group_size)
    if axis is not None:
        return (shape[axis],)
    return ()


def _rows(x: Tensor, axis: int | None, group_size: int | None) -> Tensor:
    """x as (number of scales, elements per scale): row r holds the elements that scale r covers."""
    if group_size is not None:
        return x.reshape(-1, group_size)
    if axis is not None:
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return x.reshape(1, -1)


def _unrows(rows: Tensor, shape: torch.Size, axis: int | None) -> Tensor:
    """The inverse of `_rows`: back to `shape`."""
    if axis is None:
        return rows.reshape(shape)
    moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
    return rows.reshape(moved).movedim(0, axis)


# ----------------------------------------------------------------------------------------------------- codes


def symmetric_codes(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """q = clamp(round(x / s), -qmax, qmax) as int8, `scale` broadcast against `x` (float32 arithmetic)."""
    q = torch.round(x.float() / scale.clamp_min(_TINY))
    return q.clamp_(-qmax(bits), qmax(bits)).to(torch.int8)


def asymmetric_params(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(s, z) for a range [lo, hi] widened to hold 0: s = (hi - lo) / (2^bits - 1), z = round(-lo / s) as uint8."""
    lo, hi = lo.float().clamp(max=0.0), hi.float().clamp(min=0.0)
    scale = (hi - lo) / top_code(bits)
    zero = torch.round(-lo / scale.clamp_min(_TINY)).clamp_(0, top_code(bits))
    return scale, zero.to(torch.uint8)


def asymmetric_codes(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """q = clamp(round(x / s) + z, 0, 2^bits - 1) as uint8, `scale` and `zero_point` broadcast against `x`."""
    q = torch.round(x.float() / scale.clamp_min(_TINY)) + zero_point.float()
    return q.clamp_(0, top_code(bits)).to(torch.uint8)


def dequantize_codes(codes: Tensor, scale: Tensor, zero_point: Tensor | None = None) -> Tensor:
    """x̂ = (q - z) · s in float32 (z = 0 when None), `scale` and `zero_point` broadcast against `codes`."""
    q = codes.float() if zero_point is None else codes.float() - zero_point.float()
    return q * scale.float()


# ----------------------------------------------------------------------------------------------------- int4 storage


def pack_int4(codes: Tensor) -> Tensor:
    """4-bit codes (int8 in -8..7 or uint8 in 0..15, any shape) packed two per byte over the flattened tensor, the
    first of each pair in the high nibble; an odd count padded with the nibble 0. (ceil(n / 2),) uint8."""
    nibbles = codes.reshape(-1).to(torch.uint8) & 0xF  # a negative int8 becomes its two's-complement nibble
    nibbles = F.pad(nibbles, (0, nibbles.numel() % 2))
    return nibbles[0::2] << 4 | nibbles[1::2]


def unpack_int4(packed: Tensor, n: int, *, signed: bool) -> Tensor:
    """The first `n` codes of `pack_int4`'s bytes, flat: int8 in -8..7 when `signed`, else uint8 in 0..15."""
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]
    return (nibbles.to(torch.int8) ^ 8) - 8 if signed else nibbles


# ----------------------------------------------------------------------------------------------------- tensors


@dataclass
class QuantizedTensor:
    """A tensor as integer codes, float32 scales and (asymmetric) uint8 zero points at a granularity (module doc)."""

    data: Tensor  # 8 bits: the codes in `shape` (int8 symmetric, uint8 asymmetric); 4 bits: pack_int4 bytes
    scale: Tensor  # float32, scale_shape(shape, axis, group_size)
    zero_point: Tensor | None  # uint8 like `scale` (asymmetric), or None (symmetric)
    bits: int
    shape: torch.Size
    dtype: torch.dtype  # of the tensor that was quantized, and of `dequantize()` by default
    axis: int | None = None  # per-channel: the dimension with one scale per index
    group_size: int | None = None  # per-group: elements of the last dimension per scale

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    def numel(self) -> int:
        return math.prod(self.shape)

    def codes(self) -> Tensor:
        """The integer codes in `shape`, unpacked: int8 (symmetric) or uint8 (asymmetric)."""
        if self.bits == 8:
            return self.data
        return unpack_int4(self.data, self.numel(), signed=self.symmetric).view(self.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """x̂ = (q - z) · s in `shape`, computed in float32 and rounded once to `dtype` (default: the original)."""
        rows = _rows(self.codes(), self.axis, self.group_size)
        zero = None if self.zero_point is None else self.zero_point.reshape(-1, 1)
        x_hat = _unrows(dequantize_codes(rows, self.scale.reshape(-1, 1), zero), self.shape, self.axis)
        return x_hat.to(self.dtype if dtype is None else dtype)

    def nbytes(self) -> int:
        """Bytes held: codes (packed in 4 bits), float32 scales, uint8 zero points."""
        zero = 0 if self.zero_point is None else self.zero_point.numel()
        return self.data.numel() * self.data.element_size() + 4 * self.scale.numel() + zero


def _check_float(x: Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} takes a floating-point tensor, got {x.dtype}")


def _encode(x: Tensor, scale: Tensor, zero_point: Tensor | None, bits: int, axis: int | None,
            group_size: int | None) -> QuantizedTensor:  # fmt: skip
    """Codes of `x` on given scales (and zero points) of `scale_shape`, stored as `QuantizedTensor`."""
    rows = _rows(x.detach(), axis, group_size)
    s = scale.reshape(-1, 1)
    if zero_point is None:
        codes = symmetric_codes(rows, s, bits)
    else:
        codes = asymmetric_codes(rows, s, zero_point.reshape(-1, 1), bits)
    codes = _unrows(codes, x.shape, axis)
    data = codes if bits == 8 else pack_int4(codes)
    return QuantizedTensor(data, scale, zero_point, bits, x.shape, x.dtype, axis, group_size)


def quantize_symmetric(x: Tensor, bits: int = 8, *, axis: int | None = None,
                       group_size: int | None = None) -> QuantizedTensor:  # fmt: skip
    """Absmax quantization, s = absmax / qmax per tensor, per channel along `axis`, or per `group_size` elements of
    the last dimension (module doc)."""
    _check_float(x, "quantize_symmetric")
    axis = _check_layout(x.shape, bits, axis, group_size)
    absmax = _rows(x.detach(), axis, group_size).abs().amax(dim=1).float()
    scale = (absmax / qmax(bits)).reshape(scale_shape(x.shape, axis, group_size))
    return _encode(x, scale, None, bits, axis, group_size)


def quantize_asymmetric(x: Tensor, bits: int = 8, *, axis: int | None = None,
                        group_size: int | None = None) -> QuantizedTensor:  # fmt: skip
    """Zero-point quantization, s = (hi - lo) / (2^bits - 1), z = round(-lo / s), at a granularity (module doc)."""
    _check_float(x, "quantize_asymmetric")
    axis = _check_layout(x.shape, bits, axis, group_size)
    rows = _rows(x.detach(), axis, group_size)
    scale, zero = asymmetric_params(rows.amin(dim=1), rows.amax(dim=1), bits)
    shape = scale_shape(x.shape, axis, group_size)
    return _encode(x, scale.reshape(shape), zero.reshape(shape), bits, axis, group_size)


def quantize_static(x: Tensor, scale: Tensor, zero_point: Tensor | None = None, bits: int = 8, *,
                    axis: int | None = None, group_size: int | None = None) -> QuantizedTensor:  # fmt: skip
    """`x` on fixed, calibrated parameters (`RangeObserver.qparams`): symmetric when `zero_point` is None. Values
    beyond the calibrated range clip to the extreme codes."""
    _check_float(x, "quantize_static")
    axis = _check_layout(x.shape, bits, axis, group_size)
    expected = scale_shape(x.shape, axis, group_size)
    layout = f"axis={axis}" if axis is not None else f"group_size={group_size}" if group_size else "per-tensor"
    for name, t in (("scale", scale), ("zero point", zero_point)):
        if t is not None and tuple(t.shape) != expected:
            raise QuantError(f"quantize_static: a {name} of shape {tuple(t.shape)} for a tensor of shape "
                             f"{tuple(x.shape)}: {layout} needs {expected}")  # fmt: skip
    return _encode(x, scale.float(), zero_point, bits, axis, group_size)


def quantize_per_token(x: Tensor, bits: int = 8) -> QuantizedTensor:
    """Dynamic activation quantization: symmetric, one scale per row of the last dimension, s_t = max_j |x_tj| / qmax
    (scale shape (..., 1))."""
    return quantize_symmetric(x, bits, group_size=x.shape[-1])


# ----------------------------------------------------------------------------------------------------- calibration


class RangeObserver:
    """The range of activations over calibration batches, then fixed quantization parameters from it.

    `update(x)` folds a batch in: per tensor (`axis` None) or per channel along `axis` (over all other dimensions).
    Without `momentum` the range is the running min and max of every batch seen; with a momentum c in (0, 1] it is
    their moving average, lo <- lo + c (lo_batch - lo) (the first batch sets it)."""

    def __init__(self, axis: int | None = None, momentum: float | None = None) -> None:
        ok = momentum is None or (isinstance(momentum, int | float) and 0 < momentum <= 1)
        check(ok, "momentum", momentum, "must be None (running min and max) or in (0, 1]")
        self.axis, self.momentum = axis, momentum
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None
        self.batches = 0

    def update(self, x: Tensor) -> None:
        """Fold the batch `x` into the observed range."""
        _check_float(x, "RangeObserver.update")
        axis = _check_layout(x.shape, 8, self.axis, None)
        rows, shape = _rows(x.detach().float(), axis, None), scale_shape(x.shape, axis)
        lo, hi = rows.amin(dim=1).reshape(shape), rows.amax(dim=1).reshape(shape)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        elif lo.shape != self.lo.shape:
            raise QuantError(f"RangeObserver: a batch of shape {tuple(x.shape)} does not match the "
                             f"{self.lo.numel()} channels along axis {self.axis} seen before")  # fmt: skip
        elif self.momentum is None:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        else:
            self.lo, self.hi = self.lo + self.momentum * (lo - self.lo), self.hi + self.momentum * (hi - self.hi)
        self.batches += 1

    def qparams(self, bits: int = 8, symmetric: bool = True) -> tuple[Tensor, Tensor | None]:
        """(scale, zero point or None) of the observed range: s = max(-lo, hi) / qmax, or the asymmetric (s, z)."""
        check(bits in BITS, "bits", bits, "must be 4 or 8")
        if self.lo is None or self.hi is None:
            raise QuantError("RangeObserver.qparams: no batch observed yet; call update() on calibration batches")
        if symmetric:
            return torch.maximum(-self.lo, self.hi) / qmax(bits), None
        return asymmetric_params(self.lo, self.hi, bits)


# ----------------------------------------------------------------------------------------------------- companded


def quantize_blockwise_companded(x: Tensor, *, signed: bool, power: float,
                                 block_size: int = 256) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Codes (int8 if `signed` else uint8, x's numel, flat) and per-block float32 absmax of x, companded with
    |y|^(1 / power) before rounding (module doc)."""
    flat = x.detach().reshape(-1).float()
    blocks = F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    y = blocks / absmax.clamp(min=_TINY)[:, None]
    top = 127 if signed else 255
    codes = y.abs().pow(1 / power).mul_(top).round_().mul_(y.sign())
    return codes.view(-1)[: flat.numel()].to(torch.int8 if signed else torch.uint8), absmax


def dequantize_blockwise_companded(codes: Tensor, absmax: Tensor, shape: Sequence[int], *, power: float,
                                   block_size: int = 256) -> Tensor:  # fmt: skip
    """The float32 tensor of `shape` that `quantize_blockwise_companded` codes stand for."""
    top = 127 if codes.dtype == torch.int8 else 255
    c = F.pad(codes.float(), (0, -codes.numel() % block_size)).view(-1, block_size)
    y = (c.abs() / top).pow_(power).mul_(c.sign())
    return (y * absmax[:, None]).view(-1)[: codes.numel()].view(shape)
