"""SGD with momentum μ, dampening τ and Nesterov, matching `torch.optim.SGD`:
    g ← g + wd·p
    b ← g on the first step, else μ·b + (1 − τ)·g
    d ← g + μ·b if nesterov else b         p ← p − lr·d
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lmforge.train.optim.base import Params, _check, _check_common, _Optimizer


class SGD(_Optimizer):
    """SGD with momentum, dampening and Nesterov momentum (torch.optim.SGD semantics)."""

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        _check_common(lr, weight_decay)
        _check(momentum >= 0.0, "momentum", momentum, ">= 0")
        if nesterov:
            _check(momentum > 0 and dampening == 0, "nesterov", nesterov, "used with momentum > 0 and dampening 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
        }
        super().__init__(params, defaults)

    def _update(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if group["weight_decay"] != 0:
            grad = grad.add(p, alpha=group["weight_decay"])
        momentum = group["momentum"]
        if momentum != 0:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = grad.detach().clone()
            else:
                state["momentum_buffer"].mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            buf = state["momentum_buffer"]
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(grad, alpha=-group["lr"])
