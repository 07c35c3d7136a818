"""Adam and AdamW, and the one Adam(W) step that Muon and 8-bit AdamW reuse.

AdamW (Loshchilov & Hutter 2019; decoupled decay), matching `torch.optim.AdamW`:
    p ← p · (1 − lr·wd)
    m ← β1·m + (1 − β1)·g            v ← β2·v + (1 − β2)·g²
    p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)

Adam (Kingma & Ba 2015), matching `torch.optim.Adam`: the same update, but the decay is an L2 term added to the
gradient first, g ← g + wd·p, so it is rescaled by the adaptive denominator like the rest of the gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmforge.train.optim.base import Params, _check_betas, _check_common, _Optimizer


def _adam_update(
    p: Tensor,
    grad: Tensor,
    m: Tensor,
    v: Tensor,
    step: int,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> None:
    """One Adam(W) step on `p`, updating the moments `m`, `v` in place; `step` is t (from 1).

    The operations and their order are torch.optim's single-tensor Adam, so the results agree bit for bit."""
    beta1, beta2 = betas
    if weight_decay != 0:
        if decoupled:
            p.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(p, alpha=weight_decay)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bias_correction1)


def _adam_state(p: Tensor, state: dict[str, Any]) -> int:
    """Create the float moments on first use; advance and return the step count."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1
    return state["step"]


class Adam(_Optimizer):
    """Adam with L2 weight decay added to the gradient (torch.optim.Adam semantics, without amsgrad).

    `weight_decay` None: the class default (0 for Adam, 1e-2 for AdamW, as in torch.optim)."""

    decoupled = False
    default_weight_decay = 0.0

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        *,
        maximize: bool = False,
    ) -> None:
        weight_decay = self.default_weight_decay if weight_decay is None else weight_decay
        _check_common(lr, weight_decay, eps)
        _check_betas(betas)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "maximize": maximize}
        super().__init__(params, defaults)

    def _update(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        step = _adam_state(p, state)
        _adam_update(
            p,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            step,
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled=self.decoupled,
        )


class AdamW(Adam):
    """Adam with decoupled weight decay p ← p·(1 − lr·wd) (torch.optim.AdamW semantics, without amsgrad)."""

    decoupled = True
    default_weight_decay = 1e-2
