"""`lmforge info MODEL` (a model file's summary, from `lmforge.io.summary`) and `lmforge init OUT` (a randomly
initialised model as a Hugging Face directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmforge.cli.errors import fail
from lmforge.config import PRESETS

console = Console()


def info_command(
    path: Annotated[Path, typer.Argument(help="A Hugging Face model directory or a .gguf file.")],
    tensors: Annotated[
        bool, typer.Option("--tensors", help="Also list every tensor (GGUF): type, shape, size.")
    ] = False,
) -> None:
    """Show a model's architecture, configuration, parameter count, dtype and size on disk (GGUF: its metadata
    and tensor types)."""
    from lmforge.io.summary import describe, gguf_tensor_rows

    summary = describe(path)
    rows = gguf_tensor_rows(path) if tensors else []
    table = Table(title=escape(str(path)), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in summary.items():
        table.add_row(key, escape(str(value)))
    console.print(table)
    if rows:
        listing = Table("tensor", "type", "shape", "size")
        for row in rows:
            listing.add_row(*(escape(str(v)) for v in row))
        console.print(listing)


def init_command(
    out: Annotated[Path, typer.Argument(help="Directory to write (config.json + model.safetensors).")],
    preset: Annotated[str, typer.Option(help="Named ModelConfig preset: " + ", ".join(sorted(PRESETS)))] = "tiny",
    seed: Annotated[int, typer.Option(help="Random seed for the initial weights, in [0, 2**64).")] = 0,
) -> None:
    """Write a randomly initialised model as a Hugging Face directory (a starting point for training)."""
    import torch

    import lmforge
    from lmforge.config import ModelConfig
    from lmforge.infer.sampling import SEED_LIMIT
    from lmforge.model.transformer import Transformer

    if not 0 <= seed < SEED_LIMIT:
        raise fail(f"--seed={seed}: must be an integer in [0, 2**64)")
    cfg = ModelConfig.preset(preset)
    torch.manual_seed(seed)
    lmforge.save(Transformer(cfg), out)
    console.print(f"wrote {cfg.arch} model ({preset}) to {out}")
