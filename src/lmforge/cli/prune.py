"""`lmforge prune MODEL --method wanda --pattern 2:4 --calib FILE --out DIR`: prune a model's projections and write
it (quant/pruning.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lmforge.cli.errors import fail

console = Console()


def prune_command(
    model: Annotated[Path, typer.Argument(help="A Hugging Face model directory or a .gguf file (read as float).")],
    method: Annotated[str, typer.Option(help="The score: magnitude (|W|) or wanda (|W| times input norms).")],
    out: Annotated[Path, typer.Option(help="The model directory to write (float, the pruned weights zero).")],
    sparsity: Annotated[
        float | None, typer.Option(help="Unstructured: the fraction of each layer's weights to zero, in (0, 1).")
    ] = None,
    pattern: Annotated[
        str | None, typer.Option(help="Semi-structured N:M instead: keep N of every M consecutive weights (2:4).")
    ] = None,
    scope: Annotated[
        str | None, typer.Option(help="Unstructured comparison group: row or layer (default: magnitude per layer, "
                                      "wanda per output row).")
    ] = None,
    calib: Annotated[Path | None, typer.Option(help="Calibration text (UTF-8) for wanda.")] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows cut from --calib.")] = 128,
    calib_len: Annotated[
        int | None, typer.Option(help="Tokens per calibration window (default 512, or the model's context if shorter).")
    ] = None,
) -> None:
    """Prune MODEL's attention and MLP projections (the embeddings and the LM head stay dense) by magnitude or Wanda,
    at a sparsity or an N:M pattern, and write the result as a model directory that every command loads."""
    import torch

    import lmforge
    from lmforge.quant.calibration import calibration_windows
    from lmforge.quant.methods import DEFAULT_WINDOW
    from lmforge.quant.pruning import check_pruning, prune_model, sparsity_of

    method = method.lower()
    if method == "wanda" and calib is None:
        raise fail("--method=wanda: needs calibration text (--calib FILE)")
    if method == "magnitude" and calib is not None:
        raise fail("--method=magnitude: takes no calibration text (--calib)")
    if calib is not None and not calib.is_file():
        raise fail(f"--calib={calib}: no such file")
    if calib is not None and calib_samples < 1:
        raise fail(f"--calib-samples={calib_samples}: needs at least 1 window")
    if out.suffix == ".gguf":
        raise fail(f"--out={out}: lmforge prune writes a model directory (then `lmforge export` it as GGUF)")
    if not out.parent.exists():
        raise fail(f"--out={out}: no such directory {out.parent}")
    start = time.perf_counter()
    net, tokenizer = lmforge.load(model, dtype=torch.float32, quantized=False)
    check_pruning(net, method, sparsity, pattern, scope)  # every setting against this model, before any work
    windows = None
    if calib is not None:
        if tokenizer is None:
            raise fail(f"{model}: has no tokenizer (wanda's calibration text needs one)")
        seq_len = min(DEFAULT_WINDOW, net.config.max_seq_len) if calib_len is None else calib_len
        if not 1 <= seq_len <= net.config.max_seq_len:
            raise fail(f"--calib-len={calib_len}: must be in 1 .. the model's context ({net.config.max_seq_len})")
        ids = torch.tensor(tokenizer.encode(calib.read_text(encoding="utf-8")), dtype=torch.long)
        windows = calibration_windows(ids, calib_samples, seq_len)
    report = prune_model(net, method, sparsity=sparsity, pattern=pattern, windows=windows, scope=scope)
    lmforge.save(net, out, tokenizer)
    console.print(f"wrote {out} ({method}, {pattern or f'sparsity {sparsity}'}): {len(report)} layers, "
                  f"{100 * sparsity_of(net):.1f}% of their weights zero, in {time.perf_counter() - start:.1f} s",
                  highlight=False)  # fmt: skip
