"""Round-to-nearest (RTN) weight-only quantization: no calibration, each group of G input columns of an output row
on its own grid, packed into `QuantLinear` layers (quant/weight_only.py). The baseline GPTQ and AWQ improve on.

With lo = min(min w, 0), hi = max(max w, 0) over a group (quant/primitives.py, which holds the equations):

    asymmetric (default)   s = (hi - lo) / (2^b - 1),  z = round(-lo / s),  q = clamp(round(w / s) + z, 0, 2^b - 1)
    symmetric (absmax)     s = max |w| / (2^(b-1) - 1),  q = clamp(round(w / s), -qmax, qmax)

    ŵ = (q - z) · s,   |w - ŵ| <= s / 2

`group_size=None` is one grid per output row (per channel): `int8` is RTN with bits 8, per channel, symmetric
(absmax int8 weight-only).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model.surgery import Swap, Where, swap_modules
from lmforge.quant.nf4 import linear_where
from lmforge.quant.primitives import QuantError, quantize_asymmetric, quantize_symmetric
from lmforge.quant.weight_only import QuantLinear

__all__ = ["rtn_linear", "rtn_quantize_model"]


def _group(group_size: int | None, linear: nn.Linear, name: str) -> int:
    g = linear.in_features if group_size is None else group_size
    if g < 1 or linear.in_features % g:
        raise QuantError(f"RTN: group_size={group_size} does not divide {name}'s {linear.in_features} input features")
    return g


@torch.no_grad()
def rtn_linear(linear: nn.Linear, *, bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
               name: str = "the linear") -> QuantLinear:  # fmt: skip
    """`linear` quantized by RTN (module doc) as a `QuantLinear` (the float layer is not kept)."""
    g = _group(group_size, linear, name)
    quantize = quantize_symmetric if symmetric else quantize_asymmetric
    q = quantize(linear.weight.detach().float(), bits, group_size=g)
    return QuantLinear.from_codes(q.codes(), q.scale, q.zero_point, linear.bias, bits=bits, group_size=g)


def rtn_quantize_model(model: nn.Module, *, bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
                       where: Where = "blocks.*") -> Swap:  # fmt: skip
    """Replace, in place, every `nn.Linear` that `where` selects (default: every projection in the blocks, not the
    LM head) by its RTN `QuantLinear`. Bits other than 4 and 8, and a group size that does not divide a selected
    layer's inputs, are refused before any layer changes."""
    if bits not in (4, 8):
        raise QuantError(f"RTN packs 4- or 8-bit codes, not bits={bits}")
    select = linear_where(where)
    for name, m in model.named_modules():
        if select(name, m):
            _group(group_size, m, name)
    factory = lambda name, old: rtn_linear(old, bits=bits, group_size=group_size, symmetric=symmetric, name=name)
    return swap_modules(model, select, factory)
