"""Linear merge ("model soup", Wortsman et al. 2022, arXiv:2203.05482): a weighted average of the inputs.

    merged = sum_i w_i * theta_i / sum_i w_i        (normalize=True, mergekit's default)
    merged = sum_i w_i * theta_i                    (normalize=False)

Every tensor of every input takes part (a base model, if named, is just one more input with its own weight).
The sum is accumulated in float32 (float64 for float64 inputs) and cast back to the inputs' dtype, in the order
the inputs are given, as mergekit's `linear` does, so the result is bit-identical to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def work_dtype(t: Tensor) -> torch.dtype:
    """The precision merges accumulate in: float64 for float64 inputs, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def linear(tensors: Sequence[Tensor], weights: Sequence[float], normalize: bool = True) -> Tensor:
    """sum_i weights[i] * tensors[i], divided by sum_i weights[i] when `normalize`; same shape and dtype."""
    first = tensors[0]
    dtype = work_dtype(first)
    w = torch.tensor([list(weights)], dtype=dtype)  # (1, n): one row of coefficients, as mergekit packs them
    result = torch.zeros_like(first, dtype=dtype)
    for tensor, coefficient in zip(tensors, w.unbind(1), strict=True):
        result.addcmul_(tensor, coefficient)
    if normalize:
        result.div_(w.sum(dim=1))
    return result.to(first.dtype)
