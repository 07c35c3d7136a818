r"""Optimizers, written out: AdamW, Adam, SGD, Lion, Adafactor, Muon and 8-bit AdamW.

Each optimizer is a `torch.optim.Optimizer`, so `state_dict` / `load_state_dict` resume a run bit for bit and a
learning-rate schedule can set `group["lr"]` per parameter group. Notation: p parameter, g gradient (negated when
`maximize`), t the step count starting at 1, lr the group's learning rate, wd its weight decay.

AdamW (Loshchilov & Hutter 2019; decoupled decay), matching `torch.optim.AdamW`:
    p ← p · (1 − lr·wd)
    m ← β1·m + (1 − β1)·g            v ← β2·v + (1 − β2)·g²
    p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)

Adam (Kingma & Ba 2015), matching `torch.optim.Adam`: the same update, but the decay is an L2 term added to the
gradient first, g ← g + wd·p, so it is rescaled by the adaptive denominator like the rest of the gradient.

SGD with momentum μ, dampening τ and Nesterov, matching `torch.optim.SGD`:
    g ← g + wd·p
    b ← g on the first step, else μ·b + (1 − τ)·g
    d ← g + μ·b if nesterov else b         p ← p − lr·d

Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):
    c ← β1·m + (1 − β1)·g
    p ← p − lr·(sign(c) + wd·p)
    m ← β2·m + (1 − β2)·g
Every coordinate moves by ±lr: the update has the size of a sign, so Lion wants a 3-10x smaller lr than AdamW.

Adafactor (Shazeer & Stern 2018), matching `torch.optim.Adafactor` (relative step, no first moment):
    β̂2 ← 1 − t^decay          ρ ← min(lr, 1/√t)          α ← max(ε2, RMS(p)) · ρ      (RMS of p before decay)
    p ← p · (1 − lr·wd)
    for ≥2-D p (factored over the last two dims, n rows × m cols):
        R ← β̂2·R + (1 − β̂2)·mean_cols(g²)      C ← β̂2·C + (1 − β̂2)·mean_rows(g²)
        V̂ ← R·C / max(mean(R), ε1)              (outer product: n + m numbers stand for n·m)
    for vectors: V̂ ← β̂2·V̂ + (1 − β̂2)·g²
    U ← g / √max(V̂, ε1²)        p ← p − α · U / max(1, RMS(U)/d)

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"), for 2-D hidden weights, matching
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

8-bit AdamW (after Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): AdamW whose moments
live as one byte per value. Each step dequantizes m and v to float32, runs the AdamW update above, and
requantizes. Quantization is block-wise: the flattened moment is cut into blocks of 256 values, each block keeps
one float32 absmax scale, so one outlier only costs precision inside its own block. Within a block the value
y = x / absmax ∈ [−1, 1] is *companded* before rounding to a uniform code:
    m (signed, int8):     code = round(127 · sign(y)·|y|^(1/2))         y = sign(code)·(|code|/127)²
    v (unsigned, uint8):  code = round(255 · y^(1/4))                   y = (code/255)⁴
A linear code would round every value under absmax/510 to zero; for v that is fatal, because √v is the
denominator and a v rounded to 0 turns m/(√v + ε) into m/ε. The power maps spend the codes on small magnitudes
(like the dynamic-exponent map of bitsandbytes, but in one line): the smallest nonzero v code stands for
absmax·(1/255)⁴ ≈ 2e-10·absmax, while the top of the range keeps ~1% relative precision. State: 2 bytes per
parameter plus 8 bytes per 256-value block, against 8 bytes for float32 AdamW (a ratio of ≈ 0.254).

Parameter groups: `param_groups(model, weight_decay)` puts norms, biases (every < 2-D parameter) and embedding
tables in a group with no weight decay, the usual practice (decaying a norm's gain towards 0 or shrinking rare
token rows only hurts). Tied weights count once. `build_optimizer(name, model, lr, weight_decay)` does both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import Optimizer

__all__ = [
    "OPTIMIZERS",
    "SGD",
    "Adafactor",
    "Adam",
    "AdamW",
    "AdamW8bit",
    "Lion",
    "Muon",
    "build_optimizer",
    "dequantize_blockwise",
    "param_groups",
    "quantize_blockwise",
    "state_bytes",
    "zeropower_via_newtonschulz",
]

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


# ---------------------------------------------------------------------------------------------------------------
# Adam family


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


# ---------------------------------------------------------------------------------------------------------------
# SGD and Lion


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


# ---------------------------------------------------------------------------------------------------------------
# Adafactor


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


# ---------------------------------------------------------------------------------------------------------------
# Muon

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


# ---------------------------------------------------------------------------------------------------------------
# 8-bit AdamW

BLOCK_SIZE = 256


def quantize_blockwise(x: Tensor, *, signed: bool, power: float, block_size: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """Codes (int8 if `signed` else uint8, x's numel, flat) and per-block float32 absmax of x (see module doc)."""
    flat = x.detach().reshape(-1).float()
    blocks = F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    y = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    qmax = 127 if signed else 255
    codes = y.abs().pow(1 / power).mul_(qmax).round_().mul_(y.sign())
    return codes.view(-1)[: flat.numel()].to(torch.int8 if signed else torch.uint8), absmax


def dequantize_blockwise(
    codes: Tensor, absmax: Tensor, shape: Sequence[int], *, power: float, block_size: int = BLOCK_SIZE
) -> Tensor:
    """The float32 tensor of `shape` that `quantize_blockwise` codes stand for."""
    qmax = 127 if codes.dtype == torch.int8 else 255
    c = F.pad(codes.float(), (0, -codes.numel() % block_size)).view(-1, block_size)
    y = (c.abs() / qmax).pow_(power).mul_(c.sign())
    return (y * absmax[:, None]).view(-1)[: codes.numel()].view(shape)


class AdamW8bit(_Optimizer):
    """AdamW with block-wise 8-bit moments: m as int8 (power 2 companding), v as uint8 (power 4).

    The arithmetic of a step is float32 AdamW; only the stored state is 8-bit. State keys: `exp_avg_codes`,
    `exp_avg_absmax`, `exp_avg_sq_codes`, `exp_avg_sq_absmax`, `step`.
    """

    M_POWER = 2.0
    V_POWER = 4.0
    shardable = False  # the quantization blocks are cut from the flattened local tensor, not the sharded one

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        _check_common(lr, weight_decay, eps)
        _check_betas(betas)
        _check(isinstance(block_size, int) and block_size > 0, "block_size", block_size, "a positive integer")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "block_size": block_size}
        super().__init__(params, defaults)

    def _load(self, state: dict[str, Any], key: str, signed: bool, shape: torch.Size, bs: int) -> Tensor:
        power = self.M_POWER if signed else self.V_POWER
        return dequantize_blockwise(state[f"{key}_codes"], state[f"{key}_absmax"], shape, power=power, block_size=bs)

    def _store(self, state: dict[str, Any], key: str, x: Tensor, signed: bool, bs: int) -> None:
        power = self.M_POWER if signed else self.V_POWER
        state[f"{key}_codes"], state[f"{key}_absmax"] = quantize_blockwise(x, signed=signed, power=power, block_size=bs)

    def _update(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        bs = group["block_size"]
        if not state:
            state["step"] = 0
            zeros = torch.zeros(p.shape, device=p.device)
            self._store(state, "exp_avg", zeros, True, bs)
            self._store(state, "exp_avg_sq", zeros, False, bs)
        state["step"] += 1
        m = self._load(state, "exp_avg", True, p.shape, bs)
        v = self._load(state, "exp_avg_sq", False, p.shape, bs)
        _adam_update(
            p,
            grad.float(),
            m,
            v,
            state["step"],
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled=True,
        )
        self._store(state, "exp_avg", m, True, bs)
        self._store(state, "exp_avg_sq", v, False, bs)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but keep the state's own dtypes: torch casts every state tensor to its parameter's dtype,
        which would turn the byte codes into floats (and, for bf16 parameters, round the float32 scales)."""
        saved = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params, strict=True):
            for key, value in saved.get(i, {}).items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.to(p.device, copy=True)


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments, codes, scales; not the parameters)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


# ---------------------------------------------------------------------------------------------------------------
# parameter groups and the factory


def _module_param_ids(model: nn.Module, keep: Callable[[str, nn.Module], bool]) -> set[int]:
    return {id(p) for name, m in model.named_modules() if keep(name, m) for p in m.parameters(recurse=False)}


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float | None = None,
    no_decay: Sequence[str] = (),
    *,
    muon: bool = False,
    head_names: Sequence[str] = ("lm_head",),
) -> list[dict[str, Any]]:
    """Parameter groups for an optimizer: `weight_decay` on matrices, none on norms, biases and embeddings.

    No decay for: every parameter with fewer than 2 dims, the weights of `nn.Embedding` modules, and any parameter
    whose name contains one of the `no_decay` strings. A parameter reachable twice (tied weights) appears once.
    `lr`, if given, is set on every group. With `muon=True` each group also gets `use_muon`: True for 2-D
    parameters that are neither embeddings nor in a module named in `head_names`, False for the rest (AdamW).
    Empty groups are left out.
    """
    embeddings = _module_param_ids(model, lambda _, m: isinstance(m, nn.Embedding))
    heads = _module_param_ids(model, lambda name, _: name.split(".")[-1] in head_names)
    groups: dict[tuple[bool, bool], list[Tensor]] = {}
    for name, p in model.named_parameters():  # named_parameters yields a shared Parameter once
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and id(p) not in embeddings and not any(s in name for s in no_decay)
        hidden = muon and p.ndim == 2 and id(p) not in embeddings and id(p) not in heads
        groups.setdefault((hidden, decay), []).append(p)
    result = []
    for (hidden, decay), ps in sorted(groups.items(), reverse=True):
        group: dict[str, Any] = {"params": ps, "weight_decay": weight_decay if decay else 0.0}
        if lr is not None:
            group["lr"] = lr
        if muon:
            group["use_muon"] = hidden
        result.append(group)
    return result


OPTIMIZERS: dict[str, type[Optimizer]] = {
    "adamw": AdamW,
    "adam": Adam,
    "sgd": SGD,
    "lion": Lion,
    "adafactor": Adafactor,
    "muon": Muon,
    "adamw8bit": AdamW8bit,
}


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, **kwargs: Any) -> Optimizer:
    """The optimizer `name` over `param_groups(model, weight_decay)`; `kwargs` go to its constructor.

    For "muon", `lr` is Muon's learning rate and `adamw_lr` (a kwarg) that of the AdamW-routed parameters.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: must be one of {', '.join(OPTIMIZERS)}")
    groups = param_groups(model, weight_decay, muon=name == "muon")
    return OPTIMIZERS[name](groups, lr=lr, **kwargs)
