"""`lmforge tokenizer ...`: train, encode to shards, inspect."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmforge.cli.errors import fail, reports_errors
from lmforge.data.shards import text_files

app = typer.Typer(help="Train, apply and inspect byte-level BPE tokenizers.", no_args_is_help=True)
console = Console()
PATTERNS = {"gpt2": "GPT2_PATTERN", "cl100k": "CL100K_PATTERN", "llama3": "LLAMA3_PATTERN"}


def _files(option: list[Path] | None, extra: list[Path] | None) -> list[Path]:
    """`--input a b c` parses as --input a plus extra arguments; directories expand to their *.txt."""
    paths = [*(option or []), *(extra or [])]
    if not paths:
        raise fail("no input files (give --input FILE...)")
    return text_files(paths)


def _check_utf8(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            for n, line in enumerate(fh, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise fail(f"{f}: line {n} is not UTF-8 ({e.reason} at byte {e.start})") from None


def compression(tokenizer, text: str) -> float:
    """Bytes of UTF-8 text per token."""
    ids = tokenizer.encode_ordinary(text)
    return len(text.encode("utf-8")) / max(len(ids), 1)


@app.command()
@reports_errors
def train(
    out: Annotated[
        Path, typer.Option("--out", help="Output directory (tokenizer.json, tokenizer_config.json, .tiktoken).")
    ],
    input: Annotated[list[Path] | None, typer.Option("--input", help="Text files or directories of *.txt.")] = None,
    vocab_size: Annotated[int, typer.Option(help="Total vocabulary: 256 bytes + merges + special tokens.")] = 8192,
    special_token: Annotated[list[str] | None, typer.Option(help="A special token (repeatable).")] = None,
    pattern: Annotated[str, typer.Option(help="Pre-tokenizer: gpt2, cl100k, llama3, or a regex.")] = "gpt2",
    held_out: Annotated[Path | None, typer.Option(help="A file to report compression on.")] = None,
    files: Annotated[list[Path] | None, typer.Argument(help="More input files.", show_default=False)] = None,
) -> None:
    """Train a byte-level BPE tokenizer on text files."""
    import lmforge.tokenizer as tk
    from lmforge.tokenizer.formats import save_tokenizer

    inputs = _files(input, files)
    _check_utf8(inputs)
    specials = list(special_token or [])
    if vocab_size < 256 + len(specials):
        raise fail(f"--vocab-size {vocab_size} is smaller than 256 bytes + {len(specials)} special tokens")
    regex = getattr(tk, PATTERNS[pattern]) if pattern in PATTERNS else pattern
    start = time.perf_counter()
    tok = tk.train_bpe(files=inputs, vocab_size=vocab_size, pattern=regex, special_tokens=specials)
    save_tokenizer(tok, out)
    console.print(
        f"trained vocab {tok.vocab_size} on {len(inputs)} files in {time.perf_counter() - start:.1f} s -> {out}"
    )
    if held_out is not None:
        if not held_out.is_file():
            raise fail(f"{held_out}: no such file")
        ratio = compression(tok, held_out.read_bytes().decode("utf-8", "replace"))
        console.print(f"compression on {held_out.name}: {ratio:.2f} bytes/token")


@app.command()
@reports_errors
def encode(
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer directory or .tiktoken file.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for shards and manifest.json.")],
    input: Annotated[list[Path] | None, typer.Option("--input", help="Text files or directories of *.txt.")] = None,
    shard_tokens: Annotated[int, typer.Option(help="Tokens per shard.")] = 1 << 26,
    workers: Annotated[int | None, typer.Option(help="Processes (default: all cores).")] = None,
    files: Annotated[list[Path] | None, typer.Argument(help="More input files.", show_default=False)] = None,
) -> None:
    """Encode text files into memory-mappable numpy token shards with a JSON manifest."""
    from lmforge.data.shards import write_shards
    from lmforge.tokenizer.formats import load_tokenizer

    inputs = _files(input, files)
    tok = load_tokenizer(tokenizer)
    manifest = write_shards(tok, inputs, out, shard_tokens=shard_tokens, workers=workers)
    console.print(
        f"{manifest['total_tokens']:,} tokens in {len(manifest['shards'])} shards ({manifest['dtype']}) -> {out}"
    )


@app.command()
@reports_errors
def inspect(
    path: Annotated[Path, typer.Argument(help="Tokenizer directory or .tiktoken file.")],
    sample: Annotated[Path | None, typer.Option(help="Text file to measure compression on.")] = None,
    longest: Annotated[int, typer.Option(help="How many of the longest tokens to show.")] = 10,
) -> None:
    """Vocabulary size, special tokens, longest tokens and compression."""
    from lmforge.tokenizer.formats import load_tokenizer

    tok = load_tokenizer(path)
    table = Table(title=str(path), show_header=False)
    table.add_row("vocab size", f"{tok.vocab_size:,}")
    table.add_row("merges", f"{len(tok.merges):,}")
    table.add_row("special tokens", escape(", ".join(f"{s} ({i})" for s, i in tok.special_tokens.items()) or "none"))
    table.add_row("pattern", escape(tok.pattern))
    tokens = sorted(tok.vocab.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:longest]
    table.add_row("longest tokens", escape("\n".join(f"{i}: {b.decode('utf-8', 'replace')!r}" for i, b in tokens)))
    if sample is not None:
        if not sample.is_file():
            raise fail(f"{sample}: no such file")
        ratio = compression(tok, sample.read_bytes().decode("utf-8", "replace"))
        table.add_row("compression", f"{ratio:.2f} bytes/token on {sample.name}")
    console.print(table)
