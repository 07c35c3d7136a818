"""GPTQ: one-shot weight quantization with second-order error feedback (Frantar et al. 2022, arXiv:2210.17323).

Objective. For a linear layer W (out, in) and calibration inputs X (in, n tokens), GPTQ picks the quantized Q that
keeps the layer's outputs on that data, row by row (rows of W do not interact):

    argmin_Q ||W X - Q X||²        with the Hessian of this quadratic  H = 2 X Xᵀ / n  (in, in)

H is accumulated as a running mean over calibration tokens (`HessianAccumulator`, as the reference's `add_batch`):
for a batch of m more tokens after n,  H <- H · n / (n + m),  x <- sqrt(2 / (n + m)) x,  H <- H + xᵀ x. (The
reference counts sequences, not tokens; a constant factor on H changes neither Q nor the codes, only `loss`.)

Conditioning. Dead inputs, columns i with H_ii = 0 (an input that is always 0), get H_ii = 1 and W[:, i] = 0; then
H <- H + λ I with λ = damp · mean(diag H) (damp = 0.01: the reference's percdamp).

Algorithm (OBQ's greedy update in a fixed column order, with H⁻¹ through its Cholesky factor). With U upper
triangular, Uᵀ U = H⁻¹ (row i of U is row i of the inverse Hessian of the columns not yet quantized, divided by the
square root of its diagonal), for each column i = 0..in-1 in turn:

    q_i = quant(w_i)                        w_i (out,) the current column i, as updated so far, on the grid below
    e_i = (w_i - q_i) / U_ii
    w_j <- w_j - e_i U_ij   for all j > i   the remaining columns absorb column i's error
    loss += Σ_rows e_i² / 2                 = (w_i - q_i)² / (2 [H_F⁻¹]_ii): the objective's increase

The terms of `loss` add up to ½ tr((W - Q) H (W - Q)ᵀ) with the damped H (the reference's sum of `Losses`).
Lazy batches: the update is applied at once only inside a block of `block_size` (128) columns; the other columns
get the block's errors in one product after it, W[:, i2:] -= E U[i1:i2, i2:], the same arithmetic with the memory
traffic of a matrix product.

Grid (the reference's quant.py `Quantizer.find_params` and `quantize`, per row r of the columns a scale covers).
Asymmetric, with L = 2^bits - 1:  lo = min(min w_r, 0),  hi = max(max w_r, 0),  s = (hi - lo) / L,  z = round(-lo / s),
code = clamp(round(w / s) + z, 0, L) (uint8),  ŵ = (code - z) · s. In float32 this is the arithmetic of
quant/primitives.py's `asymmetric_params` / `asymmetric_codes` / `dequantize_codes`, bit for bit, with two
differences that keep it here: a row of zeros, which the reference widens from lo = hi = 0 to lo = -1, hi = 1
(s = 2 / L, z = round(L / 2); primitives keep s = 0, z = 0; both give ŵ = 0, and this module stores the reference's
s and z, as GPTQ checkpoints hold them); and the precision: primitives always compute in float32, GPTQ in its
working dtype, so that a float64 run is the exact algorithm (a value of w / s within a float32 ulp of a rounding
boundary would otherwise change a code, and with it the error fed to every later column of its row).
Symmetric (the reference's sym=True): hi <- max(-lo, hi), lo <- -hi when lo < 0, s = (hi - lo) / L and the zero
point is fixed at 2^(bits-1). The codes are stored signed, code = clamp(round(w / s), -2^(bits-1), 2^(bits-1) - 1)
(int8; add 2^(bits-1) for the reference's unsigned code), ŵ = code · s, and `zero_point` is None. This grid has one
more negative code than primitives' `symmetric_codes` (clamped to ±qmax) and s = 2 absmax / L, not absmax / qmax.
A reference quirk is kept: a row with no negative value keeps lo = 0, so s = max / L and its values above
(2^(bits-1) - 1) · s clip; such rows are rare in trained weights once groups hold 32..128 values. A value at
-absmax sits on a midpoint, -(2^(bits-1) - 1/2) steps, and rounds half to even to -2^(bits-1).

Granularity.
- per channel (group_size None or -1): one (s, z) per row from the whole weight as given (the reference takes them
  before the dead columns are zeroed);
- groups of g columns: (s, z) are recomputed at the start of each group, from the *current* (error-updated) weights
  of the group's g columns. Block boundaries are the multiples of block_size and of g, so a group always starts a
  block and the weights it is computed from have every earlier update applied (the reference, when a group starts
  inside a block, reads columns that have not yet received that block's earlier updates);
- act-order (`act_order`): columns are processed in decreasing diag(H), the most active inputs first while the most
  columns remain to absorb their error; W and H are permuted, groups are consecutive in that order, and the
  permutation is undone at the end, `g_idx[c]` giving the group of original column c (AutoGPTQ's desc_act);
- static groups (`static_groups`, with groups): (s, z) of every group computed up front from the weights as given
  (dead columns zeroed) in original column order, group c // g for column c whatever the processing order
  (AutoGPTQ's static_groups): with act-order, g_idx stays c // g, monotone, so kernels need no reordering.

`gptq_quantize(weight, hessian)` quantizes one matrix and returns a `GPTQResult` (codes, scales, zero points,
g_idx, the dequantized weight, loss); `gptq_quantize_model(model, windows)` does every selected linear of a model
block by block (quant/calibration.py's `for_each_block`): each block's Hessians come from its inputs as the
quantized earlier blocks produce them, and every linear of a block is quantized from the same pass (not the
reference's optional "true-sequential" order, where q/k/v are quantized before o_proj sees their outputs). The
model is left fake-quantized: each linear's weight holds its dequantized Q (packing into an int4 module is separate).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.model.surgery import Where, swap_modules
from lmforge.quant.calibration import for_each_block, run_block
from lmforge.quant.nf4 import linear_where
from lmforge.quant.primitives import QuantError, top_code
from lmforge.quant.weight_only import QuantLinear

BITS = range(2, 9)
_TINY = torch.finfo(torch.float32).tiny  # floor of a scale before dividing by it (as primitives)


class HessianAccumulator:
    """H = 2 X Xᵀ / n over every token added so far (float32 (in, in) by default), kept as a running mean."""

    def __init__(self, in_features: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        if not (isinstance(in_features, int) and in_features >= 1):
            raise QuantError(f"HessianAccumulator: in_features={in_features!r} must be a positive integer")
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        """Fold activations x (..., in_features) in: every vector along the last dimension is one token."""
        if x.shape[-1:] != (self.in_features,):
            raise QuantError(f"HessianAccumulator.add: activations of shape {tuple(x.shape)} for a layer of "
                             f"{self.in_features} input features")  # fmt: skip
        x = x.detach().reshape(-1, self.in_features).to(self.hessian)
        m = x.shape[0]
        if m == 0:
            return
        self.hessian *= self.tokens / (self.tokens + m)
        self.tokens += m
        x = x * math.sqrt(2 / self.tokens)
        self.hessian.addmm_(x.T, x)


@dataclass
class GPTQResult:
    """One matrix quantized by GPTQ (module doc). Column c uses scale[:, g_idx[c]] (and zero_point[:, g_idx[c]])."""

    codes: Tensor  # (out, in): uint8 0..2^bits-1 (asymmetric) or int8 -2^(bits-1)..2^(bits-1)-1 (symmetric)
    scale: Tensor  # (out, n_groups) in the working dtype: float32 (float64 for float64 inputs)
    zero_point: Tensor | None  # (out, n_groups) uint8, or None (symmetric)
    g_idx: Tensor  # (in,) int64: the group of each input column
    weight: Tensor  # (out, in) the dequantized Q, (code - z) · s, in the dtype of the weight given
    loss: float  # Σ (w_i - q_i)² / (2 [H_F⁻¹]_ii) = ½ tr((W - Q) H (W - Q)ᵀ) with the damped H
    bits: int

    def packed(self, bias: Tensor | None = None) -> QuantLinear:
        """These codes as a `QuantLinear` (4 or 8 bits, groups of consecutive columns: g_idx[c] = c // g, which
        act-order keeps with static groups)."""
        groups = self.scale.shape[1]
        size = self.codes.shape[1] // groups
        _check(self.bits in (4, 8), f"GPTQ: a QuantLinear holds 4- or 8-bit codes, not bits={self.bits}")
        _check(torch.equal(self.g_idx, torch.arange(self.codes.shape[1]) // size), "GPTQ: act-order without "
               "static_groups permutes the groups; pack with static_groups=True (g_idx = column // group_size)")
        return QuantLinear.from_codes(self.codes, self.scale.float(), self.zero_point, bias, bits=self.bits,
                                      group_size=size)  # fmt: skip

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """(code - z) · s from codes, scales and g_idx (equal to `weight`), in `dtype` (default: weight's)."""
        scale = self.scale[:, self.g_idx]
        q = self.codes.to(scale.dtype)
        if self.zero_point is not None:
            q = q - self.zero_point[:, self.g_idx]
        return (q * scale).to(dtype or self.weight.dtype)


# ----------------------------------------------------------------------------------------------------- grid


def _grid(w: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    """(s (rows,), z (rows,) uint8 or None) for the rows of w (rows, columns) on the reference's grid, in w's dtype."""
    lo, hi = w.amin(dim=1).clamp(max=0.0), w.amax(dim=1).clamp(min=0.0)
    if symmetric:
        hi = torch.maximum(-lo, hi)
        lo = torch.where(lo < 0, -hi, lo)  # the reference's sym: lo stays 0 in a row with no negative value
    empty = (lo == 0) & (hi == 0)
    lo, hi = lo.masked_fill(empty, -1.0), hi.masked_fill(empty, 1.0)
    scale = (hi - lo) / top_code(bits)
    if symmetric:
        return scale, None
    return scale, torch.round(-lo / scale.clamp_min(_TINY)).clamp_(0, top_code(bits)).to(torch.uint8)


def _quantize_column(w: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> tuple[Tensor, Tensor]:
    """(codes, ŵ) of the values w (rows,) on their rows' grid, in w's dtype (primitives' arithmetic in float32)."""
    q = torch.round(w / scale.clamp_min(_TINY))
    if zero is None:
        half = 2 ** (bits - 1)
        codes = q.clamp_(-half, half - 1)
        return codes.to(torch.int8), codes * scale
    codes = q.add_(zero).clamp_(0, top_code(bits))
    return codes.to(torch.uint8), (codes - zero) * scale


# ----------------------------------------------------------------------------------------------------- one matrix


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise QuantError(message)


def _check_options(bits: int, group_size: int | None, damp: float, block_size: int, static_groups: bool) -> None:
    _check(isinstance(bits, int) and bits in BITS, f"GPTQ: bits={bits!r} must be an integer in 2..8")
    per_channel = group_size is None or group_size == -1
    _check(per_channel or (isinstance(group_size, int) and group_size >= 1), f"GPTQ: group_size={group_size!r} "
           "must be a positive integer, or None / -1 for one scale per row")  # fmt: skip
    _check(isinstance(damp, int | float) and math.isfinite(damp) and damp >= 0,
           f"GPTQ: damp={damp!r} must be a finite number >= 0 (a fraction of the mean diagonal of H)")  # fmt: skip
    _check(isinstance(block_size, int) and block_size >= 1, f"GPTQ: block_size={block_size!r} must be a positive "
           "integer")  # fmt: skip
    _check(not (static_groups and per_channel), f"GPTQ: static_groups needs groups; group_size={group_size!r} "
           "is one scale per row")  # fmt: skip


def _check_group_divides(group_size: int | None, in_features: int, what: str) -> None:
    if group_size is not None and group_size != -1:
        _check(in_features % group_size == 0,
               f"GPTQ: group_size={group_size} must divide the {in_features} input features of {what}")  # fmt: skip


def _inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """U upper triangular with Uᵀ U = H⁻¹ (the reference: cholesky, cholesky_inverse, cholesky upper)."""
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item() == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info.item() != 0:
        raise QuantError(f"GPTQ: the Hessian with damp={damp} is not positive definite (Cholesky failed at column "
                         f"{info.item() - 1}); raise damp, or calibrate on more tokens")  # fmt: skip
    return upper


@torch.no_grad()
def gptq_quantize(weight: Tensor, hessian: Tensor, *, bits: int = 4, group_size: int | None = 128, damp: float = 0.01,
                  block_size: int = 128, act_order: bool = False, static_groups: bool = False,
                  symmetric: bool = False) -> GPTQResult:  # fmt: skip
    """Quantize `weight` (out, in) with GPTQ given the layer's input Hessian `hessian` (in, in) (module doc).

    Works in float32, or float64 when `weight` or `hessian` is float64 (the scales are in that dtype)."""
    _check_options(bits, group_size, damp, block_size, static_groups)
    _check(weight.dim() == 2 and weight.is_floating_point(), "GPTQ: weight must be a 2-D float tensor (out, in), "
           f"got shape {tuple(weight.shape)} of {weight.dtype}")  # fmt: skip
    out_features, in_features = weight.shape
    _check(tuple(hessian.shape) == (in_features, in_features), f"GPTQ: hessian of shape {tuple(hessian.shape)} for "
           f"a weight of shape {tuple(weight.shape)}: it must be ({in_features}, {in_features})")  # fmt: skip
    _check_group_divides(group_size, in_features, f"a weight of shape {tuple(weight.shape)}")
    _check(bool(torch.isfinite(weight).all()), "GPTQ: the weight has non-finite values (NaN or inf)")
    _check(bool(torch.isfinite(hessian).all()), "GPTQ: the hessian has non-finite values (NaN or inf activations?)")

    dtype = torch.promote_types(torch.promote_types(weight.dtype, hessian.dtype), torch.float32)
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(device=w.device, dtype=dtype).clone()
    per_channel = group_size is None or group_size == -1
    g = in_features if per_channel else group_size
    n_groups = in_features // g
    scale = torch.empty(out_features, n_groups, device=w.device, dtype=dtype)
    zero = None if symmetric else torch.empty(out_features, n_groups, device=w.device, dtype=torch.uint8)

    def set_group(k: int, columns: Tensor) -> None:
        s, z = _grid(columns, bits, symmetric)
        scale[:, k] = s
        if zero is not None:
            zero[:, k] = z

    if per_channel:
        set_group(0, w)  # before the dead columns are zeroed, as the reference
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if static_groups:
        for k in range(n_groups):
            set_group(k, w[:, k * g : (k + 1) * g])

    columns = torch.arange(in_features, device=w.device)
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else columns
    if act_order:
        w, h = w[:, perm], h[perm][:, perm]
    h.diagonal().add_(damp * h.diagonal().mean())
    u = _inverse_cholesky(h, damp)

    # group of the column processed at each position; groups recomputed along the way start at multiples of g
    if per_channel:
        group_at = [0] * in_features
    elif static_groups:
        group_at = (perm // g).tolist()
    else:
        group_at = [p // g for p in range(in_features)]
    dynamic = not per_channel and not static_groups
    starts = set(range(0, in_features, block_size)) | (set(range(0, in_features, g)) if dynamic else set())
    bounds = [*sorted(starts), in_features]

    code_dtype = torch.int8 if zero is None else torch.uint8
    codes = torch.empty(out_features, in_features, device=w.device, dtype=code_dtype)
    q = torch.empty_like(w)
    losses = torch.zeros(out_features, device=w.device, dtype=dtype)
    for i1, i2 in itertools.pairwise(bounds):
        if dynamic and i1 % g == 0:
            set_group(i1 // g, w[:, i1 : i1 + g])  # every earlier block's update is in w: the current weights
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            k = group_at[i1 + i]
            c, qi = _quantize_column(w1[:, i], scale[:, k], None if zero is None else zero[:, k], bits)
            codes[:, i1 + i], q[:, i1 + i] = c, qi
            e = (w1[:, i] - qi) / u1[i, i]
            losses += e * e
            w1[:, i + 1 :] -= e[:, None] * u1[i, i + 1 :][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    if per_channel:
        g_idx = torch.zeros(in_features, dtype=torch.long, device=w.device)
    elif static_groups or not act_order:
        g_idx = columns // g
    else:
        g_idx = torch.empty_like(columns)
        g_idx[perm] = columns // g  # the column processed at position p is in group p // g
    if act_order:
        inverse = torch.argsort(perm)
        codes, q = codes[:, inverse], q[:, inverse]
    return GPTQResult(codes, scale, zero, g_idx, q.to(weight.dtype), float(losses.sum()) / 2, bits)


# ----------------------------------------------------------------------------------------------------- a model


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, windows: Tensor, *, bits: int = 4, group_size: int | None = 128,
                        damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                        static_groups: bool = False, symmetric: bool = False, where: Where = "blocks.*",
                        batch_size: int = 8, progress: bool = True,
                        pack: bool = False) -> dict[str, GPTQResult]:  # fmt: skip
    """Quantize, in place, every `nn.Linear` that `where` selects inside `model.blocks` with GPTQ calibrated on the
    token `windows` (n, T), block by block (module doc); each linear's weight becomes its dequantized Q, or with
    `pack` the linear becomes its `QuantLinear` (`GPTQResult.packed`: 4 or 8 bits; act-order with static groups).

    Per block: forward hooks on its selected linears accumulate their input Hessians while the block runs its inputs
    `batch_size` windows at a time; then each linear is quantized (`gptq_quantize`, same options) and written back.
    Returns the results by qualified module name. `where` is matched against the names of `model.named_modules()`
    (quant/nf4.py's `linear_where`); a selected linear outside the blocks is refused (calibration runs the blocks
    only). Mixture-of-experts `ExpertLinear` matrices are not `nn.Linear` and stay as they are; routers are linears
    ("blocks.*.mlp.router"): leave them out with `where` to keep them in float."""
    from tqdm.auto import tqdm

    _check_options(bits, group_size, damp, block_size, static_groups)
    if pack:
        _check(bits in (4, 8), f"GPTQ: packed layers hold 4- or 8-bit codes, not bits={bits}")
        _check(static_groups or not act_order or group_size in (None, -1), "GPTQ: packing act-order needs "
               "static_groups (groups of consecutive columns)")  # fmt: skip
    select = linear_where(where)
    names = {id(m): n for n, m in model.named_modules() if select(n, m)}
    in_blocks = {id(m) for m in model.blocks.modules()}
    outside = [n for i, n in names.items() if i not in in_blocks]
    _check(not outside, f"gptq_quantize_model: where={where!r} selects linears outside model.blocks "
           f"({', '.join(outside)}); GPTQ calibrates the blocks only: narrow the pattern")  # fmt: skip
    _check(bool(names), f"gptq_quantize_model: where={where!r} selects no nn.Linear inside model.blocks")
    for m in model.modules():
        if id(m) in names:
            _check_group_divides(group_size, m.in_features, names[id(m)])
    options = dict(bits=bits, group_size=group_size, damp=damp, block_size=block_size, act_order=act_order,
                   static_groups=static_groups, symmetric=symmetric)  # fmt: skip
    results: dict[str, GPTQResult] = {}
    def process(i: int, block: nn.Module, x: Tensor, _) -> None:
        layers = {names[id(m)]: m for m in block.modules() if id(m) in names}
        if not layers:
            return
        accumulators = {n: HessianAccumulator(m.in_features, device=m.weight.device) for n, m in layers.items()}
        hooks = [m.register_forward_hook(lambda _, args, __, acc=accumulators[n]: acc.add(args[0]))
                 for n, m in layers.items()]  # fmt: skip
        try:
            run_block(model, block, x, batch_size)
        finally:
            for hook in hooks:
                hook.remove()
        bar = tqdm(layers.items(), desc=f"GPTQ block {i}", unit="linear", leave=False, disable=not progress)
        for name, linear in bar:
            result = gptq_quantize(linear.weight, accumulators.pop(name).hessian, **options)
            if pack:
                rel = name.removeprefix(f"blocks.{i}.")
                swap_modules(block, lambda n, _, r=rel: n == r, lambda _, old, r=result: r.packed(old.bias))
            else:
                linear.weight.copy_(result.weight)
            results[name] = result
            bar.set_postfix(layer=name.rsplit(".", 1)[-1], loss=f"{result.loss:.3g}")

    for_each_block(model, windows, process, batch_size=batch_size, progress=progress)
    return results
