"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):
    c ← β1·m + (1 − β1)·g
    p ← p − lr·(sign(c) + wd·p)
    m ← β2·m + (1 − β2)·g
Every coordinate moves by ±lr: the update has the size of a sign, so Lion wants a 3-10x smaller lr than AdamW.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmforge.train.optim.base import Params, _check_betas, _check_common, _Optimizer


class Lion(_Optimizer):
    """Lion: the sign of an interpolated momentum, with decoupled weight decay."""

    def __init__(
        self,
        params: Params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
    ) -> None:
        _check_common(lr, weight_decay)
        _check_betas(betas)
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "maximize": maximize})

    def _update(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        m = state["exp_avg"]
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        direction = m.lerp(grad, 1 - beta1).sign_()
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(direction, alpha=-lr)
        m.lerp_(grad, 1 - beta2)
