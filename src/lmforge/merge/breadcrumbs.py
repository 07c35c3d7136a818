"""Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795): mask out both tails of each task vector.

Per task vector tau_i = theta_i - theta_base with n entries sorted by |tau_i| (ascending, as `torch.sort`):
drop the gamma * n largest (outliers) and the smallest, keeping the floor(density * n) in between:

    keep ranks [n_bot, n_bot + floor(density n)),   n_bot = max(0, n - floor(density n) - floor(gamma n))

(the outlier cut shrinks when density + gamma > 1). Then `breadcrumbs` adds the masked task vectors linearly
(mergekit's `breadcrumbs`), `breadcrumbs_ties` with TIES's sign election (mergekit's `breadcrumbs_ties`).
Deterministic: no random draw. Defaults gamma = 0.01, normalize off, no rescale, as mergekit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lmforge.merge.task_arithmetic import Rescale, combine, mask_delta, task_vector

GAMMA = 0.01


def crumbs(delta: Tensor, density: float, gamma: float = GAMMA, rescale: Rescale = None) -> Tensor:
    """`delta` with its gamma-fraction of largest-magnitude entries and its smallest ones zeroed (module doc)."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[torch.sort(delta.abs().reshape(-1).float(), descending=False).indices[bottom : bottom + keep]] = 1
    return mask_delta(delta, mask.reshape_as(delta), rescale, density)


def _crumbled(base: Tensor, tensors: Sequence[Tensor], densities: Sequence[float], gammas: Sequence[float],
              rescale: Rescale) -> list[Tensor]:  # fmt: skip
    return [crumbs(task_vector(t, base), d, g, rescale) for t, d, g in zip(tensors, densities, gammas, strict=True)]


def breadcrumbs(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
                gammas: Sequence[float], normalize: bool = False, lam: float = 1.0,
                rescale: Rescale = None) -> Tensor:  # fmt: skip
    """base + lam * sum_i weights[i] * crumbs(tensors[i] - base)."""
    deltas = _crumbled(base, tensors, densities, gammas, rescale)
    return combine(base, deltas, weights, normalize=normalize, lam=lam)


def breadcrumbs_ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
                     gammas: Sequence[float], normalize: bool = False, lam: float = 1.0,
                     rescale: Rescale = None) -> Tensor:  # fmt: skip
    """The breadcrumbs-masked task vectors combined with TIES's sign election and disjoint sum."""
    deltas = _crumbled(base, tensors, densities, gammas, rescale)
    return combine(base, deltas, weights, consensus=True, normalize=normalize, lam=lam)
