"""`lmforge quantize MODEL --method gptq --calib FILE --out DIR`: quantize a model and write it (quant/methods.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lmforge.cli.errors import fail

console = Console()

_METHODS = "int8, llm-int8, gptq, awq, smoothquant, rtn (model directories); q8_0, q4_0, q4_1, q4_k (GGUF files)"


def quantize_command(
    model: Annotated[Path, typer.Argument(help="A Hugging Face model directory or a .gguf file (read as float).")],
    method: Annotated[str, typer.Option(help=f"The method: {_METHODS}.")],
    out: Annotated[Path, typer.Option(help="Where to write: a model directory, or a .gguf file for the GGUF types.")],
    bits: Annotated[int | None, typer.Option(help="Code width of rtn / gptq / awq: 4 (default) or 8.")] = None,
    group_size: Annotated[
        int | None, typer.Option(help="Input columns per scale for rtn / gptq / awq (default 128; 0: one per row).")
    ] = None,
    calib: Annotated[
        Path | None, typer.Option(help="Calibration text (UTF-8) for gptq, awq and smoothquant.")
    ] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration windows cut from --calib.")] = 128,
    calib_len: Annotated[
        int | None, typer.Option(help="Tokens per calibration window (default 512, or the model's context if shorter).")
    ] = None,
    act_order: Annotated[
        bool, typer.Option("--act-order", help="GPTQ: quantize columns by decreasing activation (static groups).")
    ] = False,
    symmetric: Annotated[
        bool, typer.Option("--symmetric", help="rtn / gptq: signed codes and no zero point.")
    ] = False,
    threshold: Annotated[float, typer.Option(help="llm-int8: activations above this stay in float.")] = 6.0,
    alpha: Annotated[float, typer.Option(help="smoothquant: migration strength in [0, 1].")] = 0.5,
    activations: Annotated[
        str, typer.Option(help="smoothquant: per_token (dynamic) or per_tensor (static, calibrated).")
    ] = "per_token",
    layout: Annotated[
        str, typer.Option("--format", help="rtn / gptq / awq: 'lmforge' (its own layout, read back bit for bit) or "
                                           "'hf' (the GPTQ / AWQ checkpoint transformers, vLLM and TGI read).")
    ] = "lmforge",
) -> None:
    """Quantize MODEL's projections and write the result: a model directory (`lmforge.load`, `lmforge generate`
    and `lmforge serve` run it quantized) or, for q8_0 / q4_0 / q4_1 / q4_k, a GGUF file llama.cpp runs."""
    import torch

    import lmforge
    from lmforge.io.hf_gptq import check_exportable, save_hf_quantized
    from lmforge.quant.methods import QuantizeOptions, quantize_model
    from lmforge.quant.modules import bits_per_weight, quantized_layers

    options = QuantizeOptions(method.lower(), bits, group_size, act_order, symmetric, calib_samples, calib_len,
                              threshold, alpha, activations)  # fmt: skip
    if options.gguf != (out.suffix == ".gguf"):
        want = "a .gguf file" if options.gguf else "a model directory (not a .gguf file: use q8_0 ... q4_k for GGUF)"
        raise fail(f"--out={out}: --method={method} writes {want}")
    if not out.parent.exists():
        raise fail(f"--out={out}: no such directory {out.parent}")
    if layout not in ("lmforge", "hf"):
        raise fail(f"--format={layout}: 'lmforge' or 'hf'")
    if layout == "hf" and options.method not in ("rtn", "gptq", "awq"):
        raise fail(f"--format=hf: the Hugging Face layouts (GPTQ, AWQ) hold rtn, gptq and awq, not --method={method}")
    hf_format = {"hf": "awq" if options.method == "awq" else "gptq"}.get(layout)
    if calib is not None and not calib.is_file():
        raise fail(f"--calib={calib}: no such file")
    start = time.perf_counter()
    net, tokenizer = lmforge.load(model, dtype=torch.float32, quantized=False)
    if tokenizer is None:
        raise fail(f"{model}: has no tokenizer (calibration and the written model need one)")
    options.check(net)  # every option against the method and this model, before the text is read or tokenized
    if hf_format:
        check_exportable(net, hf_format, options.bits or 4)
    ids = None
    if calib is not None:
        ids = torch.tensor(tokenizer.encode(calib.read_text(encoding="utf-8")), dtype=torch.long)
    names = quantize_model(net, options, ids)
    if options.gguf:
        lmforge.save(net, out, tokenizer, qtype=options.method)
    elif hf_format:
        save_hf_quantized(net, out, tokenizer, fmt=hf_format)
    else:
        lmforge.save(net, out, tokenizer)
    layers = quantized_layers(net).values()
    size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    summary = f"wrote {out} ({options.method}, {size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s"
    if names:
        summary += f": {len(names)} layers at {bits_per_weight(layers):.2f} bits per weight"
    console.print(summary, highlight=False)
