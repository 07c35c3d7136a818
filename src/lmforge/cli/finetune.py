"""`lmforge finetune MODEL --data FILE.jsonl --method lora --out DIR`: supervised fine-tuning, fully or with
adapters (`lmforge.finetune.run`); this file parses the flags and prints what the run wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lmforge.cli.generate import Model

err = Console(stderr=True)


def finetune_command(
    model: Model,
    data: Annotated[Path, typer.Option(help="Training data: JSONL of {\"messages\": [...]} or {\"prompt\", "
                                      "\"completion\"} objects, rendered with the model's chat template.")],
    out: Annotated[Path, typer.Option(help="Output directory: the adapter (PEFT's format) or the model, logs, "
                                     "checkpoints (a rerun resumes).")],
    method: Annotated[
        str, typer.Option(help="full, lora, dora, qlora (LoRA on a 4-bit NF4 base), prompt or prefix (tuning).")
    ] = "lora",
    num_virtual_tokens: Annotated[int, typer.Option(help="prompt / prefix: virtual tokens.")] = 20,
    prefix_projection: Annotated[
        bool, typer.Option(help="prefix: train through PEFT's reparameterisation MLP.")
    ] = False,
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha: the update is scaled by alpha / r.")] = 16.0,
    dropout: Annotated[float, typer.Option(help="Dropout on the adapter's input.")] = 0.05,
    target: Annotated[
        list[str] | None,
        typer.Option(help="Modules to adapt, a name pattern (repeatable; default: every attention and MLP "
                     "projection, blocks.*.attn.*_proj and blocks.*.mlp.*_proj)."),
    ] = None,
    rslora: Annotated[bool, typer.Option(help="rsLoRA: scale by alpha / sqrt(r).")] = False,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: 2e-4 adapters, 2e-5 full).")] = None,
    epochs: Annotated[float, typer.Option(help="Passes over the data (ignored with --max-steps).")] = 1.0,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: from --epochs).")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows (of --seq-len tokens) per step.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per row; a longer example is an error (or skipped).")] = 512,
    packing: Annotated[
        bool, typer.Option(help="Pack several examples per row (they never attend to each other), or pad one per row.")
    ] = True,
    val: Annotated[Path | None, typer.Option(help="Validation JSONL: its loss every --eval-every steps.")] = None,
    eval_every: Annotated[int, typer.Option(help="Steps between validation losses.")] = 50,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: only at the end).")] = 100,
    precision: Annotated[str, typer.Option(help="fp32, or bf16 autocast.")] = "fp32",
    seed: Annotated[int, typer.Option(help="Seed of the data order and the adapter's initialisation.")] = 0,
    skip_invalid: Annotated[
        bool, typer.Option(help="Skip (and count) bad lines and too-long examples instead of stopping at the first.")
    ] = False,
    merge: Annotated[bool, typer.Option(help="Also write the merged model (Hugging Face) to DIR/merged.")] = False,
    gguf: Annotated[bool, typer.Option(help="Also write the merged model as DIR/model.gguf (F16).")] = False,
) -> None:
    """Fine-tune MODEL on chat or prompt/completion data: the loss on the assistant's tokens only; adapters land in
    --out in PEFT's format (`lmforge generate MODEL --adapter DIR`, `peft`, `lmforge.load(MODEL, adapter=DIR)`)."""
    from lmforge.finetune.lora import DEFAULT_TARGETS
    from lmforge.finetune.run import FinetuneConfig, finetune

    config = FinetuneConfig(
        method=method, rank=rank, alpha=alpha, dropout=dropout, target=tuple(target or DEFAULT_TARGETS),
        rslora=rslora, lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size, seq_len=seq_len,
        packing=packing, eval_every=eval_every, checkpoint_every=checkpoint_every, precision=precision, seed=seed,
        skip_invalid=skip_invalid, num_virtual_tokens=num_virtual_tokens, prefix_projection=prefix_projection,
    )  # fmt: skip
    result = finetune(model, data, out, config, val=val, merge=merge, gguf=gguf)
    skipped = f", {result.skipped} skipped" if result.skipped else ""
    err.print(f"{result.examples} examples{skipped}; {result.trainable:,} trainable parameters", highlight=False)
    for path in result.written:
        err.print(f"wrote {path}", highlight=False)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if isinstance(v, float))
    err.print(f"step {result.step}: {summary}", highlight=False)
