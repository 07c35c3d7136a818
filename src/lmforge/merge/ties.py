"""TIES-merging (Yadav et al. 2023, arXiv:2306.01708): Trim, Elect sign, disjoint mean.

1. Trim: per task vector tau_i = theta_i - theta_base keep the k = max(1, floor(density * numel)) entries of
   largest |tau_i| (ties broken as `torch.argsort` does), zero the rest (density >= 1 keeps all, <= 0 none).
2. Elect: per entry the sign of sum_i w_i tau_i (mergekit's consensus "sum"; >= 0 counts as +).
3. Disjoint mean: merged = theta_base + lambda * sum_{i agrees} w_i tau_i / sum_{i agrees} w_i
   (normalize=True, the default; a zero weight sum counts as 1).

Steps 2-3 are `task_arithmetic.combine(consensus=True)`. `rescale` (off by default) rescales each trimmed tau_i
to its original L1 norm, as mergekit's `rescale: true`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lmforge.merge.task_arithmetic import Rescale, combine, mask_delta, task_vector


def trim(delta: Tensor, density: float, rescale: Rescale = None) -> Tensor:
    """Keep the max(1, floor(density * numel)) entries of `delta` of largest magnitude, zero the others."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.argsort(delta.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return mask_delta(delta, mask.reshape_as(delta), rescale, density)


def ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
         normalize: bool = True, lam: float = 1.0, rescale: Rescale = None) -> Tensor:  # fmt: skip
    """TIES-merge fine-tuned `tensors` into `base` (one weight and one density per fine-tuned tensor)."""
    deltas = [trim(task_vector(t, base), d, rescale) for t, d in zip(tensors, densities, strict=True)]
    return combine(base, deltas, weights, consensus=True, normalize=normalize, lam=lam)
