"""The `lmforge` command line.

Every command is wrapped in `cli_errors.reports_errors`: a user's mistake (a bad flag value, a missing path, a
broken model or tokenizer file) prints one `error:` line naming the flag or the file, and exits 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import lmforge
from lmforge.cli_errors import fail, reports_errors
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
for name, command in (("generate", generate_command), ("chat", chat_command), ("export", export_command),
                      ("train", train_command), ("speedrun", speedrun_command)):  # fmt: skip
    app.command(name)(reports_errors(command))


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
@reports_errors
def info(
    path: Annotated[Path, typer.Argument(help="A Hugging Face model directory or a .gguf file.")],
    tensors: Annotated[
        bool, typer.Option("--tensors", help="Also list every tensor (GGUF): type, shape, size.")
    ] = False,
) -> None:
    """Show a model's architecture, configuration, parameter count, dtype and size on disk (GGUF: its metadata
    and tensor types)."""
    from lmforge.inspect import describe, gguf_tensor_rows

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


@app.command()
@reports_errors
def init(
    out: Annotated[Path, typer.Argument(help="Directory to write (config.json + model.safetensors).")],
    preset: Annotated[str, typer.Option(help="Named ModelConfig preset: " + ", ".join(sorted(PRESETS)))] = "tiny",
    seed: Annotated[int, typer.Option(help="Random seed for the initial weights, in [0, 2**64).")] = 0,
) -> None:
    """Write a randomly initialised model as a Hugging Face directory (a starting point for training)."""
    import torch

    from lmforge.config import ModelConfig
    from lmforge.infer.sampling import SEED_LIMIT
    from lmforge.model.transformer import Transformer

    if not 0 <= seed < SEED_LIMIT:
        raise fail(f"--seed={seed}: must be an integer in [0, 2**64)")
    cfg = ModelConfig.preset(preset)
    torch.manual_seed(seed)
    lmforge.save(Transformer(cfg), out)
    console.print(f"wrote {cfg.arch} model ({preset}) to {out}")


def run() -> None:
    """The `lmforge` executable: `app`, with the usage errors the command-line parser raises itself (an unknown
    command or flag, ``--max-tokens abc``) printed as one ``error:`` line too, exit status 2 (their usual code)."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:  # Ctrl-C, or EOF at a prompt
        sys.exit(1)
    except typer.TyperException as e:  # click's UsageError / BadParameter, as typer vendors them
        ctx = getattr(e, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        fail(f"{e.format_message()}{hint}")
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
