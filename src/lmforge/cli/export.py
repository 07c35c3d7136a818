"""`lmforge export MODEL OUT --qtype q8_0`: write any model `lmforge.load` reads as a GGUF file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lmforge.cli.errors import fail

console = Console()


def export_command(
    model: Annotated[Path, typer.Argument(help="A Hugging Face model directory or a .gguf file.")],
    out: Annotated[Path, typer.Argument(help="The GGUF file to write.")],
    qtype: Annotated[
        str, typer.Option(help="Type of the weight matrices: f32, f16, q8_0, q5_0, q4_0, q4_1 or q4_k.")
    ] = "f16",
) -> None:
    """Export a model and its tokenizer as GGUF (llama.cpp's format; llama, qwen2 and qwen3 models)."""
    import lmforge
    from lmforge.io.gguf_export import QTYPES, GGUFExportError, save_gguf

    if qtype.lower() not in QTYPES:
        raise fail(f"--qtype={qtype!r}: choose one of {', '.join(QTYPES)}")
    if out.is_dir():
        raise fail(f"{out}: is a directory; give the path of the .gguf file to write")
    if not out.parent.exists():
        raise fail(f"{out.parent}: no such directory")
    start = time.perf_counter()
    net, tokenizer = lmforge.load(model)
    if tokenizer is None:
        raise fail(f"{model}: has no tokenizer (a GGUF file needs one)")
    try:
        save_gguf(net, tokenizer, out, qtype)
    except GGUFExportError as e:  # this model cannot be written as GGUF (the arch, the tokenizer): name the input
        raise fail(f"{model}: {e}") from None
    seconds = time.perf_counter() - start
    size = out.stat().st_size
    console.print(f"wrote {out} ({qtype.lower()}, {size / 2**20:.1f} MiB) in {seconds:.1f} s", highlight=False)
