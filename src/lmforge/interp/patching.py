"""Activation patching (causal tracing; Meng et al. 2022, Wang et al. 2022): which activations carry the answer.

Take a clean prompt and a corrupted one of the same token length that differs in the detail that matters
("The Eiffel Tower is in the city of" / "The Colosseum is in the city of"), and a metric of the logits, m (for
example the logit difference m = logit(answer) - logit(other) at the last position). Run the corrupted prompt
again with one activation a replaced by its value in the clean run:

    grid[a] = m( model(corrupted | a <- a_clean) )

An activation whose clean value restores the metric carries the information that separates the two prompts.
Normalising, (grid - m_corrupted) / (m_clean - m_corrupted) is 1 where the patch restores everything and 0
where it restores nothing. The grids here:

    patch_residual   (L, T)     one position of one layer's residual stream (resid_pre, resid_mid, resid_post)
                                or of a sublayer's output (attn_out, mlp_out)
    patch_heads      (L, H)     one head's output z_h (hook_z, before the output projection) at every position;
                     (L, T, H)  with by_position, at one position

Each patched run is one row of a batch: `batch_size` patches share a forward pass (the grid is the same as one
run per patch up to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from lmforge.interp.hooks import hooks, run_with_cache
from lmforge.model.attention import Attention
from lmforge.model.transformer import Transformer
from lmforge.utils.errors import LmforgeError

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits (B, T, vocab) -> a scalar tensor
RESIDUAL_POINTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


class PatchingError(LmforgeError):
    """A clean/corrupted pair that cannot be patched (lengths differ) or a bad option."""


def logit_diff(answer: int, other: int, position: int = -1) -> Metric:
    """The metric logit(answer) - logit(other) at `position`, averaged over the batch."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, position, answer] - logits[:, position, other]).mean()

    return metric


def patch_residual(
    model: Transformer,
    clean_ids: torch.Tensor,
    corrupted_ids: torch.Tensor,
    metric: Metric,
    *,
    point: str = "resid_pre",
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """(L, T) grid: the metric with `point` (one of RESIDUAL_POINTS) of layer l at position t patched."""
    if point not in RESIDUAL_POINTS:
        raise PatchingError(f"point must be one of {', '.join(RESIDUAL_POINTS)}, got {point!r}")
    n_layers, t = model.config.n_layers, _check_pair(clean_ids, corrupted_ids)
    runs = [(f"blocks.{layer}.hook_{point}", (slice(None), pos)) for layer in range(n_layers) for pos in range(t)]
    return _patch(model, clean_ids, corrupted_ids, metric, runs, batch_size, progress).view(n_layers, t)


def patch_heads(
    model: Transformer,
    clean_ids: torch.Tensor,
    corrupted_ids: torch.Tensor,
    metric: Metric,
    *,
    by_position: bool = False,
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """(L, H) grid: the metric with head h of layer l (its z, at every position) patched; (L, T, H) with
    `by_position`, one position at a time."""
    if not all(isinstance(b.attn, Attention) for b in model.blocks):
        raise PatchingError("patch_heads needs standard attention (hook_z) in every layer; this model has MLA")
    n_layers, n_heads, t = model.config.n_layers, model.config.n_heads, _check_pair(clean_ids, corrupted_ids)
    every = [slice(None)] if not by_position else list(range(t))
    runs = [(f"blocks.{layer}.attn.hook_z", (slice(None), pos, head))
            for layer in range(n_layers) for pos in every for head in range(n_heads)]  # fmt: skip
    grid = _patch(model, clean_ids, corrupted_ids, metric, runs, batch_size, progress)
    return grid.view(n_layers, t, n_heads) if by_position else grid.view(n_layers, n_heads)


def _check_pair(clean_ids: torch.Tensor, corrupted_ids: torch.Tensor) -> int:
    """The shared token length of a clean/corrupted pair of (B, T) id tensors."""
    for what, ids in (("clean_ids", clean_ids), ("corrupted_ids", corrupted_ids)):
        if ids.dim() != 2:
            raise PatchingError(f"{what} must be (batch, tokens), got shape {tuple(ids.shape)}")
    if clean_ids.shape[1] != corrupted_ids.shape[1]:
        raise PatchingError(f"the clean prompt has {clean_ids.shape[1]} tokens and the corrupted one "
                            f"{corrupted_ids.shape[1]}: patching needs pairs of equal token length")  # fmt: skip
    if clean_ids.shape[0] != corrupted_ids.shape[0]:
        raise PatchingError(f"clean_ids has {clean_ids.shape[0]} prompts and corrupted_ids "
                            f"{corrupted_ids.shape[0]}: they pair up one to one")  # fmt: skip
    return clean_ids.shape[1]


def _patch(
    model: Transformer,
    clean_ids: torch.Tensor,
    corrupted_ids: torch.Tensor,
    metric: Metric,
    runs: Sequence[tuple[str, tuple]],
    batch_size: int,
    progress: bool,
) -> torch.Tensor:
    """The metric of each run (point name, index into the activation): the corrupted prompt with the clean
    activation at that index, `batch_size` runs per forward."""
    if batch_size < 1:
        raise PatchingError(f"batch_size must be at least 1, got {batch_size}")
    clean = run_with_cache(model, clean_ids, sorted({name for name, _ in runs}))
    b = corrupted_ids.shape[0]
    values = []
    chunks = [runs[i : i + batch_size] for i in range(0, len(runs), batch_size)]
    for chunk in tqdm(chunks, desc="patching", disable=not progress):

        def patch(x: torch.Tensor, name: str, chunk: Sequence[tuple[str, tuple]] = chunk) -> torch.Tensor:
            x = x.clone()
            rows = x.view(len(chunk), b, *x.shape[1:])
            for j, (point, index) in enumerate(chunk):
                if point == name:
                    rows[j][index] = clean[name][index]
            return x

        with torch.no_grad(), hooks(model, [(sorted({name for name, _ in chunk}), patch)]):
            logits = model(corrupted_ids.repeat(len(chunk), 1))
        values += [metric(part) for part in logits.view(len(chunk), b, *logits.shape[1:])]
    return torch.stack(values).float()
