"""Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"), for 2-D hidden weights, matching
`torch.optim.Muon`:
    b ← μ·b + (1 − μ)·g                        (torch's lerp form of the momentum buffer)
    u ← (1 − μ)·g + μ·b if nesterov else b
    O ← NS₅(u)                                  (≈ U·Vᵀ of u = U·S·Vᵀ: the orthogonalised update)
    p ← p · (1 − lr·wd)          p ← p − lr·s(shape) · O
NS is a quintic Newton-Schulz iteration run in bfloat16 on X = u/‖u‖_F (transposed so rows ≤ cols):
    X ← a·X + (b·A + c·A²)·X,  A = X·Xᵀ,  (a, b, c) = (3.4445, −4.7750, 2.0315),  5 times.
It pushes every singular value towards ~1 (into roughly [0.5, 1.5]), so all directions of the update move at the
same rate. s(shape) is √max(1, rows/cols) ("original") or 0.2·√max(rows, cols) ("match_rms_adamw", Moonlight's
scaling that lets Muon reuse AdamW's lr and weight decay). Muon is only defined for matrices whose rows and
columns are hidden features, so lmforge's `Muon` takes *all* parameters and routes embeddings, the output head and
every non-2-D parameter (norms, biases) to an AdamW update with their own lr — the "Muon + AdamW" recipe of
modded-nanogpt and Moonlight. `param_groups(model, ..., muon=True)` marks which is which.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lmforge.train.optim.adam import _adam_state, _adam_update
from lmforge.train.optim.base import Params, _check, _check_betas, _check_common, _Optimizer

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz(
    g: Tensor, coefficients: tuple[float, float, float] = NS_COEFFICIENTS, steps: int = 5, eps: float = 1e-7
) -> Tensor:
    """≈ U·Vᵀ for g = U·S·Vᵀ (2-D), by `steps` quintic Newton-Schulz iterations in bfloat16 (see module doc)."""
    if g.ndim != 2:
        raise ValueError(f"Newton-Schulz orthogonalisation needs a 2-D matrix, got shape {tuple(g.shape)}")
    a, b, c = coefficients
    tall = g.size(0) > g.size(1)
    x = g.bfloat16()
    if tall:  # iterate on the wide orientation: A = X·Xᵀ is then the smaller Gram matrix
        x = x.T
    x.div_(x.norm().clamp(min=eps))  # ‖X‖₂ ≤ ‖X‖_F = 1: singular values start inside the basin [0, 1]
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b·A + c·A²
        x = torch.addmm(x, poly, x, beta=a)  # a·X + (b·A + c·A²)·X
    return x.T if tall else x


def _muon_lr_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))  # "match_rms_adamw"


class Muon(_Optimizer):
    """Muon for 2-D hidden weights, AdamW for everything else (see module docstring).

    A parameter group may say `use_muon`: True (every parameter must be 2-D) or False (AdamW). A group that does
    not say is split: its 2-D parameters use Muon, the rest AdamW. `param_groups(model, ..., muon=True)` also sends
    embeddings and the output head to AdamW, which a bare list of tensors cannot tell apart from hidden matrices.
    AdamW groups use `adamw_lr` unless they set their own `lr`, and `adamw_betas` / `adamw_eps`; `weight_decay`
    applies to both kinds. On Muon groups the update equals `torch.optim.Muon` with the same arguments.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 0.02,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
    ) -> None:
        _check_common(lr, weight_decay, eps)
        _check(adamw_lr >= 0.0, "adamw_lr", adamw_lr, ">= 0")
        _check(adamw_eps >= 0.0, "adamw_eps", adamw_eps, ">= 0")
        _check(0.0 <= momentum < 1.0, "momentum", momentum, "in [0, 1)")
        _check(len(ns_coefficients) == 3, "ns_coefficients", ns_coefficients, "three numbers (a, b, c)")
        _check(isinstance(ns_steps, int) and 0 < ns_steps < 100, "ns_steps", ns_steps, "an integer in [1, 99]")
        allowed = (None, "original", "match_rms_adamw")
        _check(adjust_lr_fn in allowed, "adjust_lr_fn", adjust_lr_fn, "None, 'original' or 'match_rms_adamw'")
        _check_betas(adamw_betas, "adamw_betas")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": tuple(ns_coefficients),
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
            "adamw_betas": adamw_betas,
            "adamw_eps": adamw_eps,
        }
        super().__init__(self._route(params, adamw_lr), defaults)
        for group in self.param_groups:
            for p in group["params"] if group["use_muon"] else ():
                if p.ndim != 2:
                    raise ValueError(f"a use_muon group holds a parameter of shape {tuple(p.shape)}; Muon needs 2-D")

    @staticmethod
    def _route(params: Params, adamw_lr: float) -> list[dict[str, Any]]:
        """Split groups without `use_muon` into a 2-D Muon part and an AdamW rest; give AdamW groups `adamw_lr`."""
        groups = list(params)
        if not groups:
            raise ValueError("Muon got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        routed = []
        for group in groups:
            ps = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
            if "use_muon" in group:
                routed.append({**group, "params": ps})
                continue
            for use_muon, part in ((True, [p for p in ps if p.ndim == 2]), (False, [p for p in ps if p.ndim != 2])):
                if part:
                    routed.append({**group, "params": part, "use_muon": use_muon})
        for group in routed:
            if not group["use_muon"]:
                group.setdefault("lr", adamw_lr)
        return routed

    def _update(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        lr, weight_decay = group["lr"], group["weight_decay"]
        if not group["use_muon"]:
            step = _adam_state(p, state)
            betas, eps = group["adamw_betas"], group["adamw_eps"]
            m, v = state["exp_avg"], state["exp_avg_sq"]
            _adam_update(p, grad, m, v, step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=True)
            return
        if not state:
            state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        buf, momentum = state["momentum_buffer"], group["momentum"]
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if group["nesterov"] else buf
        ortho = zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
        p.mul_(1 - lr * weight_decay)
        p.add_(ortho, alpha=-lr * _muon_lr_scale(group["adjust_lr_fn"], p.shape))
