"""Attention maps: PNG figures of attention patterns and other (rows x columns) grids, with token labels.

The pattern of head h of a layer is the matrix its softmax produced, one row per query position i, one column
per key position j:

    A_h[i, j] = softmax_j( s · q_i · k_j + mask )      rows sum to 1; causal: A_h[i, j] = 0 for j > i

`attention_patterns` reads it from a forward pass (the layer's `attn.hook_pattern`); `plot_attention` draws one
panel per head, queries down and keys across, labelled with the tokens; `plot_heatmap` draws any labelled grid
(a logit lens, a patching grid). Figures are drawn on matplotlib's Agg canvas (no display) and written
atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from lmforge.interp.hooks import run_with_cache
from lmforge.model.transformer import Transformer
from lmforge.utils.atomic import atomic_path
from lmforge.utils.errors import LmforgeError


def attention_patterns(model: Transformer, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The attention pattern (B, H, T, T) of `layer` on `input_ids` (B, T)."""
    if not 0 <= layer < model.config.n_layers:
        raise LmforgeError(f"layer must be in 0..{model.config.n_layers - 1}, got {layer}")
    name = f"blocks.{layer}.attn.hook_pattern"
    return run_with_cache(model, input_ids, name)[name]


def plot_attention(
    pattern: torch.Tensor,
    tokens: Sequence[str],
    path: str | Path,
    *,
    heads: Sequence[int] | None = None,
    title: str = "",
    columns: int = 4,
) -> Path:
    """Write a PNG with one panel per head of `pattern` (H, T, T) (or one (T, T) map), axes labelled `tokens`."""
    if pattern.dim() == 2:
        pattern = pattern[None]
    if pattern.dim() != 3 or pattern.shape[-1] != pattern.shape[-2]:
        raise LmforgeError(f"plot_attention: pattern must be (heads, T, T) or (T, T), got {tuple(pattern.shape)}")
    if len(tokens) != pattern.shape[-1]:
        raise LmforgeError(f"plot_attention: {len(tokens)} token labels for a pattern over {pattern.shape[-1]} "
                           "positions")  # fmt: skip
    heads = list(range(pattern.shape[0])) if heads is None else list(heads)
    bad = [h for h in heads if not 0 <= h < pattern.shape[0]]
    if bad:
        raise LmforgeError(f"plot_attention: heads {bad} out of range (the pattern has {pattern.shape[0]})")
    cols = min(columns, len(heads))
    rows = math.ceil(len(heads) / cols)
    size = 1.2 + 0.28 * len(tokens)
    fig, axes = _figure(rows, cols, (size * cols, size * rows))
    labels = [_label(t) for t in tokens]
    for ax, h in zip(axes, heads, strict=False):
        image = ax.imshow(pattern[h].detach().float().cpu().numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}", fontsize=9)
        _ticks(ax, labels, labels)
    for ax in axes[len(heads) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes[: len(heads)], shrink=0.6, label="attention")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_heatmap(
    values: torch.Tensor,
    path: str | Path,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    colorbar: str = "",
    cells: Sequence[Sequence[str]] | None = None,
    diverging: bool = False,
) -> Path:
    """Write a PNG of the grid `values` (R, C) with labelled rows and columns; `cells` (R x C strings) are
    written in the cells; `diverging` centres a red-blue scale on 0."""
    if values.dim() != 2 or values.shape != (len(row_labels), len(col_labels)):
        raise LmforgeError(f"plot_heatmap: values of shape {tuple(values.shape)} for {len(row_labels)} row and "
                           f"{len(col_labels)} column labels")  # fmt: skip
    grid = values.detach().float().cpu().numpy()
    width, height = 2.5 + 0.55 * len(col_labels) * (1.6 if cells else 1), 1.5 + 0.3 * len(row_labels)
    fig, (ax,) = _figure(1, 1, (width, height))
    if diverging:
        limit = float(abs(grid).max()) or 1.0
        image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    else:
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
    _ticks(ax, [_label(c) for c in col_labels], [_label(r) for r in row_labels])
    if cells is not None:
        for i, row in enumerate(cells):
            for j, text in enumerate(row):
                ax.text(j, i, _label(text), ha="center", va="center", fontsize=6, color="white")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(image, ax=ax, label=colorbar)
    return _save(fig, path)


def _label(token: str) -> str:
    """A token as an axis label: whitespace made visible, at most 12 characters."""
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    text = "␣" + text[1:] if text.startswith(" ") else text
    return text if len(text) <= 12 else text[:11] + "…"


def _figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    return fig, axes


def _ticks(ax, columns: Sequence[str], rows: Sequence[str]) -> None:
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path
