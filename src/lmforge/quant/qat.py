"""Quantization-aware training (QAT): train through the rounding a quantized model will apply, so the weights learn
to sit where the grid can hold them.

Fake quantization. The forward uses the quantized-then-dequantized value of a tensor, in float, on the integer grids
of quant/primitives.py (whose code functions compute it here):

    symmetric    q = clamp(round(x / s), -qmax, qmax)           x̃ = q · s              qmax = 2^(b-1) - 1
    asymmetric   q = clamp(round(x / s) + z, 0, L)              x̃ = (q - z) · s        L = 2^b - 1

so x̃ = dequant(quant(x)) is exactly what `quantize_symmetric` / `quantize_asymmetric` then `dequantize()` give on
the same scales, and a model trained this way is evaluated, during training, as the quantized model will run.

Straight-through estimator. round has zero derivative almost everywhere; the STE (Bengio et al. 2013) treats it as
the identity inside the range the grid covers and lets nothing through where the clamp clips:

    dx̃/dx = 1   if  q_min <= round(x / s) (+ z) <= q_max         (the code before clamping is on the grid)
            0   otherwise

with q_min, q_max = -qmax, qmax (symmetric) or 0, L. This is the variant of PyTorch's FakeQuantize
(`torch.fake_quantize_per_tensor_affine` / `_per_channel_affine`, its "cachemask" kernels: the mask tests the rounded
code, so a value that rounds onto an edge code still passes its gradient). It is LSQ-free: the scale and the zero
point get no gradient (LSQ, Esser et al. 2020, learns s through dx̃/ds). One difference from PyTorch's kernels:
they compute x · (1 / s), here x / s as primitives does; the two can pick different codes for a value within an
ulp of a rounding midpoint (none in the tests' random tensors).

Weights. `FakeQuantLinear` keeps the full-precision ("latent") weight W as its parameter and, in every forward,
computes its scales from the current W, per output channel (group_size None) or per `group_size` consecutive input
columns, symmetric (s = absmax / qmax) or asymmetric (s, z from the range widened to hold 0): the grids of
`quantize_symmetric` / `quantize_asymmetric` with `axis=0` or `group_size`. An absmax or min/max scale clips
nothing, so the weight gradient is the plain STE, dL/dW = dL/dW̃; the mask matters for static scales (the
function `fake_quantize` takes any). The optimizer updates W; the rounding decides what the forward sees.

Activations (optional, `activations=8`). Dynamic per-token symmetric fake quantization of the layer's input,
s_t = max_j |x_tj| / qmax (primitives' `quantize_per_token`), the forward of a W8A8 (or W4A8) model; nothing clipped
either, so the gradient passes straight through.

    prepare_qat(model, bits=4, group_size=128, activations=None)   nn.Linear -> FakeQuantLinear under `where`
                                                                   (default blocks.*: not the embedding or head)
    ...train as usual (the parameters are the model's own: same names, same tensors)...
    convert_qat(model)     FakeQuantLinear -> nn.Linear holding W̃: a float model whose weights lie on the grid,
                           so a later quantizer (primitives, weight_only.QuantLinear, GGUF) re-finds the same codes
                           and scales; `FakeQuantLinear.quantized()` gives them directly as a `QuantizedTensor`

This is the recipe of torchao's QAT (`Int8DynActInt4WeightQATQuantizer`: per-group symmetric int4 weights, per-token
int8 activations, scales from the current weights, STE) on primitives' grids (torchao's symmetric int4 takes codes
-8..7 with s = absmax / 7.5, primitives' docstring), and of LLM-QAT (Liu et al. 2023) without its distillation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.configfile import ConfigError, check, check_positive
from lmforge.model.surgery import Swap, Where, swap_modules
from lmforge.quant.nf4 import linear_where
from lmforge.quant.primitives import (
    QuantizedTensor,
    asymmetric_codes,
    asymmetric_params,
    dequantize_codes,
    qmax,
    quantize_static,
    scale_shape,
    symmetric_codes,
    top_code,
)

__all__ = ["FakeQuantLinear", "baked_linear", "convert_qat", "fake_quantize", "fake_quantize_per_token", "prepare_qat"]

QAT_BITS = range(2, 9)  # the widths fake quantization takes (primitives stores 4 and 8: `quantized()` needs those)
_TINY = torch.finfo(torch.float32).tiny  # primitives' floor of a scale before dividing by it


def _check_bits(name: str, bits: int) -> None:
    check(isinstance(bits, int) and bits in QAT_BITS, name, bits, "must be an integer from 2 to 8")


def _grid(bits: int, symmetric: bool) -> tuple[int, int]:
    """(q_min, q_max) of the codes: -qmax..qmax symmetric, 0..2^b - 1 asymmetric."""
    return (-qmax(bits), qmax(bits)) if symmetric else (0, top_code(bits))


def _broadcast(x: Tensor, t: Tensor, axis: int | None, group_size: int | None) -> tuple[Tensor, Tensor]:
    """x and a scale (or zero point) of `scale_shape(x.shape, axis, group_size)`, viewed so that they broadcast:
    per group x as (..., n / g, g) against (..., n / g, 1); per channel t along `axis`; per tensor as they are."""
    if group_size is not None:
        return x.reshape(*x.shape[:-1], -1, group_size), t.unsqueeze(-1)
    if axis is not None:
        return x, t.reshape([-1 if d == axis else 1 for d in range(x.dim())])
    return x, t


def _check_params(x: Tensor, scale: Tensor, zero_point: Tensor | None, axis: int | None,
                  group_size: int | None) -> int | None:  # fmt: skip
    """Validate the granularity and the parameters' shapes for `x`; returns `axis` made non-negative."""
    if axis is not None and group_size is not None:
        raise ConfigError(f"invalid axis={axis} and group_size={group_size}: give one (per-channel or per-group)")
    if group_size is not None:
        check_positive("group_size", group_size)
        check(x.dim() > 0 and x.shape[-1] % group_size == 0, "group_size", group_size,
              f"must divide the last dimension of a tensor of shape {tuple(x.shape)}")  # fmt: skip
    if axis is not None:
        check(-x.dim() <= axis < x.dim(), "axis", axis, f"must be a dimension of a {x.dim()}-D tensor")
        axis %= x.dim()
    expected = scale_shape(x.shape, axis, group_size)
    for name, t in (("scale", scale), ("zero_point", zero_point)):
        if t is not None and tuple(t.shape) != expected:
            raise ConfigError(f"fake_quantize: {name} of shape {tuple(t.shape)} for a tensor of shape "
                              f"{tuple(x.shape)} (axis={axis}, group_size={group_size}) needs {expected}")  # fmt: skip
    return axis


class _FakeQuantize(torch.autograd.Function):
    """x̃ = dequant(quant(x)) with the clamp-masked straight-through gradient (module doc)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor | None, bits: int, axis: int | None,
                group_size: int | None) -> Tensor:  # fmt: skip
        xv, s = _broadcast(x.detach(), scale.detach().float(), axis, group_size)
        z = None if zero_point is None else _broadcast(x, zero_point.detach(), axis, group_size)[1]
        codes = symmetric_codes(xv, s, bits) if z is None else asymmetric_codes(xv, s, z, bits)
        if ctx.needs_input_grad[0]:
            lo, hi = _grid(bits, z is None)
            unclamped = torch.round(xv.float() / s.clamp_min(_TINY))
            if z is not None:
                unclamped = unclamped + z.float()
            ctx.save_for_backward(((unclamped >= lo) & (unclamped <= hi)).reshape(x.shape))
        return dequantize_codes(codes, s, z).reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None, None, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None, None


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None = None, bits: int = 8, *,
                  axis: int | None = None, group_size: int | None = None) -> Tensor:  # fmt: skip
    """x̃ = dequant(quant(x)) in x's dtype on the given grid (symmetric when `zero_point` is None, else asymmetric),
    scales (and zero points) of primitives' `scale_shape(x.shape, axis, group_size)`: per tensor, per channel along
    `axis`, or per `group_size` elements of the last dimension. Backward: the straight-through estimator masked to
    the codes the clamp keeps (module doc); `scale` and `zero_point` get no gradient."""
    if not x.is_floating_point():
        raise TypeError(f"fake_quantize takes a floating-point tensor, got {x.dtype}")
    _check_bits("bits", bits)
    axis = _check_params(x, scale, zero_point, axis, group_size)
    return _FakeQuantize.apply(x, scale, zero_point, bits, axis, group_size)


def fake_quantize_per_token(x: Tensor, bits: int = 8) -> Tensor:
    """Dynamic per-token symmetric fake quantization of activations: s_t = max_j |x_tj| / qmax for each row of the
    last dimension (primitives' `quantize_per_token`), gradient straight through (absmax clips nothing)."""
    scale = x.detach().abs().amax(dim=-1, keepdim=True).float() / qmax(bits)
    return fake_quantize(x, scale, None, bits, group_size=x.shape[-1])


class FakeQuantLinear(nn.Module):
    """A linear layer trained through fake quantization: y = x̃ W̃ᵀ + b, where W̃ is the latent weight W fake-quantized
    on scales computed from W at each call (per output channel when `group_size` is None, else per `group_size`
    input columns; symmetric or asymmetric), and x̃ the input fake-quantized per token to `activations` bits (None:
    x as it is). `weight` and `bias` are float parameters (the layer's own when made `from_linear`)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None, *, bits: int = 4,
                 group_size: int | None = 128, symmetric: bool = True,
                 activations: int | None = None) -> None:  # fmt: skip
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"FakeQuantLinear takes a 2-D weight (out, in), got shape {tuple(weight.shape)}")
        _check_bits("bits", bits)
        if activations is not None:
            _check_bits("activations", activations)
        self.out_features, self.in_features = weight.shape
        if group_size is not None:
            check_positive("group_size", group_size)
            check(self.in_features % group_size == 0, "group_size", group_size,
                  f"must divide in_features={self.in_features}")  # fmt: skip
        self.bits, self.group_size, self.symmetric, self.activations = bits, group_size, symmetric, activations
        self.weight = weight
        self.register_parameter("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> FakeQuantLinear:
        """The layer over `linear`'s own weight and bias parameters (the same tensors: training one trains both)."""
        return cls(linear.weight, linear.bias, **options)

    def _layout(self) -> dict[str, int]:
        return {"axis": 0} if self.group_size is None else {"group_size": self.group_size}

    def weight_qparams(self) -> tuple[Tensor, Tensor | None]:
        """(scale, zero point or None) of the current weight: primitives' absmax or min/max grid, float32 scales of
        shape (out,) per channel or (out, in / group_size) per group, uint8 zero points alike."""
        w = self.weight.detach()
        rows = w.reshape(-1, self.group_size or self.in_features)  # per channel (axis 0): the rows of W
        shape = scale_shape(w.shape, **self._layout())
        if self.symmetric:
            return (rows.abs().amax(dim=1).float() / qmax(self.bits)).reshape(shape), None
        scale, zero = asymmetric_params(rows.amin(dim=1), rows.amax(dim=1), self.bits)
        return scale.reshape(shape), zero.reshape(shape)

    def fake_quantized_weight(self) -> Tensor:
        """W̃ (differentiable, STE) in the weight's dtype."""
        scale, zero = self.weight_qparams()
        return fake_quantize(self.weight, scale, zero, self.bits, **self._layout())

    def quantized(self) -> QuantizedTensor:
        """The weight's integer codes and scales (bits 4 or 8): what W̃ stands for, `quantized().dequantize() == W̃`."""
        scale, zero = self.weight_qparams()
        return quantize_static(self.weight.detach(), scale, zero, self.bits, **self._layout())

    def forward(self, x: Tensor) -> Tensor:
        if self.activations is not None:
            x = fake_quantize_per_token(x, self.activations)
        return F.linear(x, self.fake_quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        grid = f"group_size={self.group_size}" if self.group_size else "per-channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, {grid}, symmetric={self.symmetric}, activations={self.activations}")  # fmt: skip


def prepare_qat(model: nn.Module, bits: int = 4, group_size: int | None = 128, activations: int | None = None,
                where: Where = "blocks.*", *, symmetric: bool = True) -> Swap:  # fmt: skip
    """Replace, in place, every `nn.Linear` that `where` selects (default: all under `blocks`, so not the embedding
    nor the LM head) by a `FakeQuantLinear` over its own parameters: state-dict names and tensors are unchanged, so
    an optimizer built before or after trains the same weights. Returns the `Swap` (`restore()` gives back the plain
    layers, holding the trained latent weights). A `group_size` that does not divide some selected layer's input
    width raises `ConfigError` naming it, and nothing is swapped. Expert matrices (`ExpertLinear`) stay as they are."""

    def factory(name: str, old: nn.Module) -> FakeQuantLinear:
        try:
            return FakeQuantLinear.from_linear(old, bits=bits, group_size=group_size, symmetric=symmetric,
                                               activations=activations)  # fmt: skip
        except ConfigError as e:
            raise ConfigError(f"prepare_qat: {name}: {e}") from None

    return swap_modules(model, linear_where(where), factory)


def convert_qat(model: nn.Module) -> nn.Module:
    """Replace, in place, every `FakeQuantLinear` of `model` by an `nn.Linear` whose weight is W̃ (the fake-quantized
    weight, baked in; bias unchanged): the float model the QAT forward computed, without the activation fake
    quantization (an inference path applies its own). Returns the model; raises `SurgeryError` if it has none."""

    factory = lambda _, old: baked_linear(old, old.fake_quantized_weight())
    swap_modules(model, lambda _, m: isinstance(m, FakeQuantLinear), factory)
    return model


@torch.no_grad()
def baked_linear(layer: nn.Module, weight: Tensor) -> nn.Linear:
    """An `nn.Linear` holding `weight` (a quantization-aware layer's effective weight) and `layer`'s bias."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device,
                       dtype=layer.weight.dtype)  # fmt: skip
    linear.weight.copy_(weight)
    if layer.bias is not None:
        linear.bias.copy_(layer.bias)
    return linear
