"""Gradient clipping by the global norm (Pascanu et al., 2013, "On the difficulty of training RNNs").

    g_norm = || ( ||g_1||_2, ..., ||g_n||_2 ) ||_2      the 2-norm of every parameter's gradient together
    g_i   <- g_i * min(1, max_norm / (g_norm + 1e-6))   every gradient scaled by the same factor

so the update keeps its direction and its size is at most `max_norm` (the 1e-6 keeps a zero gradient finite). The
norm is returned whether or not it clipped: the trainer logs it and stops on a non-finite one. `max_norm=inf`
only measures. Gradients may be FSDP2 shards (DTensors): each norm and the stack are DTensor ops, so the result
is the norm of the whole model's gradient (itself a DTensor; `.full_tensor()` is its value on every rank).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients of `parameters` in place so their global 2-norm is at most `max_norm`; return the
    norm before clipping (0 when no parameter has a gradient)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, 2.0)
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)
    if math.isinf(max_norm):
        return total
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, scale.to(grads[0].device))
    return total
