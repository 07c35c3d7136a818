"""Pruning: zero a fraction of each linear layer's weights, chosen by a score; magnitude and Wanda.

A pruned layer keeps its shape, y = (W ⊙ K) x + b with K a 0/1 mask (True: kept). Each method scores every weight,
and a sparsity rule keeps the highest scores.

Scores, for a linear W (out, in):

    magnitude   S_ij = |W_ij|
    Wanda       S_ij = |W_ij| · ||X_j||_2          (Sun et al. 2023, "A Simple and Effective Pruning Approach for
                                                     Large Language Models", arXiv:2306.11695)

where X (tokens, in) holds the layer's inputs over calibration text and ||X_j||_2 = sqrt(Σ_t X_tj²) is the norm of
input channel j (`InputNorms` accumulates Σ_t X_tj², the squared norm, per channel). A weight on a channel that
carries large activations matters more to the output than its magnitude says: |W_ij| · ||X_j|| is the size of its
contribution to y_i over the calibration tokens (Wanda's reference code keeps Σ_t X_tj² / n_samples as
`scaler_row`; the constant factor changes no comparison).

Sparsity rules (K keeps the highest scores; the pruned ones are the lowest, ties broken by the lower index first,
as a stable ascending sort):

    unstructured s, per row     in every output row, the k = ⌊in · s⌋ lowest scores are pruned (Wanda's
                                comparison group: each output row loses the same fraction)
    unstructured s, per layer   the k = ⌊out · in · s⌋ lowest scores of the whole matrix are pruned (the
                                magnitude baseline's group: rows may lose unequal fractions)
    N:M semi-structured         in every group of M consecutive weights along the input dimension of a row, the
                                N highest scores are kept, the M - N others pruned (2:4: the pattern sparse tensor
                                cores run; sparsity 1 - N/M); `in` must be a multiple of M. N counts the kept
                                weights (NVIDIA's N:M); Wanda's code names the pruned count prune_n, the same
                                number for its 2:4 and 4:8

Magnitude prunes per layer by default and Wanda per row (the paper's choices); `scope` sets either. The sparsity is
exact: ⌊·⌋ weights pruned per group (Wanda's reference magnitude baseline thresholds with `<=` and prunes one more
weight per layer, ⌊out · in · s⌋ + 1, and every weight tied at the threshold).

The model driver `prune_model` prunes the linears of `model.blocks` that `where` selects (the attention and MLP
projections; the embeddings and the LM head stay dense, as in Wanda; a mixture-of-experts router stays dense, and
`ExpertLinear` matrices are not `nn.Linear`). Magnitude needs no data. Wanda goes block by block over calibration
windows (quant/calibration.py's `for_each_block`, as its reference's `prune_wanda`): block i's linears get their
input norms (summed in float32, float64 in a float64 model) from one pass of the block's inputs, are all pruned,
and block i+1 calibrates on the outputs of the pruned block i. Pure functions: `magnitude_scores`, `wanda_scores`,
`unstructured_mask`, `nm_mask`, `prune_mask`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from lmforge.model.surgery import Where
from lmforge.quant.calibration import CalibrationError, for_each_block, run_block
from lmforge.quant.nf4 import linear_where
from lmforge.utils.errors import LmforgeError

__all__ = ["METHODS", "InputNorms", "PruningError", "check_pruning", "magnitude_scores", "nm_mask", "parse_pattern",
           "prune_mask", "prune_model", "sparsity_of", "unstructured_mask", "wanda_scores"]  # fmt: skip

METHODS = ("magnitude", "wanda")
SCOPES = ("row", "layer")
DEFAULT_SCOPE = {"magnitude": "layer", "wanda": "row"}
FLAGS = {"method": "--method", "sparsity": "--sparsity", "pattern": "--pattern", "scope": "--scope"}  # the CLI's
Scope = Literal["row", "layer"]


class PruningError(LmforgeError):
    """A pruning setting that cannot apply: ``sparsity=1.5: ...``; `cli_message` names the `lmforge prune` flag
    instead (``--sparsity=1.5: ...``)."""

    def __init__(self, name: str, value: object, rule: str) -> None:
        self.name, self.value, self.rule = name, value, rule
        super().__init__(f"{name}={value!r}: {rule}")

    @property
    def cli_message(self) -> str:
        return f"{FLAGS.get(self.name, self.name)}={self.value!r}: {self.rule}"


# ----------------------------------------------------------------------------------------------------- scores


class InputNorms:
    """Σ_t x_tj² per input channel j ((in,) in `dtype`) over every token added: the squared ||X_j||_2 of Wanda."""

    def __init__(self, in_features: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        self.in_features = in_features
        self.squared = torch.zeros(in_features, device=device, dtype=dtype)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        """Fold activations x (..., in_features) in: every vector along the last dimension is one token."""
        if x.shape[-1:] != (self.in_features,):
            raise PruningError("activations", tuple(x.shape), f"a layer of {self.in_features} input features takes "
                               f"(..., {self.in_features})")  # fmt: skip
        x = x.detach().reshape(-1, self.in_features).to(self.squared.dtype)
        self.squared += (x * x).sum(dim=0)
        self.tokens += x.shape[0]


def magnitude_scores(weight: Tensor) -> Tensor:
    """|W| (out, in)."""
    return weight.detach().abs()


def wanda_scores(weight: Tensor, squared_norms: Tensor) -> Tensor:
    """|W_ij| · sqrt(Σ_t x_tj²) (out, in), from the weight (out, in) and the inputs' squared norms (in,)."""
    if squared_norms.shape != weight.shape[1:]:
        raise PruningError("squared_norms", tuple(squared_norms.shape), f"a weight of shape {tuple(weight.shape)} "
                           f"needs one per input channel, ({weight.shape[1]},)")  # fmt: skip
    return weight.detach().abs() * squared_norms.to(weight.device).sqrt()


# ----------------------------------------------------------------------------------------------------- masks


def _check_sparsity(sparsity: float) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float) or not 0 < sparsity < 1:
        raise PruningError("sparsity", sparsity, "must be a fraction of weights in (0, 1), e.g. 0.5")


def _check_pattern(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
        raise PruningError("pattern", f"{n}:{m}", "N:M keeps N of every M weights: needs integers 1 <= N < M (2:4)")


def _check_one_rule(sparsity: float | None, pattern: object) -> None:
    if (sparsity is None) == (pattern is None):
        raise PruningError("sparsity", sparsity, f"give a sparsity or an N:M pattern, not both nor neither "
                           f"(pattern={pattern!r})")  # fmt: skip


def parse_pattern(pattern: str | tuple[int, int]) -> tuple[int, int]:
    """(N, M) from "N:M" (or a pair), checked: 1 <= N < M."""
    if isinstance(pattern, str):
        found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
        if found is None:
            raise PruningError("pattern", pattern, "must be N:M, keep N of every M consecutive weights (2:4)")
        pattern = (int(found[1]), int(found[2]))
    n, m = pattern
    _check_pattern(n, m)
    return n, m


def _keep_all_but_lowest(scores: Tensor, k: int) -> Tensor:
    """True but at the k lowest scores of each row of `scores` (rows, columns), ties lower index first."""
    pruned = torch.argsort(scores, dim=1, stable=True)[:, :k]
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, pruned, False)


def unstructured_mask(scores: Tensor, sparsity: float, scope: Scope = "row") -> Tensor:
    """The kept weights (bool, like `scores` (out, in)): the ⌊in · s⌋ lowest scores of each row pruned ("row"), or
    the ⌊out · in · s⌋ lowest of the matrix ("layer"); ties pruned lower index first (module doc)."""
    _check_sparsity(sparsity)
    if scope not in SCOPES:
        raise PruningError("scope", scope, f"choose one of {', '.join(SCOPES)}")
    if scores.dim() != 2:
        raise PruningError("scores", tuple(scores.shape), "must be a 2-D (out, in) matrix")
    flat = scores.reshape(1, -1) if scope == "layer" else scores
    return _keep_all_but_lowest(flat, int(flat.shape[1] * sparsity)).view_as(scores)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """The kept weights (bool, like `scores` (out, in)): the n highest of every m consecutive scores of a row."""
    _check_pattern(n, m)
    if scores.dim() != 2 or scores.shape[1] % m:
        raise PruningError("pattern", f"{n}:{m}", f"needs a 2-D (out, in) matrix with in a multiple of {m}, got "
                           f"shape {tuple(scores.shape)}")  # fmt: skip
    return _keep_all_but_lowest(scores.reshape(-1, m), m - n).view_as(scores)


def prune_mask(scores: Tensor, sparsity: float | None = None, pattern: tuple[int, int] | None = None,
               scope: Scope = "row") -> Tensor:  # fmt: skip
    """`unstructured_mask(scores, sparsity, scope)` or, with `pattern` (N, M), `nm_mask(scores, N, M)`."""
    _check_one_rule(sparsity, pattern)
    return unstructured_mask(scores, sparsity, scope) if pattern is None else nm_mask(scores, *pattern)


# ----------------------------------------------------------------------------------------------------- a model


def _selected(model: nn.Module, where: Where) -> dict[str, nn.Linear]:
    """The `nn.Linear` layers `where` selects (by `model.named_modules()` name), routers left out; all inside
    `model.blocks`."""
    select = linear_where(where)
    layers = {n: m for n, m in model.named_modules() if select(n, m) and not n.endswith(".router")}
    inside = {id(m) for m in model.blocks.modules()}
    outside = [n for n, m in layers.items() if id(m) not in inside]
    if outside:
        raise PruningError("where", where, f"selects linears outside model.blocks ({', '.join(outside)}); the "
                           "embeddings and the LM head stay dense: narrow the pattern")  # fmt: skip
    if not layers:
        raise PruningError("where", where, "selects no nn.Linear inside model.blocks")
    return layers


def check_pruning(model: nn.Module, method: str, sparsity: float | None = None,
                  pattern: str | tuple[int, int] | None = None, scope: Scope | None = None,
                  where: Where = "blocks.*") -> tuple[tuple[int, int] | None, Scope]:  # fmt: skip
    """Refuse, before any work, what `prune_model` cannot do on `model` (each message names the setting and, for a
    pattern that does not fit a layer, the layer). Returns the parsed pattern and the scope to use."""
    if method not in METHODS:
        raise PruningError("method", method, f"choose one of {', '.join(METHODS)}")
    _check_one_rule(sparsity, pattern)
    if pattern is not None and scope is not None:
        raise PruningError("scope", scope, "applies to unstructured sparsity; an N:M pattern prunes within groups")
    if scope is not None and scope not in SCOPES:
        raise PruningError("scope", scope, f"choose one of {', '.join(SCOPES)}")
    nm = None if pattern is None else parse_pattern(pattern)
    if sparsity is not None:
        _check_sparsity(sparsity)
    for name, layer in _selected(model, where).items():
        if nm is not None and layer.in_features % nm[1]:
            raise PruningError("pattern", f"{nm[0]}:{nm[1]}", f"the {layer.in_features} input features of {name} "
                               f"are not a multiple of M={nm[1]}")  # fmt: skip
    return nm, scope or DEFAULT_SCOPE[method]


def _prune(layers: Iterator[tuple[str, nn.Linear, Tensor]], sparsity: float | None, pattern: tuple[int, int] | None,
           scope: Scope, report: dict[str, float]) -> None:  # fmt: skip
    """Zero each (name, layer, scores)'s pruned weights in place; record its sparsity in `report`."""
    for name, layer, scores in layers:
        keep = prune_mask(scores, sparsity, pattern, scope)
        layer.weight.masked_fill_(~keep, 0.0)
        report[name] = 1.0 - keep.sum().item() / keep.numel()


@torch.no_grad()
def prune_model(model: nn.Module, method: str, *, sparsity: float | None = None,
                pattern: str | tuple[int, int] | None = None, windows: Tensor | None = None,
                scope: Scope | None = None, where: Where = "blocks.*", batch_size: int = 8,
                progress: bool = True) -> dict[str, float]:  # fmt: skip
    """Prune, in place, the linears of `model.blocks` that `where` selects (module doc) with `method` ("magnitude"
    or "wanda") at an unstructured `sparsity` in (0, 1) or an N:M `pattern` ("2:4"); Wanda calibrates on the token
    `windows` (n, T), `batch_size` windows per forward. `scope` ("row" or "layer") is the unstructured comparison
    group (default: magnitude per layer, Wanda per row). Everything is checked before any work. Returns each pruned
    layer's sparsity (its fraction of zeroed weights) by qualified name. tqdm bars count the layers (magnitude) or
    the blocks and each block's layers (Wanda) when `progress`."""
    from tqdm.auto import tqdm

    nm, scope = check_pruning(model, method, sparsity, pattern, scope, where)
    layers = _selected(model, where)
    if (method == "wanda") != (windows is not None):
        need = "needs calibration windows (n, T) of token ids" if method == "wanda" else "takes no calibration data"
        raise PruningError("method", method, need)
    report: dict[str, float] = {}
    if method == "magnitude":
        bar = tqdm(layers.items(), desc="magnitude pruning", unit="linear", disable=not progress)
        _prune(((n, m, magnitude_scores(m.weight)) for n, m in bar), sparsity, nm, scope, report)
        return report
    names = {id(m): n for n, m in layers.items()}

    def process(i: int, block: nn.Module, x: Tensor, _) -> None:
        here = {names[id(m)]: m for m in block.modules() if id(m) in names}
        if not here:
            return
        norms = {n: InputNorms(m.in_features, device=m.weight.device, dtype=torch.promote_types(m.weight.dtype,
                 torch.float32)) for n, m in here.items()}  # fmt: skip
        hooks = [m.register_forward_hook(lambda _, args, __, acc=norms[n]: acc.add(args[0])) for n, m in here.items()]
        try:
            run_block(model, block, x, batch_size)
        finally:
            for hook in hooks:
                hook.remove()
        for name, acc in norms.items():
            if acc.tokens == 0:
                raise CalibrationError(f"Wanda: no calibration tokens reached {name} (a layer its block does not "
                                       "call on its input): leave it out with `where`")  # fmt: skip
        bar = tqdm(here.items(), desc=f"Wanda block {i}", unit="linear", leave=False, disable=not progress)
        _prune(((n, m, wanda_scores(m.weight, norms.pop(n).squared)) for n, m in bar), sparsity, nm, scope, report)

    for_each_block(model, windows, process, batch_size=batch_size, progress=progress)
    return report


def sparsity_of(model: nn.Module, where: Where = "blocks.*") -> float:
    """The fraction of zero weights over the linears `where` selects inside `model.blocks` (routers left out)."""
    layers = _selected(model, where).values()
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    return zeros / sum(m.weight.numel() for m in layers)
