"""The shared base of lmforge's optimizers: the step loop, the argument checks and a state-size count.

Each optimizer is a `torch.optim.Optimizer`, so `state_dict` / `load_state_dict` resume a run bit for bit and a
learning-rate schedule can set `group["lr"]` per parameter group. `_Optimizer.step` visits every parameter that has
a gradient and hands its optimizer's `_update` the gradient g (negated when `maximize`), the parameter's state and
its group. Notation in the optimizers' files: p parameter, g gradient, t the step count starting at 1, lr the
group's learning rate, wd its weight decay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

Params = Iterable[Tensor] | Iterable[dict[str, Any]]


# ---------------------------------------------------------------------------------------------------------------
# argument checks


def _check(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: must be {rule}")


def _check_common(lr: float, weight_decay: float, eps: float | None = None) -> None:
    _check(lr >= 0.0, "lr", lr, ">= 0")
    _check(weight_decay >= 0.0, "weight_decay", weight_decay, ">= 0")
    if eps is not None:
        _check(eps >= 0.0, "eps", eps, ">= 0")


def _check_betas(betas: tuple[float, float], name: str = "betas") -> None:
    ok = len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)
    _check(ok, name, betas, "two numbers in [0, 1)")


# ---------------------------------------------------------------------------------------------------------------
# the shared step loop


class _Optimizer(Optimizer):
    """A `torch.optim.Optimizer` whose `step` visits each parameter with a gradient and calls `_update`."""

    shardable = True  # whether `_update` works on FSDP2 shards (DTensor parameters)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                grad = -p.grad if group.get("maximize", False) else p.grad
                self._update(p, grad, self.state[p], group)
        return loss

    def _update(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments, codes, scales; not the parameters)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
