"""Matrix-vector products for decode steps.

A decode step multiplies one row by every weight matrix: pure memory traffic (2 flops per 4 bytes in fp32).
On CPU, BLAS's row-by-matrix `linear` streams the weights at about half the machine's read bandwidth. Written
as a broadcast multiply and a sum,

    y_o = sum_i x_i W_oi

inductor fuses it into one vectorized pass over W's rows (accumulating in float32) that runs near memory speed
(see benchmarks/decode.py). `matvec_view(model)` is a view of a model (its module tree copied, every parameter
shared: `lmforge.model.surgery.view`) whose `nn.Linear`s use that form; the model itself is not changed.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model.surgery import swap_modules, view


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; for one row under `torch.compile`, as multiply + sum (module doc)."""
    if x.numel() != x.shape[-1] or not torch.compiler.is_compiling():
        return nn.functional.linear(x, weight, bias)
    y = (x.unsqueeze(-2).float() * weight.float()).sum(-1).to(x.dtype)  # (..., 1, in) * (out, in) -> (..., out)
    return y if bias is None else y + bias


class MatVecLinear(nn.Module):
    """An `nn.Linear`'s parameters, applied with `matvec`."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matvec(x, self.weight, self.bias)


def matvec_view(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree sharing all its parameters and buffers, with `MatVecLinear`s."""
    plain_linear = lambda _, m: type(m) is nn.Linear  # not its subclasses: they compute otherwise
    if not any(plain_linear(n, m) for n, m in model.named_modules()):  # e.g. every linear quantized
        return view(model)
    return swap_modules(model, plain_linear, lambda _, linear: MatVecLinear(linear), on_view=True).model
