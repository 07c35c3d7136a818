"""Adafactor (Shazeer & Stern 2018), matching `torch.optim.Adafactor` (relative step, no first moment):
    β̂2 ← 1 − t^decay          ρ ← min(lr, 1/√t)          α ← max(ε2, RMS(p)) · ρ      (RMS of p before decay)
    p ← p · (1 − lr·wd)
    for ≥2-D p (factored over the last two dims, n rows × m cols):
        R ← β̂2·R + (1 − β̂2)·mean_cols(g²)      C ← β̂2·C + (1 − β̂2)·mean_rows(g²)
        V̂ ← R·C / max(mean(R), ε1)              (outer product: n + m numbers stand for n·m)
    for vectors: V̂ ← β̂2·V̂ + (1 − β̂2)·g²
    U ← g / √max(V̂, ε1²)        p ← p − α · U / max(1, RMS(U)/d)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmforge.train.optim.base import Params, _check, _check_common, _Optimizer


class Adafactor(_Optimizer):
    """Adafactor with factored second moments for ≥2-D parameters (torch.optim.Adafactor semantics)."""

    shardable = False  # the row and column statistics of a sharded matrix would need in-place re-placement

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
    ) -> None:
        _check_common(lr, weight_decay)
        _check(beta2_decay <= 0.0, "beta2_decay", beta2_decay, "<= 0")
        ok = len(eps) == 2 and (eps[0] is None or eps[0] >= 0.0) and eps[1] >= 0.0
        _check(ok, "eps", eps, "(eps1 >= 0 or None, eps2 >= 0)")
        _check(d >= 1.0, "d", d, ">= 1 (the update-clipping threshold)")
        defaults = {
            "lr": lr,
            "beta2_decay": beta2_decay,
            "eps": eps,
            "d": d,
            "weight_decay": weight_decay,
            "maximize": maximize,
        }
        super().__init__(params, defaults)

    def _update(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        factored = grad.dim() > 1
        if not state:
            state["step"] = 0
            if factored:
                state["row_var"] = grad.new_zeros((*grad.shape[:-1], 1))
                state["col_var"] = grad.new_zeros((*grad.shape[:-2], 1, grad.shape[-1]))
            else:
                state["variance"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        state["step"] += 1
        t = float(state["step"])
        lr, weight_decay = group["lr"], group["weight_decay"]
        eps1, eps2 = group["eps"]
        if eps1 is None:
            eps1 = torch.finfo(p.dtype).eps

        one_minus_beta2 = t ** group["beta2_decay"]
        rho = min(lr, 1 / t**0.5)
        alpha = max(eps2, p.norm(2).item() / p.numel() ** 0.5) * rho
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)

        if factored:
            row_var, col_var = state["row_var"], state["col_var"]
            # mean of g² over the columns (per row) and over the rows (per column), via norms (no g² temporary)
            row_var.lerp_(torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1)), one_minus_beta2)
            col_var.lerp_(torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2)), one_minus_beta2)
            var_estimate = row_var @ col_var
            var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
        else:
            state["variance"].lerp_(grad * grad, one_minus_beta2)
            var_estimate = state["variance"].clone()

        update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)
        clip = max(1.0, update.norm(2).item() / (update.numel() ** 0.5 * group["d"]))
        p.add_(update, alpha=-alpha / clip)
