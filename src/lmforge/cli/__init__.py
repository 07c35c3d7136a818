"""The `lmforge` command line: one thin file per command group, each parsing flags and calling the library.

    errors.py     how every command reports a user's mistake (one `error:` line, exit status 1)
    model.py      `lmforge info` (io/summary.py) and `lmforge init`
    generate.py   `lmforge generate` and `lmforge chat` (infer/generate.py)
    export.py     `lmforge export` (io/gguf_export.py)
    tokenizer.py  `lmforge tokenizer train/encode/inspect` (tokenizer/, data/shards.py)
    train.py      `lmforge train` (train/run.py)
    finetune.py   `lmforge finetune` (finetune/run.py)
    speedrun.py   `lmforge speedrun` (train/speedrun.py)
    serve.py      `lmforge serve` (engine/server.py: the OpenAI-compatible HTTP server)
    eval.py       `lmforge eval ppl` (eval/perplexity.py: llama.cpp's perplexity)
    quantize.py   `lmforge quantize` (quant/methods.py)
    prune.py      `lmforge prune` (quant/pruning.py: magnitude, Wanda; unstructured and N:M)
    merge.py      `lmforge merge` (merge/driver.py: mergekit's YAML, streamed tensor by tensor)
    distill.py    `lmforge distill` (train/distill.py: a teacher's logits as the objective of the shared trainer)

Every command is wrapped in `errors.reports_errors`: a user's mistake (a bad flag value, a missing path, a broken
model or tokenizer file) prints one `error:` line naming the flag or the file, and exits 1. No library module
imports this package.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

import lmforge
from lmforge.cli.distill import distill_command
from lmforge.cli.errors import fail, reports_errors
from lmforge.cli.eval import app as eval_app
from lmforge.cli.export import export_command
from lmforge.cli.finetune import finetune_command
from lmforge.cli.generate import chat_command, generate_command
from lmforge.cli.merge import merge_command
from lmforge.cli.model import info_command, init_command
from lmforge.cli.prune import prune_command
from lmforge.cli.quantize import quantize_command
from lmforge.cli.serve import serve_command
from lmforge.cli.speedrun import speedrun_command
from lmforge.cli.tokenizer import app as tokenizer_app
from lmforge.cli.train import train_command

app = typer.Typer(
    help="lmforge: a from-scratch, hackable LLM stack. Run `lmforge COMMAND --help` for details.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(eval_app, name="eval")
for name, command in (("generate", generate_command), ("chat", chat_command), ("export", export_command),
                      ("train", train_command), ("speedrun", speedrun_command), ("info", info_command),
                      ("init", init_command), ("serve", serve_command), ("finetune", finetune_command),
                      ("quantize", quantize_command), ("prune", prune_command),
                      ("merge", merge_command), ("distill", distill_command)):  # fmt: skip
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
