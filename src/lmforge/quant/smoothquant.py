"""SmoothQuant: W8A8 integer linears after migrating activation outliers into the weights (Xiao et al. 2023).

W8A8. Both operands of Y = X Wᵀ are int8: the weight W (out, in) per output channel, s^W_o = max_j |W_oj| / 127,
and the activations X (tokens, in) per token at run time (dynamic, the default), s^X_t = max_j |X_tj| / 127, or
with one static scale per tensor, s^X = max |X| / 127 over calibration data (`RangeObserver`, quant/primitives.py;
values beyond it clip to ±127). Codes are q = clamp(round(x / s), -127, 127) (round half to even), and

    Y ≈ (Q_X Q_Wᵀ) ⊙ (s^X ⊗ s^W)        Q_X Q_Wᵀ accumulated exactly in int32 (`llm_int8.int8_matmul`)

then the bias is added in float32 and the result rounded once to the input's dtype.

Why smooth. A few input channels j of a layer's activations are ~100x larger than the rest in every token (the
outlier features of LLM.int8()); a per-token scale is set by them and leaves the other channels a few codes, and
per-channel activation scales cannot be pulled out of an integer GEMM. The weights have no such outliers. So
divide each channel of X by s_j and multiply the matching weight column by it, which is exact in float:

    Y = (X diag(s)^-1) (W diag(s))ᵀ,     s_j = max_t |X_tj|^α / max_o |W_oj|^(1-α)

α (migration strength, 0.5 by default) splits the difficulty: after smoothing channel j's activation range is
max|X_j|^(1-α) max|W_j|^(1-α) and its weight range max|X_j|^α max|W_j|^α; α = 0.5 makes them equal. When several
linears read one X (q/k/v; gate/up), max_o |W_oj| is taken over all their rows, as the reference `smooth_ln_fcs`
does (the per-linear column absmax, concatenated, then the max; clamped at 1e-5), and s is clamped at 1e-5.
max_t |X_tj| (`activation_scales`) is taken over every calibration token, on the float model, before smoothing.

Folding. diag(s)^-1 X is free: `awq.fold_scales` divides the norm that produces X (RMSNorm / LayerNorm weight and
bias; Gemma's (1 + w)) and multiplies the input columns of the linears. The groups (`awq.scale_groups`) smoothed, as in
the reference (`smooth_lm`: ln -> qkv, ln -> fc1): attention norm -> q/k/v and MLP norm -> gate/up (the up
projection, fc1, of a plain GELU MLP). o_proj and down_proj keep their inputs by default; `fold_into_linears=True`
also folds v_proj -> o_proj (not under GQA) and up_proj -> down_proj (gated MLPs), AWQ's other two groups.

Pipeline (`quantize_model_smoothquant`): (1) activation_scales on the float model (one block-by-block pass,
`calibration.for_each_block`, hooks on the selected linears); (2) smooth_model; (3) for static activations, the
per-tensor ranges of every selected linear's input on the smoothed float model (a second pass: the reference
calibrates its static scales on the smoothed float model, not on the quantized one); (4) the selected linears are
swapped for `W8A8Linear`s (`model.surgery.swap_modules`). Refused before any work (`QuantError`): α outside [0, 1],
an unknown activation mode, and what AWQ's checks refuse: layers outside the blocks' seven projections (the LM head
stays float), mixture-of-experts MLPs, latent attention, unknown blocks or norms, norms or linears whose
parameters are shared.

Departures from the reference fake quantization (smoothquant/fake_quant.py): the product is an int32 GEMM on the
codes (it computes (Q_X s^X)(Q_W s^W)ᵀ in float16: the same value up to float rounding); codes are computed in
float32 whatever the weight's dtype (the reference divides in float16 for float16 models); a scale's absmax is
floored at the smallest normal float32 (`primitives.symmetric_codes`), not at 1e-5, which only differs for rows
whose absmax is below 1e-5. Backward goes straight through: dL/dX = dL/dY Ŵ (Ŵ the dequantized weight).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.model.surgery import Swap, Where, select_modules, swap_modules
from lmforge.quant import awq
from lmforge.quant.awq import fold_scales
from lmforge.quant.calibration import for_each_block
from lmforge.quant.llm_int8 import int8_matmul
from lmforge.quant.nf4 import linear_where
from lmforge.quant.primitives import QuantError, RangeObserver, dequantize_codes, qmax, symmetric_codes
from lmforge.utils.dtypes import dtype_name, dtype_named

DEFAULT_ALPHA = 0.5
SCALE_FLOOR = 1e-5  # the reference's floor of the weight absmax and of s
ACTIVATIONS = ("per_token", "per_tensor")
INT8_MAX = qmax(8)
_NORM_GROUPS = ("attn_norm", "mlp_norm")


# ----------------------------------------------------------------------------------------------------- checks


def _check_alpha(alpha: float) -> None:
    ok = isinstance(alpha, int | float) and not isinstance(alpha, bool) and math.isfinite(alpha) and 0 <= alpha <= 1
    if not ok:
        raise QuantError(f"SmoothQuant: alpha={alpha!r} must be a number in [0, 1] (the migration strength)")


def _check_activations(activations: str) -> None:
    if activations not in ACTIVATIONS:
        raise QuantError(f"SmoothQuant: activations={activations!r} must be one of {', '.join(ACTIVATIONS)}")


def _plan(model: nn.Module, where: Where) -> dict[int, set[str]]:
    """AWQ's pre-flight checks (the same structural limits), with SmoothQuant's name in the messages."""
    return awq.scaling_plan(model, where, None, method="SmoothQuant")


def _check_transformer(model: nn.Module) -> None:
    if not isinstance(getattr(model, "blocks", None), nn.ModuleList) or not hasattr(model, "embed_tokens"):
        raise QuantError(f"SmoothQuant: a {type(model).__name__} is not an lmforge Transformer (blocks, embed_tokens)")


# ----------------------------------------------------------------------------------------------------- calibration


def _observe(model: nn.Module, windows: Tensor, where: Where, axis: int | None, *, batch_size: int,
             progress: bool) -> dict[str, RangeObserver]:  # fmt: skip
    """A `RangeObserver` (per tensor, or per channel along `axis`) of the input of every `nn.Linear` that `where`
    selects inside the blocks, fed by one block-by-block pass of `windows`."""
    _check_transformer(model)
    names = select_modules(model, linear_where(where))
    if not names:
        raise QuantError(f"SmoothQuant: where={where!r} selects no linear layer of the {type(model).__name__}")
    outside = [n for n in names if not n.startswith("blocks.")]
    if outside:
        raise QuantError(f"SmoothQuant calibrates the linears inside the blocks; {', '.join(outside)} "
                         "is outside them: narrow `where`")  # fmt: skip
    observers = {n: RangeObserver(axis=axis) for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(
             lambda _m, args, _out, key=n: observers[key].update(args[0])) for n in names]  # fmt: skip
    try:
        for_each_block(model, windows, lambda *_: None, batch_size=batch_size, progress=progress)
    finally:
        for h in hooks:
            h.remove()
    missed = [n for n, o in observers.items() if o.batches == 0]
    if missed:
        raise QuantError(f"SmoothQuant: {', '.join(missed)} received no input in the calibration pass")
    return observers


@torch.no_grad()
def activation_scales(model: nn.Module, windows: Tensor, where: Where = "blocks.*", *, batch_size: int = 8,
                      progress: bool = True) -> dict[str, Tensor]:  # fmt: skip
    """max_t |X_tj|: per input channel j, the absmax over every calibration token of the input of each `nn.Linear`
    that `where` selects in the blocks, by qualified name, float32 (in_features,). `windows` (n, T) are token ids
    (`calibration.calibration_windows`); the model runs block by block as it is (no quantization in between)."""
    observers = _observe(model, windows, where, -1, batch_size=batch_size, progress=progress)
    return {n: torch.maximum(-o.lo, o.hi) for n, o in observers.items() if o.lo is not None and o.hi is not None}


@torch.no_grad()
def static_input_scales(model: nn.Module, windows: Tensor, where: Where = "blocks.*", *, batch_size: int = 8,
                        progress: bool = True) -> dict[str, Tensor]:  # fmt: skip
    """The per-tensor static activation scale s^X = max |X| / 127 of each selected linear's input over the
    calibration windows (`RangeObserver.qparams`), by name, float32 scalars."""
    observers = _observe(model, windows, where, None, batch_size=batch_size, progress=progress)
    return {n: o.qparams(8, symmetric=True)[0] for n, o in observers.items()}


# ----------------------------------------------------------------------------------------------------- smoothing


def smoothing_scales(act_absmax: Tensor, linears: Sequence[nn.Linear], alpha: float = DEFAULT_ALPHA) -> Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1-α) for `linears` that all read X (module doc), floored at 1e-5: (in,).
    Computed in the weights' dtype promoted to at least float32."""
    _check_alpha(alpha)
    if not linears:
        raise QuantError("SmoothQuant: smoothing_scales needs at least one linear")
    n = act_absmax.numel()
    for lin in linears:
        if lin.in_features != n:
            raise QuantError(f"SmoothQuant: {n} activation scales for a linear with {lin.in_features} inputs")
    a = act_absmax.detach().reshape(-1)
    if not (torch.isfinite(a).all() and (a >= 0).all()):
        raise QuantError("SmoothQuant: activation scales must be finite and >= 0 (NaN or inf activations?)")
    dt = torch.promote_types(torch.promote_types(linears[0].weight.dtype, torch.float32), a.dtype)
    w_max = torch.stack([lin.weight.detach().to(dt).abs().amax(dim=0) for lin in linears]).amax(dim=0)
    w_max = w_max.clamp(min=SCALE_FLOOR)
    return (a.to(dt).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=SCALE_FLOOR)


def _smoothing_plan(model: nn.Module, act_scales: dict[str, Tensor], alpha: float,
                    fold_into_linears: bool) -> list[tuple[str, nn.Module, list[nn.Linear], Tensor]]:  # fmt: skip
    """(name of prev, prev, linears, s) of every group that `act_scales` holds a linear of; nothing changed yet."""
    plan = _plan(model, list(act_scales))
    todo = []
    for i in sorted(plan):
        block = model.blocks[i]
        for group in awq.scale_groups(block):
            if group.prev not in _NORM_GROUPS and not fold_into_linears:
                continue
            keys = [f"blocks.{i}.{n}" for n in group.linears if f"blocks.{i}.{n}" in act_scales]
            if not keys:
                continue
            linears = [block.get_submodule(n) for n in group.linears]
            todo.append((f"blocks.{i}.{group.prev}", block.get_submodule(group.prev), linears,
                         smoothing_scales(act_scales[keys[0]], linears, alpha)))  # fmt: skip
    return todo


def _fold(todo: list[tuple[str, nn.Module, list[nn.Linear], Tensor]]) -> dict[str, Tensor]:
    for _, prev, linears, s in todo:  # every scale was computed from the unsmoothed weights, then all are folded
        fold_scales(prev, linears, s)
    return {name: s for name, _, _, s in todo}


@torch.no_grad()
def smooth_model(model: nn.Module, act_scales: dict[str, Tensor], alpha: float = DEFAULT_ALPHA, *,
                 fold_into_linears: bool = False) -> dict[str, Tensor]:  # fmt: skip
    """Smooth, in place, every group (module doc) of which `act_scales` (`activation_scales`: name -> max_t |X_tj|)
    holds one linear: s from `smoothing_scales` on the unsmoothed weights, folded by `awq.fold_scales`. The float
    model computes the same function (up to rounding). Returns the scales folded, by the name of the op they were
    folded into. Scales that feed no group (o_proj, down_proj without `fold_into_linears`) are ignored; none
    feeding any group is a `QuantError`."""
    _check_alpha(alpha)
    if not act_scales:
        raise QuantError("SmoothQuant: smooth_model got no activation scales")
    todo = _smoothing_plan(model, act_scales, alpha, fold_into_linears)
    if not todo:
        raise QuantError(f"SmoothQuant: no smoothing group reads the inputs of {', '.join(act_scales)} (attention "
                         "and MLP inputs; o_proj and down_proj need fold_into_linears=True)")  # fmt: skip
    return _fold(todo)


# ----------------------------------------------------------------------------------------------------- W8A8


def _activation_scale(x: Tensor, input_scale: Tensor | None) -> Tensor:
    """s^X for 2-D x: per token (m, 1) at run time, or the static per-tensor scale (1, 1)."""
    if input_scale is None:
        return x.detach().abs().amax(dim=1, keepdim=True).float() / INT8_MAX
    return input_scale.float().reshape(1, 1)


def _w8a8_product(x: Tensor, codes: Tensor, weight_scale: Tensor, input_scale: Tensor | None) -> Tensor:
    """(Q_X Q_Wᵀ) ⊙ (s^X ⊗ s^W) in float32 for 2-D x (module doc)."""
    s_x = _activation_scale(x, input_scale)
    acc = int8_matmul(symmetric_codes(x.detach(), s_x, 8), codes)
    return acc.float() * (s_x * weight_scale.float()[None, :])


class _W8A8Product(torch.autograd.Function):
    """`_w8a8_product` with the gradient to x straight through the rounding: dL/dx = dL/dy Ŵ."""

    @staticmethod
    def forward(ctx, x: Tensor, codes: Tensor, weight_scale: Tensor, input_scale: Tensor | None) -> Tensor:
        ctx.save_for_backward(codes, weight_scale)
        ctx.x_dtype = x.dtype
        return _w8a8_product(x, codes, weight_scale, input_scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        codes, weight_scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        return (grad @ dequantize_codes(codes, weight_scale[:, None])).to(ctx.x_dtype), None, None, None


def w8a8_matmul(x: Tensor, codes: Tensor, weight_scale: Tensor, bias: Tensor | None = None,
                input_scale: Tensor | None = None) -> Tensor:  # fmt: skip
    """y = X Ŵᵀ + b in W8A8 for x (..., in), a weight held as int8 `codes` (out, in) and per-row `weight_scale`
    (out,): activations per token (`input_scale` None) or on the static per-tensor `input_scale`. (..., out) in
    x's dtype."""
    y = _W8A8Product.apply(x.reshape(-1, x.shape[-1]), codes, weight_scale, input_scale)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], codes.shape[0])


class W8A8Linear(nn.Module):
    """A frozen linear layer in W8A8 (module doc): int8 weight per output channel, int8 activations per token
    (dynamic) or per tensor (static, calibrated), int32 accumulation.

    Buffers: `codes` (out, in) int8, `weight_scale` (out,) float32, and for `activations="per_tensor"` the scalar
    `input_scale`; the bias stays a frozen parameter. `weight` is the dequantized weight in the dtype it was
    quantized from. Casting the module (`.half()`) also casts the float32 scales: quantize after casting."""

    def __init__(self, codes: Tensor, weight_scale: Tensor, bias: Tensor | None = None, *,
                 activations: str = "per_token", input_scale: Tensor | float | None = None,
                 weight_dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        super().__init__()
        _check_activations(activations)
        if codes.dim() != 2 or codes.dtype != torch.int8:
            raise QuantError(f"W8A8Linear takes 2-D int8 codes, got shape {tuple(codes.shape)} of {codes.dtype}")
        if weight_scale.shape != codes.shape[:1]:
            raise QuantError(f"W8A8Linear: weight_scale of shape {tuple(weight_scale.shape)} for {codes.shape[0]} "
                             "output rows")  # fmt: skip
        static = activations == "per_tensor"
        if static != (input_scale is not None):
            need = "needs a calibrated input_scale" if static else "takes no input_scale (it is per_tensor's)"
            raise QuantError(f"W8A8Linear: activations={activations!r} {need}")
        self.out_features, self.in_features = codes.shape
        self.activations, self.weight_dtype = activations, weight_dtype
        self.register_buffer("codes", codes)
        self.register_buffer("weight_scale", weight_scale.detach().float())
        if static:
            scale = torch.as_tensor(input_scale, dtype=torch.float32, device=codes.device).detach().clone()
            if scale.numel() != 1 or not (torch.isfinite(scale).all() and (scale >= 0).all()):
                raise QuantError(f"W8A8Linear: input_scale must be one finite number >= 0, got {input_scale!r}")
            self.register_buffer("input_scale", scale.reshape(()))
        else:
            self.register_buffer("input_scale", None)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activations: str = "per_token",
                    input_scale: Tensor | float | None = None) -> W8A8Linear:  # fmt: skip
        """Quantize `linear`'s weight per output channel, s^W_o = max_j |W_oj| / 127 (keeping no reference to it)."""
        _check_activations(activations)
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1).float() / INT8_MAX
        codes = symmetric_codes(w, scale[:, None], 8)
        return cls(codes, scale, linear.bias, activations=activations, input_scale=input_scale,
                   weight_dtype=w.dtype)  # fmt: skip

    def spec(self) -> dict[str, Any]:
        """What rebuilds this layer from its state dict besides the tensors (`from_state`; quant/modules.py)."""
        return {"activations": self.activations, "weight_dtype": dtype_name(self.weight_dtype)}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], spec: dict[str, Any]) -> W8A8Linear:
        """The layer whose `state_dict()` is `state` and whose `spec()` is `spec` (a saved model's)."""
        return cls(state["codes"], state["weight_scale"], state.get("bias"), activations=spec["activations"],
                   input_scale=state.get("input_scale"), weight_dtype=dtype_named(spec["weight_dtype"]))  # fmt: skip

    @property
    def weight(self) -> Tensor:
        """The dequantized weight, (out_features, in_features) in `weight_dtype`."""
        return dequantize_codes(self.codes, self.weight_scale[:, None]).to(self.weight_dtype)

    def nbytes(self) -> int:
        """Bytes holding the weight: int8 codes and float32 row scales (not the bias nor the input scale)."""
        return self.codes.numel() + 4 * self.weight_scale.numel()

    def forward(self, x: Tensor) -> Tensor:
        return w8a8_matmul(x, self.codes, self.weight_scale, self.bias, self.input_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activations={self.activations}")  # fmt: skip


# ----------------------------------------------------------------------------------------------------- the model


@dataclass
class SmoothQuantResult:
    """What `quantize_model_smoothquant` did: the swap (`restore()` puts back the float linears, smoothed: the
    norms stay divided, so the restored model is the smoothed float model), the activation absmax it measured,
    the smoothing scales it folded (by the norm or linear folded into) and the static input scales (per_tensor)."""

    swap: Swap
    act_scales: dict[str, Tensor] = field(default_factory=dict)
    smoothing: dict[str, Tensor] = field(default_factory=dict)
    input_scales: dict[str, Tensor] = field(default_factory=dict)


@torch.no_grad()
def quantize_model_smoothquant(model: nn.Module, windows: Tensor, *, alpha: float = DEFAULT_ALPHA,
                               activations: str = "per_token", where: Where = "blocks.*",
                               fold_into_linears: bool = False, batch_size: int = 8,
                               progress: bool = True) -> SmoothQuantResult:  # fmt: skip
    """SmoothQuant W8A8 on an lmforge Transformer, in place (module doc): measure activation absmax on `windows`
    (n, T), smooth, calibrate static input scales when `activations="per_tensor"`, then swap every `nn.Linear`
    that `where` selects (default: all projections in the blocks; never the LM head) for a `W8A8Linear`.
    Unsupported models and arguments raise `QuantError` before any work."""
    _check_alpha(alpha)
    _check_activations(activations)
    plan = _plan(model, where)
    names = sorted(f"blocks.{i}.{rel}" for i, rels in plan.items() for rel in rels)
    options = {"batch_size": batch_size, "progress": progress}
    act = activation_scales(model, windows, names, **options)
    smoothing = _fold(_smoothing_plan(model, act, alpha, fold_into_linears))  # {} for only o_proj / down_proj
    input_scales = static_input_scales(model, windows, names, **options) if activations == "per_tensor" else {}
    chosen = set(names)
    factory = lambda name, old: W8A8Linear.from_linear(old, activations, input_scales.get(name))
    swap = swap_modules(model, lambda name, m: name in chosen and isinstance(m, nn.Linear), factory)
    return SmoothQuantResult(swap, act, smoothing, input_scales)
