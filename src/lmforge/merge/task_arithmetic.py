"""Task arithmetic (Ilharco et al. 2023, arXiv:2212.04089): models as a base plus task vectors.

    tau_i  = theta_i - theta_base                      (extract: what fine-tuning i changed)
    merged = theta_base + lambda * sum_i w_i tau_i      (add; normalize=True divides the sum by sum_i w_i)
    -tau                                                (negate: subtract a task, "forgetting" it)

TIES, DARE and breadcrumbs are the same sum after two optional steps, and reuse `combine`:

* sparsify each tau_i (keep a fraction `density` of its entries: `mask_delta` applies a 0/1 mask and rescales
  what is kept, either to the L1 norm it had, mergekit's `rescale`, or by 1 / density, the DARE paper's rule);
* sign consensus (TIES): per entry, the elected sign is that of sum_i w_i tau_i (>= 0 counts as +); only the
  weighted deltas agreeing with it are summed, and normalize divides by the sum of their weights ("disjoint
  mean"; a zero sum counts as 1).

Arithmetic in the inputs' dtype and in mergekit's order (`GeneralizedTaskArithmeticMerge`): bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Rescale = Literal["l1", "paper"] | None  # l1: mergekit's `rescale: true`; paper: DARE's 1 / (1 - p) = 1 / density


def task_vector(finetuned: Tensor, base: Tensor) -> Tensor:
    """tau = finetuned - base."""
    return finetuned - base


def negate(delta: Tensor) -> Tensor:
    """-tau: adding it removes the task from a model."""
    return -delta


def mask_delta(delta: Tensor, mask: Tensor, rescale: Rescale, density: float, eps: float = 1e-7) -> Tensor:
    """delta * mask, rescaled as `rescale` says: "l1" to delta's L1 norm (skipped where either norm is below
    `eps`), "paper" by 1 / density, None not at all."""
    masked = delta * mask
    if rescale == "paper":
        return masked / density
    if rescale == "l1":
        before, after = delta.abs().sum(), masked.abs().sum()
        if before >= eps and after >= eps:
            return masked * (before / after)
    return masked


def elect_sign(deltas: Tensor) -> Tensor:
    """TIES's sign election over stacked weighted deltas (n, ...): True where delta_i has the sign of sum_i
    delta_i (a zero sum elects +)."""
    sign = deltas.sign()
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return sign == majority


def combine(base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float], *, consensus: bool = False,
            normalize: bool = False, lam: float = 1.0) -> Tensor:  # fmt: skip
    """base + lam * (the weighted sum of `deltas`, with TIES sign `consensus`, divided by the weights when
    `normalize`), in base's dtype."""
    stacked = base.new_empty((len(deltas), *base.shape))
    for i, delta in enumerate(deltas):
        stacked[i] = delta
    w = torch.tensor(list(weights), dtype=stacked.dtype)
    while w.dim() < stacked.dim():
        w.unsqueeze_(-1)
    stacked.mul_(w)
    if consensus:
        mask = elect_sign(stacked)
        mixed = (stacked * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


def task_arithmetic(base: Tensor, tensors: Sequence[Tensor], weights: Sequence[float], normalize: bool = False,
                    lam: float = 1.0) -> Tensor:  # fmt: skip
    """base + lam * sum_i weights[i] * (tensors[i] - base) (divided by sum_i weights[i] when `normalize`)."""
    return combine(base, [task_vector(t, base) for t in tensors], weights, normalize=normalize, lam=lam)
