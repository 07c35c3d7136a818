"""`lmforge speedrun`: the whole pipeline (corpus -> tokenizer -> shards -> train -> chat -> export -> report) in one
command; `lmforge.train.speedrun` runs it, this file parses the flags, prints each stage's time (stderr) and, at
the end, the headline block: bits/byte against the floor (or the validation loss for --data), steps, tokens and
time (stdout)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.cli.errors import err


def _print_stage(name: str, seconds: float) -> None:
    err.print(f"[dim]{name}: {seconds:.1f} s[/dim]")


def _print_headline(text: str) -> None:
    typer.echo(text)


def speedrun_command(
    minutes: Annotated[
        float,
        typer.Option(help="Pre-training time in minutes; the lr schedule follows the clock and ends with it (the "
                     "chat stage adds 2-3, the other stages about one)."),
    ] = 5.0,
    out: Annotated[
        Path, typer.Option(help="The run directory (report.md, hf/, model.gguf, loss.png, log.jsonl).")
    ] = Path("runs/speedrun"),
    data: Annotated[
        list[Path] | None, typer.Option(help="Text files or directories of *.txt instead of the story grammar.")
    ] = None,
    preset: Annotated[str, typer.Option(help="Model size: cpu (default) or gpu.")] = "cpu",
    stories: Annotated[int | None, typer.Option(help="Stories to generate (default: the preset's).")] = None,
    chat_steps: Annotated[
        int | None,
        typer.Option(min=0, help="SFT steps of the chat stage after pre-training (story corpus only; 0: no chat "
                     "stage; default: lmforge.train.speedrun.CHAT_STEPS, 300)."),
    ] = None,
) -> None:
    """Build a corpus, train a tokenizer and a model, evaluate, sample and export it: the whole pipeline."""
    from lmforge.train.speedrun import run_speedrun

    chat = {} if chat_steps is None else {"chat_steps": chat_steps}  # else run_speedrun's default
    report = run_speedrun(out, minutes, data, preset, stories, on_stage=_print_stage, on_headline=_print_headline,
                          **chat)  # fmt: skip
    err.print(f"report: {report}", highlight=False)
