"""`lmforge merge CONFIG.yml --out DIR`: merge models as a mergekit YAML says (merge/driver.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lmforge.cli.errors import fail

console = Console()


def merge_command(
    config: Annotated[Path, typer.Argument(help="A mergekit YAML file (merge_method, base_model, models, ...).")],
    out: Annotated[Path, typer.Option("--out", help="The model directory to write (replaced whole if it exists).")],
    seed: Annotated[int, typer.Option(help="Seed of the random methods (dare_linear, dare_ties).")] = 0,
    shard_size: Annotated[
        float, typer.Option(help="Largest output shard, in GiB (more tensors go to further shards).")
    ] = 4.0,
) -> None:
    """Merge the models CONFIG names (linear, slerp, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
    breadcrumbs_ties, model_stock; "DIR+ADAPTER" adds a PEFT LoRA) and write the result to --out, streaming one
    tensor at a time."""
    from lmforge.merge import merge

    if not config.is_file():
        raise fail(f"{config}: no such file")
    if shard_size <= 0:
        raise fail(f"--shard-size={shard_size}: must be positive")
    if out.exists() and not out.is_dir():
        raise fail(f"--out={out}: exists and is not a directory")
    start = time.perf_counter()
    names = merge(config, out, seed=seed, shard_bytes=int(shard_size * 2**30))
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    console.print(f"wrote {out} ({len(names)} tensors, {size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s",
                  highlight=False)  # fmt: skip
