"""`lmforge eval ...`: evaluate a model, one subcommand per measure.

    ppl    perplexity of a text file, as llama.cpp's `llama-perplexity` computes it, and bits per byte of the
           scored tokens (eval/perplexity.py)
    tasks  multiple-choice and generation tasks scored as lm-evaluation-harness scores them (eval/tasks.py): the
           shipped ones by name (--tasks) or a task spec file (--task-file, eval/taskspec.py)

Errors come before any forward pass, each naming its file or flag: a missing or non-UTF-8 `--data` file, `--ctx`
over the model's context (max_seq_len), a text of fewer than 2 × `--ctx` tokens; an unknown task name (the known
ones listed), a task spec or JSONL row that is wrong (its file and key or line). Progress goes to stderr; stdout
holds the result only (`ppl --json`: one JSON object; `tasks`: a table, and `--json FILE` writes the results).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lmforge.cli.errors import fail, reports_errors
from lmforge.cli.generate import DType, Model, Quantized, load_model_for_cli

if TYPE_CHECKING:
    from lmforge.eval.tasks import TaskResult
    from lmforge.eval.taskspec import TaskSpec

app = typer.Typer(
    help="Evaluate a model: `ppl` (perplexity as llama.cpp computes it, and bits per byte), `tasks` (multiple-choice "
    "and generation tasks scored as lm-evaluation-harness scores them).",
    no_args_is_help=True,
)

Data = Annotated[Path, typer.Option(help="The text file to score (e.g. wikitext-2's wiki.test.raw).")]
Ctx = Annotated[
    int, typer.Option("--ctx", min=3, help="Tokens per chunk (llama.cpp's -c); the second half of each is scored.")
]
Chunks = Annotated[int | None, typer.Option(min=1, help="Score at most this many chunks (default: all).")]
Batch = Annotated[int, typer.Option(min=1, help="Chunks per forward pass.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")]
Tasks = Annotated[str | None, typer.Option(help="Shipped tasks to run, comma-separated (default: all of them).")]
TaskFile = Annotated[
    list[Path] | None, typer.Option(help="A task spec file (YAML or JSON, lm-eval's task keys; repeatable).")
]
NumFewshot = Annotated[int | None, typer.Option(min=0, help="Few-shot examples per prompt (default: each task's).")]
Limit = Annotated[int | None, typer.Option(min=1, help="Evaluate only the first N docs of each task.")]
TaskBatch = Annotated[int, typer.Option(min=1, help="Requests (or generations) per forward pass.")]
Seed = Annotated[int, typer.Option(help="Seed of the few-shot draws (lm-eval's fewshot_random_seed).")]
JsonFile = Annotated[Path | None, typer.Option("--json", help="Write the results (and per-doc samples) here.")]


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
    from lmforge.eval.perplexity import check_settings, chunk_bos, perplexity, tokenize, too_short, with_bits_per_byte

    text = read_text(data)
    m, tok = load_model_for_cli(model, dtype, quantized=quantized)
    check_settings(m, ctx, batch, chunks)
    ids = tokenize(tok, text)
    if (reason := too_short(len(ids), ctx)) is not None:
        raise fail(f"{data}: tokenizes to {reason} (--ctx={ctx})")
    result = perplexity(m, ids, n_ctx=ctx, bos_id=chunk_bos(tok), batch_size=batch, max_chunks=chunks, progress=True)
    result = with_bits_per_byte(result, tok, ids, chunks)
    if json_output:
        fields = dataclasses.asdict(result)  # a NaN (one scored token: no standard error) as null, strict JSON
        typer.echo(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in fields.items()}))
    else:
        typer.echo(f"PPL = {result.ppl:.4f} +/- {result.stderr:.5f} ({result.tokens_scored} tokens scored in "
                   f"{result.chunks} chunks of {result.n_ctx})")  # fmt: skip
        typer.echo(f"bits/byte = {result.bits_per_byte:.4f} ({result.bytes_scored} bytes in the scored tokens)")


def task_specs(tasks: str | None, task_files: list[Path] | None) -> list[TaskSpec]:
    """The specs to run: the --task-file specs, and the named shipped tasks (all of them when neither is given)."""
    from lmforge.eval.taskspec import SHIPPED, load_spec, shipped_spec

    names = [n.strip() for n in tasks.split(",") if n.strip()] if tasks is not None else []
    if tasks is None and not task_files:
        names = list(SHIPPED)
    elif tasks is not None and not names:
        raise fail(f"--tasks={tasks!r}: no task names (the shipped tasks are: {', '.join(SHIPPED)})")
    return [shipped_spec(name) for name in names] + [load_spec(path) for path in task_files or []]


def results_table(results: list[TaskResult]) -> str:
    """One line per task and metric: task, metric, value, stderr, n (as lm-eval's table)."""
    rows = [("task", "shots", "metric", "value", "stderr", "n")]
    for r in results:
        for name, m in r.metrics.items():
            stderr = "N/A" if m.stderr is None else f"{m.stderr:.4f}"
            rows.append((r.task, str(r.num_fewshot), name, f"{m.value:.4f}", stderr, str(m.n)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


@app.command("tasks")
@reports_errors
def tasks_command(
    model: Model,
    tasks: Tasks = None,
    task_file: TaskFile = None,
    num_fewshot: NumFewshot = None,
    limit: Limit = None,
    batch: TaskBatch = 1,
    seed: Seed = 1234,
    dtype: DType = None,
    quantized: Quantized = False,
    json_file: JsonFile = None,
) -> None:
    """Score MODEL on tasks: multiple choice by log-likelihood (acc, acc_norm), generation by exact match of the
    extracted answer; prints a table (task, metric, value, stderr, n)."""
    from lmforge.eval.tasks import evaluate_task
    from lmforge.utils.atomic import atomic_write

    specs = task_specs(tasks, task_file)  # every spec and its data checked before the model loads
    m, tok = load_model_for_cli(model, dtype, quantized=quantized)
    results = []
    for spec in specs:
        typer.echo(f"{spec.name}: {min(len(spec.docs), limit or len(spec.docs))} docs", err=True)
        results.append(evaluate_task(m, tok, spec, num_fewshot=num_fewshot, limit=limit, batch_size=batch,
                                     seed=seed, progress=True))  # fmt: skip
    typer.echo(results_table(results))
    if json_file is not None:
        payload = {"model": str(model), "seed": seed, "limit": limit,
                   "results": {r.task: {"num_fewshot": r.num_fewshot,
                                        "metrics": {k: dataclasses.asdict(v) for k, v in r.metrics.items()},
                                        "samples": r.samples} for r in results}}  # fmt: skip
        atomic_write(json_file, json.dumps(payload, indent=1) + "\n")
