"""How every `lmforge` command reports a user's mistake: one `error:` line on stderr and exit status 1.

Each command is wrapped in `reports_errors`. It turns the errors a user can cause into ``error: <message>``:

* `LmforgeError`: every error lmforge raises for a user's file, field, flag or value (config.json, GGUF,
  safetensors, tokenizer files, chat templates, checkpoints, sampling values, prompts); its message names the file
  and key. An error with a `cli_message` (a generation input such as `SamplingParams.top_p`) is shown that way,
  with the flag's name (``--top-p=2.0: must be in [0, 1]``);
* `OSError`: a missing or unreadable path;
* a Jinja `TemplateError` from rendering a chat template.

The message is printed on one line (newlines joined, never wrapped at the terminal's width, rich markup escaped)
and the command exits 1, without a traceback. Anything else is a bug in lmforge and keeps its traceback. Checks a
command makes itself end with `raise fail("--flag=value: what was expected")`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import typer
from jinja2 import TemplateError
from rich.console import Console
from rich.markup import escape

from lmforge.utils.errors import LmforgeError

err = Console(stderr=True)
Command = TypeVar("Command", bound=Callable)


def fail(message: object) -> typer.Exit:
    """Print `message` as one ``error:`` line on stderr; return the exit (status 1) for the caller to raise."""
    text = " ".join(str(message).splitlines())
    err.print(f"[red]error:[/red] {escape(text)}", soft_wrap=True, highlight=False)
    return typer.Exit(1)


def message_of(error: BaseException) -> str:
    """What the user reads: the CLI form of a generation-input error, `path: reason` for an OSError that names its
    file, else the error's own message."""
    if (cli_message := getattr(error, "cli_message", None)) is not None:
        return cli_message
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def reports_errors(command: Command) -> Command:
    """Wrap a typer command so that a user's mistake ends it with `fail` (module doc); the signature is kept."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (LmforgeError, OSError, TemplateError) as e:
            raise fail(message_of(e)) from None

    return wrapper  # type: ignore[return-value]

