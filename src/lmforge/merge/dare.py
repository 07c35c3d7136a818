"""DARE, Drop And REscale (Yu et al. 2023, arXiv:2311.03099): drop each entry of a task vector at random with
probability p = 1 - density, rescale what is left, then add the task vectors linearly or TIES-style.

    m ~ Bernoulli(density) per entry,   tau'_i = rescale(m * tau_i)

`rescale` is one of
    "paper": tau' = m * tau / (1 - p)            (the paper: unbiased, E[tau'] = tau)
    "l1":    tau' = m * tau * |tau|_1 / |m tau|_1 (mergekit's `rescale: true`, its default for DARE)
    None:    tau' = m * tau

then `dare_linear`: theta_base + lambda * sum_i w_i tau'_i (mergekit's `dare_linear`, normalize off by default),
and `dare_ties`: the TIES sign election and disjoint sum of `ties` (mergekit's `dare_ties`).

The mask is drawn with `torch.bernoulli` on a float32 tensor full of `density`, one per task vector in input
order, from `generator` (the default one when None): seeded the same way as torch's global generator, the masks
are mergekit's. Or pass the masks in (`masks`) to apply a known drop pattern.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lmforge.merge.task_arithmetic import Rescale, combine, mask_delta, task_vector


def drop_mask(delta: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """A float 0/1 mask shaped like `delta`, each entry 1 with probability `density`."""
    dtype = delta.dtype if delta.dtype == torch.bfloat16 else torch.float32  # no CPU bernoulli for float16
    return torch.bernoulli(torch.full_like(delta, density, dtype=dtype), generator=generator)


def dare(delta: Tensor, density: float, rescale: Rescale = "l1", mask: Tensor | None = None,
         generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """Randomly drop entries of task vector `delta` (keep probability `density`) and rescale the rest."""
    if density >= 1:
        return delta
    if mask is None:
        mask = drop_mask(delta, density, generator)
    return mask_delta(delta.to(mask.dtype), mask, rescale, density).to(delta.dtype)


def _dropped(base: Tensor, tensors: Sequence[Tensor], densities: Sequence[float], rescale: Rescale,
             masks: Sequence[Tensor] | None, generator: torch.Generator | None) -> list[Tensor]:  # fmt: skip
    masks = masks if masks is not None else [None] * len(tensors)
    return [dare(task_vector(t, base), d, rescale, m, generator)
            for t, d, m in zip(tensors, densities, masks, strict=True)]  # fmt: skip


def dare_linear(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
                normalize: bool = False, lam: float = 1.0, rescale: Rescale = "l1",
                masks: Sequence[Tensor] | None = None, generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """base + lam * sum_i weights[i] * dare(tensors[i] - base)."""
    deltas = _dropped(base, tensors, densities, rescale, masks, generator)
    return combine(base, deltas, weights, normalize=normalize, lam=lam)


def dare_ties(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], densities: Sequence[float],
              normalize: bool = False, lam: float = 1.0, rescale: Rescale = "l1",
              masks: Sequence[Tensor] | None = None, generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """DARE's dropped task vectors combined with TIES's sign election and disjoint sum."""
    deltas = _dropped(base, tensors, densities, rescale, masks, generator)
    return combine(base, deltas, weights, consensus=True, normalize=normalize, lam=lam)
