"""The `lmforge` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import lmforge
from lmforge.config import PRESETS
from lmforge.export_cli import export_command
from lmforge.generate_cli import chat_command, generate_command
from lmforge.speedrun import speedrun_command
from lmforge.tokenizer_cli import app as tokenizer_app
from lmforge.train_cli import train_command

app = typer.Typer(
    help="lmforge: a from-scratch, hackable LLM stack. Run `lmforge COMMAND --help` for details.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
app.add_typer(tokenizer_app, name="tokenizer")
app.command("generate")(generate_command)
app.command("chat")(chat_command)
app.command("export")(export_command)
app.command("train")(train_command)
app.command("speedrun")(speedrun_command)


def _version(value: bool) -> None:
    if value:
        console.print(f"lmforge {lmforge.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """lmforge: a from-scratch, hackable LLM stack."""


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="A Hugging Face model directory or a .gguf file.")],
    tensors: Annotated[
        bool, typer.Option("--tensors", help="Also list every tensor (GGUF): type, shape, size.")
    ] = False,
) -> None:
    """Show a model's architecture, configuration, parameter count, dtype and size on disk (GGUF: its metadata
    and tensor types)."""
    from lmforge.inspect import describe, gguf_tensor_rows

    try:
        summary = describe(path)
        rows = gguf_tensor_rows(path) if tensors else []
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from None
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


@app.command()
def init(
    out: Annotated[Path, typer.Argument(help="Directory to write (config.json + model.safetensors).")],
    preset: Annotated[str, typer.Option(help="Named ModelConfig preset: " + ", ".join(sorted(PRESETS)))] = "tiny",
    seed: Annotated[int, typer.Option(help="Random seed for the initial weights.")] = 0,
) -> None:
    """Write a randomly initialised model as a Hugging Face directory (a starting point for training)."""
    import torch

    from lmforge.config import ConfigError, ModelConfig
    from lmforge.model.transformer import Transformer

    try:
        cfg = ModelConfig.preset(preset)
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    torch.manual_seed(seed)
    lmforge.save(Transformer(cfg), out)
    console.print(f"wrote {cfg.arch} model ({preset}) to {out}")


if __name__ == "__main__":
    app()
