"""`lmforge eval ...`: evaluate a model, one subcommand per measure.

    ppl   perplexity of a text file, as llama.cpp's `llama-perplexity` computes it (eval/perplexity.py)

Errors come before any forward pass, each naming its file or flag: a missing or non-UTF-8 `--data` file, `--ctx`
over the model's context (max_seq_len), a text of fewer than 2 × `--ctx` tokens. Progress goes to stderr; stdout
holds the result only (`--json`: one JSON object).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Annotated

import typer

from lmforge.cli.errors import fail, reports_errors
from lmforge.cli.generate import DType, Model, Quantized, load_model_for_cli

app = typer.Typer(help="Evaluate a model: `ppl` (perplexity as llama.cpp computes it).", no_args_is_help=True)

Data = Annotated[Path, typer.Option(help="The text file to score (e.g. wikitext-2's wiki.test.raw).")]
Ctx = Annotated[
    int, typer.Option("--ctx", min=3, help="Tokens per chunk (llama.cpp's -c); the second half of each is scored.")
]
Chunks = Annotated[int | None, typer.Option(min=1, help="Score at most this many chunks (default: all).")]
Batch = Annotated[int, typer.Option(min=1, help="Chunks per forward pass.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")]


def read_text(path: Path) -> str:
    """The file's text, bytes as they are (no newline translation, as llama.cpp reads it); not UTF-8 fails."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


@app.command("ppl")
@reports_errors
def ppl_command(
    model: Model,
    data: Data,
    ctx: Ctx = 512,
    chunks: Chunks = None,
    batch: Batch = 1,
    dtype: DType = None,
    quantized: Quantized = False,
    json_output: Json = False,
) -> None:
    """Perplexity of MODEL on a text file: chunks of --ctx tokens, each scored on its second half (llama.cpp's
    rule; prints PPL and llama.cpp's ± standard error)."""
    from lmforge.eval.perplexity import check_settings, chunk_bos, perplexity, tokenize, too_short

    text = read_text(data)
    m, tok = load_model_for_cli(model, dtype, quantized=quantized)
    check_settings(m, ctx, batch, chunks)
    ids = tokenize(tok, text)
    if (reason := too_short(len(ids), ctx)) is not None:
        raise fail(f"{data}: tokenizes to {reason} (--ctx={ctx})")
    result = perplexity(m, ids, n_ctx=ctx, bos_id=chunk_bos(tok), batch_size=batch, max_chunks=chunks, progress=True)
    if json_output:
        fields = dataclasses.asdict(result)  # a NaN (one scored token: no standard error) as null, strict JSON
        typer.echo(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in fields.items()}))
    else:
        typer.echo(f"PPL = {result.ppl:.4f} +/- {result.stderr:.5f} ({result.tokens_scored} tokens scored in "
                   f"{result.chunks} chunks of {result.n_ctx})")  # fmt: skip
