"""NF4: 4-bit NormalFloat weights with blockwise absmax scales (QLoRA, Dettmers et al. 2023).

Code book. Trained weights are close to N(0, σ²) in each block, so NF4 puts its 16 values at quantiles of N(0, 1),
each holding about the same probability mass, rescaled into [-1, 1]. With Φ⁻¹ the standard normal quantile function
and δ = 0.9677083 the outermost quantile (bitsandbytes' choice; Φ⁻¹(δ) ≈ 1.848):

    p_i = δ - i (δ - 1/2) / 8,  i = 0..7    8 positive values  Φ⁻¹(p_i)
    r_j = δ - j (δ - 1/2) / 7,  j = 0..6    7 negative values -Φ⁻¹(r_j)
    c = sort({Φ⁻¹(p_i)} ∪ {-Φ⁻¹(r_j)} ∪ {0}) / max     c_0 = -1, c_7 = 0, c_15 = 1

It is asymmetric (one more positive value) so that 0 is exact: zeros and padding stay zeros. The grid p, r is float32,
Φ⁻¹ is evaluated in float64 and rounded to float32, and the division is float32: how bitsandbytes built the table
it hard-codes (`create_normal_map(offset=0.9677083, use_extra_value=True)`), which `normal_map()` equals bit for bit.

Blockwise quantization. The flattened weight w (n values, in float32) is cut into blocks of B values, the last one
shorter when B does not divide n. Per block b:

    s_b = max_{i in b} |w_i|                           the absmax scale, float32
    k_i = argmin_k |c_k - w_i · (1 / s_b)|            the nearest code; a value on a midpoint takes the lower code
    ŵ_i = c_{k_i} · s_b                                dequantized in float32, then rounded once to the dtype

so |w_i - ŵ_i| <= s_b · max_k (c_{k+1} - c_k) / 2. Two 4-bit codes share a byte, the first element of each pair in
the high nibble (byte_j = k_{2j} << 4 | k_{2j+1}); an odd n is padded with the code of 0.

Double quantization. The float32 scales cost 32 / B bits per weight (0.5 at B = 64). QLoRA quantizes them again:
with m = mean(s), the centered scales s - m go through 8-bit blockwise absmax quantization in blocks of 256 on the
signed dynamic code d (`dynamic_map()`, bitsandbytes' `create_dynamic_map(signed=True)`: a sign, a decimal exponent
10^-e and a linear fraction), which leaves one float32 scale s2 per 256 scales and one byte per scale:

    s_b ≈ d[q_b] · s2_{b // 256} + m
    bits per weight = 4 + 8 / B + 32 / (256 B) (+ 32 / n for m) = 4.127 at B = 64, against 4 + 32 / B = 4.5.

Bits and bytes. Layout and values are those of bitsandbytes' `quantize_4bit(w, blocksize=B, quant_type="nf4",
compress_statistics=...)` (a test oracle only, never imported here): the same packed bytes, scales and double-quant
state. Where its CPU kernels depart from its CUDA kernels, this module follows the exact rule of the CUDA ones:
every block is scaled by the reciprocal 1 / s_b (the CPU fallback divides in the tail block: one ulp apart), and the
8-bit scale codes are the nearest code (the CPU kernel first rounds the value to a grid of 2^16 points, which can
move a value within 2^-16 of a midpoint to a neighbouring code). An all-zero block keeps the scale 0 and takes the
code of 0.0 at either level; bitsandbytes' kernels may write another code there (times a zero scale: the same value)
and its CPU fallback stores 1e-38 as the scale of an all-zero tail block.

NF4Linear holds a linear layer's weight in this form, frozen (QLoRA's base layers), and dequantizes it into the
compute dtype at each forward: y = x Ŵᵀ + b. `quantize_model_nf4` swaps it in for a model's linear layers.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.model.surgery import Swap, Where, swap_modules

NF4_OFFSET = 0.9677083  # the outermost quantile δ of the NF4 code book
SCALE_BLOCK_SIZE = 256  # block size of the double quantization of the scales
_TINY = torch.finfo(torch.float32).tiny  # floor of a scale before its reciprocal: an all-zero block maps to 0


def normal_map(offset: float = NF4_OFFSET) -> Tensor:
    """The NF4 code book: 16 sorted float32 values in [-1, 1] at normal quantiles, with an exact 0 (module doc)."""
    ndtri = torch.special.ndtri  # Φ⁻¹
    positive = ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double())
    negative = -ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double())
    values = torch.cat([positive.float(), negative.float(), torch.zeros(1)]).sort().values
    return values / values.max()


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """bitsandbytes' signed dynamic code (`create_dynamic_map(signed=True)`): 2^total_bits sorted float32 values in
    [-1, 1]. Level i (i = 0..max_exponent_bits-1) holds ± the midpoints of 2^(i + total_bits - 1 - max_exponent_bits)
    equal steps of [0.1, 1], times 10^(i + 1 - max_exponent_bits); then 0 and 1."""
    non_sign_bits = total_bits - 1

    def level(i: int, items: int) -> list[Tensor]:
        bounds = torch.linspace(0.1, 1, items + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        return [10 ** (i + 1 - max_exponent_bits) * means, -(10 ** (i + 1 - max_exponent_bits)) * means]

    values = [v for i in range(max_exponent_bits) for v in level(i, 2 ** (i + non_sign_bits - max_exponent_bits))]
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1  # when exponent bits are fewer than the value bits
    if extra > 0:
        values += level(max_exponent_bits - 1, extra)
    values.append(torch.tensor([0.0, 1.0]))
    flat = torch.cat(values)
    flat = F.pad(flat, (0, 2**total_bits - flat.numel()))
    return flat.sort().values


NF4_CODE = normal_map()  # (16,) float32; read-only
NF4_ZERO = 7  # the index of 0.0 in NF4_CODE: the code of padding and of all-zero blocks
DYNAMIC_CODE = dynamic_map()  # (256,) float32; read-only


def nearest_code(x: Tensor, code: Tensor) -> Tensor:
    """The index (uint8) of the value of the sorted `code` nearest to each element of `x` (float32 comparisons with
    the float32 midpoints of neighbours); a value on a midpoint takes the lower index, as bitsandbytes decides."""
    code = code.to(x.device, torch.float32)
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(x.float(), midpoints).to(torch.uint8)


def _blocks(flat: Tensor, block_size: int) -> Tensor:
    """(n,) -> (ceil(n / block_size), block_size), the tail block padded with zeros."""
    return F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)


def blockwise_absmax(flat: Tensor, block_size: int) -> Tensor:
    """max |x| over each block of `block_size` consecutive elements of the 1-D `flat`: (ceil(n / block_size),)."""
    return _blocks(flat, block_size).abs().amax(dim=1)


def quantize_blockwise(flat: Tensor, code: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Absmax quantization of the 1-D float32 `flat` on a sorted code in [-1, 1]: (codes uint8 (n,), absmax float32
    per block), codes[i] the nearest code of flat[i] · (1 / absmax of its block)."""
    absmax = blockwise_absmax(flat, block_size)
    scaled = _blocks(flat, block_size) * (1.0 / absmax.clamp_min(_TINY))[:, None]
    return nearest_code(scaled.flatten()[: flat.numel()], code), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, code: Tensor, block_size: int) -> Tensor:
    """code[codes] · absmax of each block, in float32: the inverse of `quantize_blockwise` up to rounding."""
    values = code.to(codes.device, torch.float32)[codes.long()]
    return (_blocks(values, block_size) * absmax.float()[:, None]).flatten()[: codes.numel()]


def pack_nibbles(codes: Tensor, pad: int = NF4_ZERO) -> Tensor:
    """Two 4-bit codes per byte, the first of each pair in the high nibble; an odd count is padded with `pad`."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad)])
    return codes[0::2] << 4 | codes[1::2]


def unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    """The first `n` 4-bit codes of `pack_nibbles`' bytes, as uint8."""
    return torch.stack([packed >> 4, packed & 0xF], dim=1).flatten()[:n]


@dataclass
class DoubleQuantState:
    """Double-quantized scales: scales ≈ code[codes] · absmax[block // block_size] + offset (module doc)."""

    codes: Tensor  # (n_scales,) uint8, indices into `code`
    absmax: Tensor  # (ceil(n_scales / block_size),) float32, the second-level scales
    offset: Tensor  # () float32, the mean of the scales
    code: Tensor = field(default_factory=lambda: DYNAMIC_CODE)  # (256,) the dynamic 8-bit map: a shared constant
    block_size: int = SCALE_BLOCK_SIZE

    def nbytes(self) -> int:
        """Bytes of the codes, second-level scales and offset (the code map is shared by all, not counted)."""
        return self.codes.numel() + 4 * self.absmax.numel() + 4 * self.offset.numel()


def quantize_scales(absmax: Tensor, block_size: int = SCALE_BLOCK_SIZE) -> DoubleQuantState:
    """Double quantization: the scales minus their mean, 8-bit absmax-quantized on the dynamic code."""
    offset = absmax.mean()
    codes, absmax2 = quantize_blockwise(absmax - offset, DYNAMIC_CODE, block_size)
    return DoubleQuantState(codes, absmax2, offset, block_size=block_size)


def dequantize_scales(state: DoubleQuantState) -> Tensor:
    """The float32 scales that a `DoubleQuantState` stands for."""
    return dequantize_blockwise(state.codes, state.absmax, state.code, state.block_size) + state.offset.float()


@dataclass
class NF4Tensor:
    """A tensor in NF4: packed 4-bit codes and per-block scales, plain or double-quantized (module doc)."""

    packed: Tensor  # (ceil(numel / 2),) uint8, two codes a byte, the first in the high nibble
    absmax: Tensor | DoubleQuantState  # (ceil(numel / block_size),) float32, or their double quantization
    shape: torch.Size
    dtype: torch.dtype  # of the tensor that was quantized, and of `dequantize_nf4`'s result by default
    block_size: int

    @property
    def double_quant(self) -> bool:
        return isinstance(self.absmax, DoubleQuantState)

    def numel(self) -> int:
        return math.prod(self.shape)

    def scales(self) -> Tensor:
        """The float32 scale of each block (dequantized when double-quantized)."""
        return dequantize_scales(self.absmax) if isinstance(self.absmax, DoubleQuantState) else self.absmax.float()

    def nbytes(self) -> int:
        """Bytes held: packed codes, scales (or their double-quant state)."""
        scales = self.absmax.nbytes() if isinstance(self.absmax, DoubleQuantState) else 4 * self.absmax.numel()
        return self.packed.numel() + scales


def quantize_nf4(weight: Tensor, block_size: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantize a float tensor to NF4 in blocks of `block_size` consecutive (flattened) elements."""
    if not weight.is_floating_point():
        raise TypeError(f"quantize_nf4 takes a floating-point tensor, got {weight.dtype}")
    if block_size < 1:
        raise ValueError(f"quantize_nf4: block_size must be positive, got {block_size}")
    codes, absmax = quantize_blockwise(weight.detach().reshape(-1).float(), NF4_CODE, block_size)
    scales = quantize_scales(absmax) if double_quant else absmax
    return NF4Tensor(pack_nibbles(codes), scales, weight.shape, weight.dtype, block_size)


def dequantize_nf4(t: NF4Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The tensor `t` stands for, in its shape and in `dtype` (default: the dtype it was quantized from)."""
    codes = unpack_nibbles(t.packed, t.numel())
    values = dequantize_blockwise(codes, t.scales(), NF4_CODE, t.block_size)
    return values.view(t.shape).to(t.dtype if dtype is None else dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer with its weight in NF4: y = x Ŵᵀ + b, computed in `compute_dtype`, returned in x's dtype.

    Buffers (saved in the state dict): `packed`, and `absmax`, or with double quantization `absmax_codes`,
    `absmax2` and `absmax_offset`. `weight` is the dequantized weight in `compute_dtype` (code reading a projection's
    weight keeps working); the bias stays a frozen parameter. Casting the module (`.to(dtype)`, `.half()`) also casts
    the float32 scales: quantize after casting."""

    def __init__(self, weight: NF4Tensor, bias: Tensor | None = None, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear takes a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.block_size, self.weight_dtype, self.compute_dtype = weight.block_size, weight.dtype, compute_dtype
        self.register_buffer("packed", weight.packed)
        self.scale_block_size: int | None = None
        if isinstance(weight.absmax, DoubleQuantState):
            self.scale_block_size = weight.absmax.block_size
            self.register_buffer("absmax_codes", weight.absmax.codes)
            self.register_buffer("absmax2", weight.absmax.absmax)
            self.register_buffer("absmax_offset", weight.absmax.offset)
        else:
            self.register_buffer("absmax", weight.absmax)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> NF4Linear:
        """Quantize `linear`'s weight (keeping no reference to `linear`)."""
        return cls(quantize_nf4(linear.weight, block_size, double_quant), linear.bias, compute_dtype)

    def to_nf4(self) -> NF4Tensor:
        """The weight as an `NF4Tensor` over this module's buffers."""
        if self.scale_block_size is None:
            scales: Tensor | DoubleQuantState = self.absmax
        else:
            scales = DoubleQuantState(
                self.absmax_codes, self.absmax2.float(), self.absmax_offset.float(), block_size=self.scale_block_size
            )
        shape = torch.Size((self.out_features, self.in_features))
        return NF4Tensor(self.packed, scales, shape, self.weight_dtype, self.block_size)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight, (out_features, in_features) in `compute_dtype`."""
        return dequantize_nf4(self.to_nf4(), self.compute_dtype)

    def nbytes(self) -> int:
        """Bytes holding the weight: packed codes, scales and double-quant state (not the bias)."""
        return self.to_nf4().nbytes()

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), self.weight, bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, double_quant={self.scale_block_size is not None}, "
            f"compute_dtype={self.compute_dtype}"
        )


def linear_where(where: Where):
    """`where` (patterns or a predicate, as in `model.surgery`) restricted to `nn.Linear` modules."""
    if callable(where):
        return lambda name, module: isinstance(module, nn.Linear) and where(name, module)
    patterns = (where,) if isinstance(where, str) else tuple(where)
    return lambda name, module: isinstance(module, nn.Linear) and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_model_nf4(
    model: nn.Module,
    where: Where = "blocks.*",
    *,
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> Swap:
    """Replace, in place, every `nn.Linear` that `where` selects (default: all under `blocks`, so not the embedding
    nor the LM head) by an `NF4Linear`. Returns the `Swap` (`restore()` undoes it; drop it to free the float layers).
    Mixture-of-experts expert matrices (`ExpertLinear`) are not `nn.Linear` and stay as they are."""
    factory = lambda _, old: NF4Linear.from_linear(old, block_size, double_quant, compute_dtype)
    return swap_modules(model, linear_where(where), factory)
