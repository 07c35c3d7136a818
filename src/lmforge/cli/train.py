"""`lmforge train RUN.toml --set optim.lr=3e-4`: pre-train a model on token shards.

Several processes: `torchrun --standalone --nproc_per_node=N -m lmforge train RUN.toml` (DDP by default,
`--set dist.strategy=fsdp` for FSDP2; see `lmforge.train.distributed`).

The run directory (`train.out_dir`) receives config.toml (the resolved config), log.jsonl, loss.png,
checkpoints/ (the run resumes from the newest one), and at the end the model as a Hugging Face directory
(`hf/`) and, when the format can hold it, a GGUF file (`model.gguf`). The stages are wired in
`lmforge.train.run`; this command reads the config and the tokenizer, and prints what the run wrote.

A mistake in the config, a checkpoint that cannot be resumed (corrupt, foreign, or not safe to unpickle) and a
run that diverges (a non-finite loss) end the command with one `error:` line and exit status 1: they are
`LmforgeError`s, which `lmforge.cli` reports (`errors.reports_errors`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

err = Console(stderr=True)


def train_command(
    config: Annotated[Path | None, typer.Argument(help="A TOML run file (omitted: all defaults).")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override one field, e.g. --set optim.lr=3e-4 (repeatable)."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in the run directory.")] = True,
    init: Annotated[
        Path | None,
        typer.Option(help="Start from this model (continued pre-training): a Hugging Face directory, a .gguf file "
                     "or an lmforge run directory; its architecture replaces [model], its tokenizer serves when "
                     "data.tokenizer is not set."),
    ] = None,
) -> None:
    """Pre-train a model on token shards; logs, checkpoints and the exported model go to train.out_dir."""
    import lmforge
    from lmforge.train import distributed
    from lmforge.train.config import load_train_config
    from lmforge.train.run import run_training

    cfg = load_train_config(config, set_ or [])
    tokenizer = lmforge.load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
    result = run_training(cfg, tokenizer, resume=resume, init=init)
    if result.dist.is_main:
        for path in result.written:
            err.print(f"wrote {path}", highlight=False)
        summary = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if isinstance(v, float))
        err.print(f"step {result.step}: {summary}", highlight=False)
    distributed.shutdown(result.dist)  # multi-process runs end here (exit code 0)
