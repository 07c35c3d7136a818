"""`lmforge generate` and `lmforge chat`: run a model from the command line.

Errors are reported by `errors.reports_errors` (cli/__init__.py wraps both commands): a bad flag value is named by
its flag (`--top-p`, `--seed`, `--dtype`), a bad model file by its path and key. In `chat`, a turn that does not
fit the model's context prints an `error:` line and is dropped; the conversation goes on (`/reset` empties it).

`--compile` keeps the compiled decoder in a user cache directory (`infer.compile_cache`: ~/.cache/lmforge/compiled,
or $LMFORGE_CACHE_DIR/compiled), so a later process loads it in seconds instead of tracing and compiling again;
LMFORGE_COMPILE_CACHE=0 turns that off (torch's own on-disk cache still applies). stderr says when it compiles,
when it reuses a saved compilation, and how long the first step took (not counted in the decode rate).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from lmforge.cli.errors import err, fail

DTYPES = ("float32", "bfloat16", "float16")

Model = Annotated[Path, typer.Argument(help="A Hugging Face model directory or a .gguf file.")]
Adapter = Annotated[
    Path | None,
    typer.Option(help="An adapter directory (PEFT's format, e.g. from `lmforge finetune`): LoRA is merged into the "
                 "model; a prompt or prefix leads every input."),
]
Quantized = Annotated[
    bool,
    typer.Option(help="Keep a GGUF file's Q8_0 / Q5_0 / Q4_0 / Q4_1 / Q4_K / Q6_K weights quantized (4-bit layers on "
                 "torch's int4 CPU kernel; with --compile about 2x float32's decode speed) instead of dequantizing "
                 "them to float32."),
]
MaxTokens = Annotated[int, typer.Option(help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")]
TopK = Annotated[int, typer.Option(help="Keep the k most likely tokens (0: off).")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling: keep the smallest set with this much probability.")]
MinP = Annotated[float, typer.Option(help="Drop tokens below min_p times the top probability.")]
RepetitionPenalty = Annotated[float, typer.Option(help="CTRL-style penalty on tokens already seen (1: off).")]
Seed = Annotated[int | None, typer.Option(help="Random seed in [0, 2**64), for reproducible sampling.")]
DType = Annotated[
    str | None,
    typer.Option(help="Weights' dtype: " + ", ".join(DTYPES) + " (default: a GGUF file or a quantized model as "
                 "stored, quantized; other models float32)."),
]
Stop = Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile/--no-compile",
        help="Decode with a static KV cache and torch.compile: 2-3x faster tokens after a one-time compilation "
        "(about a minute on a small CPU; saved in ~/.cache/lmforge/compiled, later runs load it in seconds).",
    ),
]


def load_model_for_cli(
    path: Path, dtype: str | None, adapter: Path | None = None, quantized: bool = False
) -> tuple[Any, Any]:
    """The model and its tokenizer (a model without one is refused): in `dtype` (one of DTYPES; None: a GGUF file or
    a `lmforge quantize` directory as stored, quantized, and any other model in float32), with `adapter` (LoRA
    merged into a float model's weights, kept unmerged on a quantized one); `quantized` keeps a GGUF file's
    quantized weights whatever `dtype`. The 4-bit layers of a quantized model run on the int4 kernel."""
    import torch

    import lmforge
    from lmforge.finetune.lora import merge_and_unload
    from lmforge.io.hf import quant_method
    from lmforge.quant.modules import quantized_layers
    from lmforge.quant.weight_only import use_kernel

    if dtype is not None and dtype not in DTYPES:
        raise fail(f"--dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    stored_quantized = path.suffix == ".gguf" or quant_method(path) is not None  # lmforge's, GPTQ's, AWQ's
    if quantized and not stored_quantized:
        raise fail(f"--quantized: {path} is not a GGUF file (it keeps a GGUF file's quantized weights; a model "
                   "`lmforge quantize` wrote runs quantized without it)")  # fmt: skip
    options = {"quantized": True} if quantized else {}
    torch_dtype = getattr(torch, dtype) if dtype is not None else None if stored_quantized else torch.float32
    model, tokenizer = lmforge.load(path, dtype=torch_dtype, adapter=adapter, **options)
    if tokenizer is None:
        raise fail(f"{path}: has no tokenizer")
    if use_kernel(model) or quantized_layers(model):  # a quantized model: its 4-bit layers on the int4 kernel
        return model, tokenizer  # an adapter stays unmerged (merging would round it into the codes)
    return merge_and_unload(model), tokenizer


def _params(**values: Any) -> Any:
    """SamplingParams from the flags that were given (its errors name the flag, see cli/errors.py)."""
    from lmforge.infer.sampling import SamplingParams

    return SamplingParams(**{k: v for k, v in values.items() if v is not None})


def prompt_tuned(model: Any) -> bool:
    """Whether `model` carries a prompt or prefix adapter (generated with `generate_tuned`, not `generate`)."""
    from lmforge.finetune.prompt_tuning import PromptEmbedding

    return isinstance(getattr(model, "embed", None), PromptEmbedding) or hasattr(model, "prefix_encoder")


def _stream(model: Any, tokenizer: Any, prompt: str | list[int], params: Any, compile: bool) -> tuple[str, Any]:
    """Print tokens as they come; return the text and the final stats."""
    from lmforge.finetune.prompt_tuning import generate_tuned
    from lmforge.infer.generate import generate

    if prompt_tuned(model) and compile:
        raise fail("--compile: a prompt- or prefix-tuned model (--adapter) decodes eagerly; drop --compile")
    pieces, stats = [], None
    events = generate_tuned(model, tokenizer, prompt, params) if prompt_tuned(model) else None
    with _compile_store(compile):
        for event in events or generate(model, tokenizer, prompt, params, compile=compile):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            pieces.append(event.text)
            stats = event.stats or stats
    return "".join(pieces), stats


def _compile_store(compile: bool) -> contextlib.AbstractContextManager:
    """With `--compile`: say what the first step does, and keep compiled decoders on disk (unless
    LMFORGE_COMPILE_CACHE=0); the store's lines (reused / compiling and saving) go to stderr."""
    from lmforge.infer import compile_cache

    if not compile:
        return contextlib.nullcontext()
    if os.environ.get("LMFORGE_COMPILE_CACHE", "1") == "0":
        err.print("[dim]--compile: the first step compiles the decoder (about a minute in a new process on a small "
                  "CPU; torch's on-disk cache shortens later runs)[/dim]")  # fmt: skip
        return contextlib.nullcontext()
    directory = compile_cache.default_directory()
    err.print(f"[dim]--compile: the first step compiles the decoder (about a minute on a small CPU) or loads the "
              f"compilation an earlier run saved in {escape(str(directory))} (seconds)[/dim]")  # fmt: skip
    return compile_cache.persist(directory, report=lambda line: err.print(f"[dim]--compile: {escape(line)}[/dim]"))


def _report(stats: Any) -> None:
    if stats is not None:
        err.print(
            f"[dim]prompt {stats.prompt_tokens} tokens, {stats.prefill_tokens_per_s:.1f} tok/s prefill; "
            f"generated {stats.generated_tokens} tokens, {stats.decode_tokens_per_s:.1f} tok/s decode"
            + (f"; first step {stats.warmup_s:.1f} s (compilation, not in the rate)" if stats.warmup_s else "")
            + "[/dim]"
        )


def generate_command(
    model: Model,
    prompt: Annotated[str, typer.Option(help="The text to continue.")],
    max_tokens: MaxTokens = 128,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    stop: Stop = None,
    dtype: DType = None,
    compile: Compile = False,
    adapter: Adapter = None,
    quantized: Quantized = False,
) -> None:
    """Continue a prompt, streaming to stdout; speeds go to stderr."""
    params = _params(
        max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed, stop=stop or [],
    )  # fmt: skip
    m, tok = load_model_for_cli(model, dtype, adapter, quantized)
    _, stats = _stream(m, tok, prompt, params, compile)
    sys.stdout.write("\n")
    _report(stats)


def chat_command(
    model: Model,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    max_tokens: MaxTokens = 512,
    temperature: Temperature = 0.7,
    top_p: TopP = 0.9,
    seed: Seed = None,
    dtype: DType = None,
    compile: Compile = False,
    adapter: Adapter = None,
    quantized: Quantized = False,
) -> None:
    """Chat with a model (its chat template, history kept). Type /reset to start over, /exit to quit."""
    from lmforge.infer.sampling import GenerationInputError

    params = _params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    m, tok = load_model_for_cli(model, dtype, adapter, quantized)
    if not getattr(tok, "chat_template", None):
        raise fail(f"{model}: the tokenizer has no chat template")
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    err.print("[dim]/reset clears the conversation, /exit quits[/dim]")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = list(start)
            err.print("[dim](conversation reset)[/dim]")
            continue
        history.append({"role": "user", "content": line})
        prompt = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        try:
            reply, stats = _stream(m, tok, prompt, params, compile)
        except GenerationInputError as e:  # the conversation outgrew the context: drop this turn, go on
            fail(f"the conversation: {e.rule}; this turn is dropped (/reset starts over)")
            history.pop()
            continue
        sys.stdout.write("\n")
        _report(stats)
        history.append({"role": "assistant", "content": reply.strip()})
