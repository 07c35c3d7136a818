"""PNG figures for training runs (matplotlib without a display, files written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.utils.atomic import atomic_path


def figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    """A new (figure, axes) with labels and a light grid."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    return fig, ax


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write `fig` (with its legend) as a PNG at `path`, atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.axes[0].legend()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_losses(history: list[dict[str, Any]], path: str | Path) -> Path:
    """Training and validation loss against the step (records with "step" and "loss" / "val_loss")."""
    fig, ax = figure("loss", "step", "loss (nats/token)")
    for key, label in (("loss", "train"), ("val_loss", "validation")):
        points = [(r["step"], r[key]) for r in history if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), label=label, marker="o" if key == "val_loss" else None)
    return save_figure(fig, path)
