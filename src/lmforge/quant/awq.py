"""AWQ: activation-aware weight quantization (Lin et al. 2023), producing a fake-quantized model.

Weight-only, group-wise asymmetric b-bit integers (b = 4, groups of g = 128 input columns of an output row), AWQ's
`pseudo_quantize_tensor`: for a group of weights w with lo = min w, hi = max w and L = 2^b - 1,

    Δ = max(hi - lo, 1e-5) / L     z = clamp(-round(lo / Δ), 0, L)     q = clamp(round(w / Δ) + z, 0, L)
    Q(w) = (q - z) · Δ

Why scale. A few input channels of a layer carry activations far larger than the rest; the weight columns they
multiply are the salient ones (the paper: keeping 1% of them in float recovers most of the accuracy). Instead of
mixed precision, scale them: for s_j > 1, (w_j s_j)(x_j / s_j) = w_j x_j in float, and the rounding error of the
product becomes Δ' · err(w_j s_j / Δ') · x_j / s_j, where the group step Δ' grows little when one column of the
group grows (its max is set by all its columns), so the salient channel's error shrinks by about Δ' / (Δ s_j).
The other channels of the group pay for the larger Δ'; the best s is a compromise, found by search:

    s* = argmin_s  || f(Q(W diag(s)) diag(s)^-1 X) - f(W X) ||²          (mean squared error over the outputs)

where X are the calibration inputs of the linears (all linears of a group share one input) and f the module their
outputs feed, so that the error is measured where it matters: the whole attention module (softmax and o_proj
included: llm-awq's `module2inspect=self_attn`) for q/k/v, the whole MLP for gate/up, the linear itself for
o_proj and down_proj. The search space (llm-awq's `_search_module_scale`) is one exponent α on the activation
statistic s_X = mean_t |x_tj| (per input channel, over every calibration token):

    s = max(s_X^α, 1e-4),   s <- s / sqrt(max(s) · min(s)),   α ∈ {0, 1/N, ..., (N-1)/N}   (N = n_grid = 20)

α = 0 gives s = 1, plain round-to-nearest: on the calibration data the search never does worse than RTN. The best
α (first one at the lowest error) and its s are kept.

Folding. diag(s)^-1 X is free: it is folded into the op that produces X, so the float model is unchanged:
  - a norm: RMSNorm / LayerNorm weight (and bias) divided by s; Gemma's RMSNorm, which multiplies by (1 + w), gets
    w <- (1 + w) / s - 1 (as AutoAWQ does);
  - a linear: its output rows (and bias) divided by s, for v_proj -> o_proj (attention mixes values per head,
    linearly) and up_proj -> down_proj (act(gate) ⊙ up is linear in up);
and W diag(s) is multiplied into the input columns of the group's linears. Not scaled, as in llm-awq: o_proj under
GQA/MQA (a value row feeds the o_proj columns of several heads, which would need equal scales; llm-awq skips it
when v_proj and o_proj shapes differ) and the down projection of a plain (GELU) MLP: GELU(u / s) != GELU(u) / s,
and llm-awq's way out, a `ScaledActivation` module dividing the activation's output, would add a module (and a
state-dict entry) to the model. Those linears are still clipped and quantized.

Clipping (llm-awq's `auto_clip_layer`). After scaling, each group of each row is clamped to ±m with

    m = max|w_group| · (1 - i / N),   i = 0 .. max_shrink · N - 1   (N = 20, max_shrink = 0.5: down to half)

choosing per group the m that minimises mean_t (x_tg · w_g - x_tg · Q(clip(w_g, -m, m)))², the group's own part of
the output over a subsample of the tokens (every ⌊n / n_sample_token⌋-th, n_sample_token = 512). i = 0 is no clip.
q_proj and k_proj are not clipped: their error reaches the output through q·k, not through their own outputs.

Pipeline (`awq_quantize_model`, block by block with `quant.calibration.for_each_block`): run the float block on its
inputs X_i with hooks recording the inputs of q_proj (= k, v), o_proj, gate/up and down_proj; search the four scales
on the unmodified block (each search restores the weights it tried); fold them and divide the recorded inputs by
them (the inputs the scaled linears now see); search and apply the clips on the scaled weights; write Q(W) into the
selected linears. Departures from llm-awq: the next block calibrates on the output of this block as quantized
(for_each_block's order, as GPTQ does) where llm-awq feeds the float block's output; arithmetic is in the weight's
dtype promoted to at least float32 (llm-awq works in float16); the clip error is an einsum, not a broadcast product
(the same sum, another summation order).

What is refused before any work (`QuantError`): bits outside 2..8, a group size that does not divide every selected
linear's inputs, selected layers outside the blocks' seven projections (the LM head stays float), mixture-of-experts
layers (expert matrices are not `nn.Linear`, routing splits the tokens), multi-head latent attention, a block that
is not `model.transformer.Block`, a norm of another type, and a norm or linear whose parameters are shared (folding
a scale into one place would change the other).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lmforge.model.attention import Attention
from lmforge.model.cache import AttentionInputs
from lmforge.model.mlp import MLP
from lmforge.model.moe import ExpertLinear
from lmforge.model.norm import LayerNorm, RMSNorm
from lmforge.model.surgery import Where, swap_modules
from lmforge.model.transformer import Block
from lmforge.quant.calibration import for_each_block
from lmforge.quant.primitives import QuantError, top_code
from lmforge.quant.weight_only import QuantLinear

N_GRID = 20
MAX_SHRINK = 0.5
N_SAMPLE_TOKEN = 512
SCALE_FLOOR = 1e-4  # s_X^α is clamped here before normalising (llm-awq)
RANGE_FLOOR = 1e-5  # a group's max - min is clamped here before dividing (llm-awq)
_CLIP_ROWS = 256  # output rows per chunk of the clip search (memory only; rows are independent)
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NO_CLIP = ("q_proj", "k_proj")
# the linear whose recorded input is each projection's input (q, k, v read one tensor; so do gate and up)
_FEATURE = {"attn.q_proj": "attn.q_proj", "attn.k_proj": "attn.q_proj", "attn.v_proj": "attn.q_proj",
            "attn.o_proj": "attn.o_proj", "mlp.gate_proj": "mlp.up_proj", "mlp.up_proj": "mlp.up_proj",
            "mlp.down_proj": "mlp.down_proj"}  # fmt: skip


def _check_bits_group(bits: int, group_size: int | None) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise QuantError(f"AWQ: bits={bits!r} must be an integer in 2..8 (4 is AWQ's format)")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise QuantError(f"AWQ: group_size={group_size!r} must be a positive integer, or None for one group per row")


def _check_divides(group_size: int | None, in_features: int, what: str) -> None:
    if group_size is not None and in_features % group_size:
        raise QuantError(f"AWQ: group_size={group_size} does not divide the {in_features} input features of {what}")


def _work_dtype(t: Tensor) -> torch.dtype:
    """The dtype AWQ computes in: t's own, at least float32 (float64 stays float64)."""
    return torch.promote_types(t.dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------- quantizer


def pseudo_quantize(w: Tensor, bits: int = 4, group_size: int | None = 128) -> Tensor:
    """Q(w): `w` (rows, columns) group-wise asymmetric min-max quantized and dequantized (module doc), in w's dtype;
    groups of `group_size` consecutive columns of a row (None: the whole row).

    This is AWQ's `pseudo_quantize_tensor`, not `quant.primitives.quantize_asymmetric`: the primitives widen the
    range to hold 0 (so 0.0 is exact) and do not floor it, AWQ takes the group's own [min, max], floors max - min at
    1e-5 and clamps the zero point into 0..L (a group of one sign then clips at its far end, as AWQ's does); they
    also divide in float32, this in w's dtype promoted to float32 (float64 stays float64, the tests' reference)."""
    q, step, zero = _grid_codes(w, bits, group_size)
    return ((q - zero) * step).reshape(w.shape).to(w.dtype)


def _grid_codes(w: Tensor, bits: int, group_size: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """(q, Δ, z) of `pseudo_quantize` in the working dtype: q (rows · groups, g), Δ and z (rows · groups, 1)."""
    _check_bits_group(bits, group_size)
    if w.dim() != 2:
        raise QuantError(f"AWQ: pseudo_quantize takes a 2-D weight (out, in), got shape {tuple(w.shape)}")
    _check_divides(group_size, w.shape[1], f"a weight of shape {tuple(w.shape)}")
    top = top_code(bits)
    rows = w.detach().to(_work_dtype(w)).reshape(-1, group_size or w.shape[1])
    lo, hi = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
    step = (hi - lo).clamp(min=RANGE_FLOOR) / top
    zero = (-torch.round(lo / step)).clamp(0, top)
    return torch.clamp(torch.round(rows / step) + zero, 0, top), step, zero


def packed_linear(linear: nn.Linear, bits: int = 4, group_size: int | None = 128) -> QuantLinear:
    """`linear`'s Q(W) (module doc) as a `QuantLinear` holding AWQ's codes, steps and zero points (4 or 8 bits)."""
    if bits not in (4, 8):
        raise QuantError(f"AWQ: a packed layer holds 4- or 8-bit codes, not bits={bits}")
    q, step, zero = _grid_codes(linear.weight, bits, group_size)
    out, g = linear.out_features, group_size or linear.in_features
    return QuantLinear.from_codes(q.view(out, -1).to(torch.uint8), step.view(out, -1).float(),
                                  zero.view(out, -1).to(torch.uint8), linear.bias, bits=bits, group_size=g)  # fmt: skip


# ----------------------------------------------------------------------------------------------------- scale search


class ScaleSearch(NamedTuple):
    """The result of `search_scale`: the best exponent α, its scales s (in_features,) and the error at every α."""

    ratio: float
    scales: Tensor
    errors: list[float]


def activation_scale(x: Tensor) -> Tensor:
    """s_X = mean_t |x_tj|: the mean magnitude of each input channel (last dimension) over all tokens."""
    return x.detach().to(_work_dtype(x)).abs().reshape(-1, x.shape[-1]).mean(dim=0)


def grid_scales(x_mean: Tensor, ratio: float) -> Tensor:
    """s = max(s_X^α, 1e-4) / sqrt(max s · min s): the scales of one grid point α (module doc)."""
    s = x_mean.pow(ratio).clamp(min=SCALE_FLOOR)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(x: Tensor, linears: Sequence[nn.Linear], module: Callable[[Tensor], Tensor] | None = None, *,
                 bits: int = 4, group_size: int | None = 128, n_grid: int = N_GRID,
                 quantize: Sequence[bool] | None = None) -> ScaleSearch:  # fmt: skip
    """AWQ's scale search for `linears` that all read `x` (..., in_features), measured at the output of `module`
    (x -> the output those linears feed; default: the single linear itself). For α = i / n_grid, i = 0..n_grid-1,
    each linear's weight is set to Q(W diag(s)) diag(s)^-1 (`quantize[k]` False: left float), `module(x)` is
    compared to its float output by mean squared error, and the first α of lowest error wins. The weights are
    restored before returning."""
    _check_bits_group(bits, group_size)
    if not linears:
        raise QuantError("AWQ: search_scale needs at least one linear")
    if module is None:
        if len(linears) != 1:
            raise QuantError(f"AWQ: search_scale over {len(linears)} linears needs the module their outputs feed")
        module = linears[0]
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise QuantError(f"AWQ: n_grid={n_grid!r} must be a positive integer")
    quantize = [True] * len(linears) if quantize is None else list(quantize)
    for lin in linears:
        if lin.in_features != x.shape[-1]:
            raise QuantError(f"AWQ: a linear with {lin.in_features} inputs cannot read activations of shape "
                             f"{tuple(x.shape)}")  # fmt: skip
        _check_divides(group_size, lin.in_features, f"a linear of shape {tuple(lin.weight.shape)}")
    reference = module(x).to(_work_dtype(x))
    x_mean = activation_scale(x)
    originals = [lin.weight.detach().clone() for lin in linears]
    best: tuple[float, float, Tensor] | None = None  # (error, α, s)
    errors: list[float] = []
    try:
        for i in range(n_grid):
            ratio = i / n_grid
            s = grid_scales(x_mean, ratio)
            for lin, w, q in zip(linears, originals, quantize, strict=True):
                if q:
                    sw = s.to(torch.promote_types(_work_dtype(w), s.dtype))
                    lin.weight.copy_((pseudo_quantize(w.to(sw.dtype) * sw, bits, group_size) / sw).to(w.dtype))
            error = (module(x).to(reference.dtype) - reference).pow(2).mean().item()
            errors.append(error)
            if best is None or error < best[0]:
                best = (error, ratio, s)
    finally:
        for lin, w in zip(linears, originals, strict=True):
            lin.weight.copy_(w)
    if best is None or not math.isfinite(best[0]):
        raise QuantError(f"AWQ: the scale search found no finite error (errors {errors}): NaN or inf activations?")
    return ScaleSearch(best[1], best[2], errors)


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: Sequence[nn.Linear], scales: Tensor) -> None:
    """Fold diag(s)^-1 into `prev`, the op whose output the `linears` read, and diag(s) into the linears' input
    columns, in place: the composition is unchanged in float. `prev` is an RMSNorm (Gemma's (1 + w) too), a
    LayerNorm (weight and bias) or a linear (output rows and bias)."""
    s = scales.detach()
    n = s.numel()

    def divide(t: Tensor, rows: bool = False) -> None:
        dt = torch.promote_types(_work_dtype(t), s.dtype)
        t.copy_((t.to(dt) / (s.to(dt)[:, None] if rows else s.to(dt))).to(t.dtype))

    if isinstance(prev, nn.Linear):
        if prev.out_features != n:
            raise QuantError(f"AWQ: {n} scales for a linear with {prev.out_features} outputs")
        divide(prev.weight, rows=True)
        if prev.bias is not None:
            divide(prev.bias)
    elif isinstance(prev, RMSNorm | LayerNorm | nn.LayerNorm):
        weight = prev.weight
        if weight is None or weight.numel() != n:
            size = None if weight is None else weight.numel()
            raise QuantError(f"AWQ: {n} scales for a {type(prev).__name__} of {size} channels (a LayerNorm "
                             "without elementwise affine cannot fold scales)")  # fmt: skip
        if getattr(prev, "unit_offset", False):  # Gemma: y = x̂ (1 + w), so 1 + w is what is divided
            dt = torch.promote_types(_work_dtype(weight), s.dtype)
            weight.copy_(((1 + weight.to(dt)) / s.to(dt) - 1).to(weight.dtype))
        else:
            divide(weight)
        if getattr(prev, "bias", None) is not None:
            divide(prev.bias)
    else:
        raise QuantError(f"AWQ: cannot fold scales into a {type(prev).__name__}")
    for lin in linears:
        if lin.in_features != n:
            raise QuantError(f"AWQ: {n} scales for a linear with {lin.in_features} inputs")
        dt = torch.promote_types(_work_dtype(lin.weight), s.dtype)
        lin.weight.copy_((lin.weight.to(dt) * s.to(dt)).to(lin.weight.dtype))


# ----------------------------------------------------------------------------------------------------- clipping


@torch.no_grad()
def search_clip(w: Tensor, x: Tensor, *, bits: int = 4, group_size: int | None = 128, n_grid: int = N_GRID,
                max_shrink: float = MAX_SHRINK, n_sample_token: int = N_SAMPLE_TOKEN) -> Tensor:  # fmt: skip
    """AWQ's clip search (module doc) for a weight `w` (out, in) reading `x` (..., in): the best clip value m per
    row and group, (out, in / group_size), in the work dtype (w's, at least float32)."""
    _check_bits_group(bits, group_size)
    if w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise QuantError(f"AWQ: search_clip takes a weight (out, in) and inputs (..., in), got {tuple(w.shape)} "
                         f"and {tuple(x.shape)}")  # fmt: skip
    _check_divides(group_size, w.shape[1], f"a weight of shape {tuple(w.shape)}")
    if n_sample_token < 1 or n_grid < 1 or not 0 < max_shrink <= 1:
        raise QuantError(f"AWQ: search_clip needs n_grid >= 1, 0 < max_shrink <= 1, n_sample_token >= 1; got "
                         f"{n_grid}, {max_shrink}, {n_sample_token}")  # fmt: skip
    dt = _work_dtype(w)
    g = group_size or w.shape[1]
    feats = x.detach().to(dt).reshape(-1, w.shape[1])
    feats = feats[:: max(1, feats.shape[0] // n_sample_token)].reshape(-1, w.shape[1] // g, g)  # (tokens, groups, g)
    out = []
    for chunk in w.detach().to(dt).split(_CLIP_ROWS):
        wg = chunk.reshape(chunk.shape[0], -1, g)  # (rows, groups, g)
        original_max = wg.abs().amax(dim=-1, keepdim=True)  # (rows, groups, 1)
        best_max = original_max.clone()
        min_err = torch.full_like(original_max, float("inf"))
        reference = torch.einsum("tgk,rgk->rtg", feats, wg)
        for i in range(int(max_shrink * n_grid)):
            max_val = original_max * (1 - i / n_grid)
            clipped = torch.clamp(wg, -max_val, max_val)
            q = pseudo_quantize(clipped.reshape(-1, g), bits, None).reshape(wg.shape)
            err = (torch.einsum("tgk,rgk->rtg", feats, q) - reference).pow(2).mean(dim=1)[..., None]
            better = err < min_err
            min_err[better] = err[better]
            best_max[better] = max_val[better]
        out.append(best_max[..., 0])
    return torch.cat(out)


@torch.no_grad()
def apply_clip(linear: nn.Linear, max_val: Tensor) -> None:
    """Clamp each group of `linear`'s weight to ±max_val (out, groups), in place."""
    w = linear.weight
    groups = max_val.shape[-1]
    m = max_val.to(_work_dtype(w))[..., None]
    clipped = w.to(m.dtype).reshape(w.shape[0], groups, -1).clamp(-m, m)
    w.copy_(clipped.reshape(w.shape).to(w.dtype))


# ----------------------------------------------------------------------------------------------------- the model


@dataclass
class AppliedScale:
    """One folded scale: the op it was folded into, the linears it multiplied, and the search behind it."""

    prev: str
    linears: tuple[str, ...]
    ratio: float
    scales: Tensor
    errors: list[float]


@dataclass
class AWQResult:
    """What `awq_quantize_model` did: the scales it folded and the clip values it applied (out, groups), by name."""

    scales: list[AppliedScale] = field(default_factory=list)
    clips: dict[str, Tensor] = field(default_factory=dict)
    quantized: list[str] = field(default_factory=list)


@dataclass
class ScaleGroup:
    prev: str  # relative to the block
    linears: tuple[str, ...]
    inspect: str  # the module whose output the search compares: "attn", "mlp" or a linear
    feature: str  # the linear whose recorded input is the group's x


def _matcher(where: Where) -> Callable[[str, nn.Module], bool]:
    if callable(where):
        return where
    patterns = (where,) if isinstance(where, str) else tuple(where)
    return lambda name, _: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def scale_groups(block: Block) -> list[ScaleGroup]:
    """The scale groups of a supported block (module doc): attention input, v -> o (MHA), MLP input, up -> down."""
    attn, mlp = block.attn, block.mlp
    groups = [ScaleGroup("attn_norm", ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn", "attn.q_proj")]
    if attn.v_proj.out_features == attn.o_proj.in_features:
        groups.append(ScaleGroup("attn.v_proj", ("attn.o_proj",), "attn.o_proj", "attn.o_proj"))
    mlp_in = ("mlp.up_proj",) if mlp.gate_proj is None else ("mlp.gate_proj", "mlp.up_proj")
    groups.append(ScaleGroup("mlp_norm", mlp_in, "mlp", "mlp.up_proj"))
    if mlp.gate_proj is not None:
        groups.append(ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj", "mlp.down_proj"))
    return groups


def scaling_plan(model: nn.Module, where: Where, group_size: int | None, method: str = "AWQ") -> dict[int, set[str]]:
    """Check everything before work (messages name `method`: AWQ, SmoothQuant); return, per block index, the names
    (relative to it) of its linears to quantize."""
    kind = type(model).__name__
    blocks = getattr(model, "blocks", None)
    wiring = all(hasattr(model, a) for a in ("embed_tokens", "attention_inputs"))
    if not isinstance(blocks, nn.ModuleList) or not wiring:
        raise QuantError(f"{method}: a {kind} is not an lmforge Transformer (blocks, embed_tokens, attention_inputs)")
    match = _matcher(where)
    selected = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | ExpertLinear) and n and match(n, m)]
    if not selected:
        raise QuantError(f"{method}: where={where!r} selects no linear layer of the {kind}")
    plan: dict[int, set[str]] = {}
    for name in selected:
        parts = name.split(".")
        if parts[0] != "blocks" or len(parts) < 3:
            raise QuantError(f"{method} quantizes the projections inside the blocks; {name} is outside them (the LM "
                             "head and embeddings stay float): narrow `where`")  # fmt: skip
        i, block = int(parts[1]), blocks[int(parts[1])]
        if not isinstance(block, Block):
            raise QuantError(f"{method}: blocks.{i} of the {kind} is a {type(block).__name__}, not a Block it knows")
        if parts[2] == "attn" and not isinstance(block.attn, Attention):
            raise QuantError(f"{method}: blocks.{i}.attn of the {kind} is a {type(block.attn).__name__} "
                             "(multi-head latent attention is not supported); narrow `where` to skip it")  # fmt: skip
        if parts[2] == "mlp" and not isinstance(block.mlp, MLP):
            raise QuantError(f"{method}: blocks.{i}.mlp of the {kind} is a {type(block.mlp).__name__} "
                             "(mixture-of-experts layers are not supported); narrow `where` to skip it")  # fmt: skip
        rel = ".".join(parts[2:])
        known = [f"attn.{p}" for p in _ATTN] + [f"mlp.{p}" for p in _MLP]
        if rel not in known:
            raise QuantError(f"{method}: {name} is not one of the projections {method} handles ({', '.join(known)})")
        module = block.get_submodule(rel)
        _check_divides(group_size, module.in_features, name)
        plan.setdefault(i, set()).add(rel)
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    for i, names in plan.items():
        block = blocks[i]
        for group in scale_groups(block):
            if not names.intersection(group.linears):
                continue
            prev = block.get_submodule(group.prev)
            if not isinstance(prev, nn.Linear | RMSNorm | LayerNorm | nn.LayerNorm) or (
                    isinstance(prev, nn.LayerNorm) and prev.weight is None):  # fmt: skip
                raise QuantError(f"{method}: cannot fold scales into blocks.{i}.{group.prev}, a {type(prev).__name__}")
            for rel in (group.prev, *group.linears):
                for pname, p in block.get_submodule(rel).named_parameters():
                    if counts[id(p)] > 1:
                        raise QuantError(f"{method}: blocks.{i}.{rel}.{pname} of the {kind} is shared with another "
                                         "module; folding a scale into it would change both")  # fmt: skip
    return plan


def _attention_output(attn: nn.Module, inputs: AttentionInputs, h: Tensor) -> Tensor:
    """The attention module's output for normed inputs h: what the q/k/v scale search compares (llm-awq's way)."""
    return attn(h, inputs)


def awq_quantize_model(model: nn.Module, windows: Tensor, *, bits: int = 4, group_size: int | None = 128,
                       n_grid: int = N_GRID, where: Where = "blocks.*", clip: bool = True,
                       max_shrink: float = MAX_SHRINK, n_sample_token: int = N_SAMPLE_TOKEN, batch_size: int = 8,
                       progress: bool = True, pack: bool = False) -> AWQResult:  # fmt: skip
    """AWQ on an lmforge Transformer, in place: per block, search and fold the activation-aware scales, search and
    apply the clips, then write the pseudo-quantized weights Q(W) into the `nn.Linear`s that `where` selects
    (patterns or a predicate over module names, as in `model.surgery`; default: every projection in the blocks).
    `windows` (n, T) are calibration token ids (`quant.calibration.calibration_windows`). The model stays float
    (fake quantization), or with `pack` each quantized linear becomes its `QuantLinear` (`packed_linear`; 4 or 8
    bits). Unsupported layers and options raise `QuantError` before any work."""
    _check_bits_group(bits, group_size)
    if pack and bits not in (4, 8):
        raise QuantError(f"AWQ: packed layers hold 4- or 8-bit codes, not bits={bits}")
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise QuantError(f"AWQ: n_grid={n_grid!r} must be a positive integer")
    if n_sample_token < 1 or not 0 < max_shrink <= 1:
        raise QuantError(f"AWQ: max_shrink={max_shrink} must be in (0, 1], n_sample_token={n_sample_token} >= 1")
    plan = scaling_plan(model, where, group_size)
    result = AWQResult()
    options = {"bits": bits, "group_size": group_size}

    def process(i: int, block: nn.Module, x: Tensor, inputs: AttentionInputs) -> None:
        names = plan.get(i)
        if not names:
            return
        groups = [g for g in scale_groups(block) if names.intersection(g.linears)]
        needed = {g.feature for g in groups} | {_FEATURE[n] for n in names}
        feats: dict[str, Tensor] = {}
        hooks = [block.get_submodule(n).register_forward_hook(
                 lambda _m, args, _out, key=n: feats.__setitem__(key, args[0].detach()))
                 for n in needed]  # fmt: skip
        try:
            block(x, inputs)
        finally:
            for h in hooks:
                h.remove()
        searches = []
        for g in groups:
            linears = [block.get_submodule(n) for n in g.linears]
            attention = partial(_attention_output, block.attn, inputs)
            fn = attention if g.inspect == "attn" else block.get_submodule(g.inspect)
            quantize = [n in names for n in g.linears]
            searches.append(search_scale(feats[g.feature], linears, fn, n_grid=n_grid, quantize=quantize, **options))
        for g, found in zip(groups, searches, strict=True):
            fold_scales(block.get_submodule(g.prev), [block.get_submodule(n) for n in g.linears], found.scales)
            feats[g.feature] = feats[g.feature] / found.scales.to(feats[g.feature].dtype)
            prefix = f"blocks.{i}."
            result.scales.append(AppliedScale(prefix + g.prev, tuple(prefix + n for n in g.linears), found.ratio,
                                              found.scales, found.errors))  # fmt: skip
        if clip:
            for rel in sorted(names):
                if rel.split(".")[-1] in _NO_CLIP:
                    continue
                linear = block.get_submodule(rel)
                max_val = search_clip(linear.weight, feats[_FEATURE[rel]], n_grid=n_grid, max_shrink=max_shrink,
                                      n_sample_token=n_sample_token, **options)  # fmt: skip
                apply_clip(linear, max_val)
                result.clips[f"blocks.{i}.{rel}"] = max_val
        for rel in sorted(names):
            linear = block.get_submodule(rel)
            with torch.no_grad():
                if pack:
                    swap_modules(block, lambda n, _, r=rel: n == r, lambda _, old: packed_linear(old, **options))
                else:
                    linear.weight.copy_(pseudo_quantize(linear.weight, **options))
            result.quantized.append(f"blocks.{i}.{rel}")

    for_each_block(model, windows, process, batch_size=batch_size, progress=progress)
    return result
