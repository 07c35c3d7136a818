"""`lmforge serve`: the engine behind an OpenAI-compatible HTTP server (engine/server.py), run by uvicorn.

Binds 127.0.0.1 unless told otherwise; a server reachable from other machines without `--api-key` is allowed but
warned about. The key may come from $LMFORGE_API_KEY instead of the command line (where `ps` shows it).

Shutdown (SIGINT/SIGTERM, uvicorn's handlers): uvicorn stops accepting connections and waits up to
`SHUTDOWN_GRACE_S` for the requests in flight to finish, then cancels the rest (each cancelled stream aborts its
engine request); the app's shutdown then stops the engine (`AsyncLLM.shutdown`). A second Ctrl-C quits at once.
After a SIGTERM the process ends as that signal's default says (uvicorn re-raises it once the shutdown is done:
status 143 in a shell, a clean stop to service managers); after SIGINT the status is 0.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from lmforge.cli.errors import err, fail
from lmforge.cli.generate import DType, Model, Quantized, load_model_for_cli

SHUTDOWN_GRACE_S = 10

Adapters = Annotated[
    list[str] | None,
    typer.Option("--adapter", help="An adapter directory (PEFT's format, e.g. from `lmforge finetune`). One DIR: "
                 "LoRA is merged into the model, a prompt or prefix leads every input. NAME=DIR (repeatable): each "
                 "LoRA adapter is served beside the base model under NAME, chosen per request by its `model` field."),
]


def serve_command(
    model: Model,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 serves every interface.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="LMFORGE_API_KEY", help="Require `Authorization: Bearer KEY` on every /v1 route."),
    ] = None,
    max_num_seqs: Annotated[int, typer.Option(min=1, help="Most sequences decoded together (and the largest n).")] = 32,
    max_model_len: Annotated[
        int | None, typer.Option(min=1, help="Context length: prompt + answer (default: the model's).")
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="The model's name in the API (default: the model's file or directory name).")
    ] = None,
    kv_cache_gib: Annotated[
        float, typer.Option(min=1e-3, help="Memory for the KV-cache pool in GiB (at most max-num-seqs full contexts).")
    ] = 2.0,
    swap_space_gib: Annotated[
        float, typer.Option(min=0, help="Host memory (GiB) preempted requests swap their KV blocks to (0: recompute).")
    ] = 4.0,
    dtype: DType = None,
    compile: Annotated[
        bool, typer.Option(help="Compile the decode step: one graph per batch-size bucket (a slower start).")
    ] = False,
    num_speculative_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Speculative decoding: up to K draft tokens a step (prompt lookup by default)."),
    ] = None,
    speculative_model: Annotated[
        Path | None, typer.Option(help="A draft model (same tokenizer) for speculative decoding, instead of lookup.")
    ] = None,
    adapter: Adapters = None,
    quantized: Quantized = False,
) -> None:
    """Serve a model over the OpenAI HTTP API (/v1/chat/completions, /v1/completions, /v1/models), with /health,
    /metrics (Prometheus) and a chat page at /."""
    import uvicorn

    from lmforge.engine import LLM, AsyncLLM
    from lmforge.engine.server import create_app

    name = served_model_name or (model.stem if model.suffix == ".gguf" else model.name)
    served = _served_adapters(adapter or [], name)
    merged = adapter[0] if adapter and not served else None  # one plain DIR: merged (or a prompt / prefix)
    module, tokenizer = load_model_for_cli(model, dtype, None if merged is None else Path(merged), quantized)
    if served:
        _stack(module, served)
    speculative = None
    if num_speculative_tokens is not None or speculative_model is not None:
        speculative = {"num_speculative_tokens": num_speculative_tokens or 4, "model": speculative_model}
    llm = LLM(module, tokenizer, max_num_seqs=max_num_seqs, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
              swap_space_gib=swap_space_gib, compile=compile, speculative_config=speculative)  # fmt: skip
    engine = AsyncLLM(llm)
    room = llm.max_model_len - len(llm.engine.lead)  # a prompt or prefix takes its places of the context
    app = create_app(engine, name, tokenizer=llm.tokenizer, max_model_len=room, api_key=api_key, max_n=max_num_seqs,
                     adapters=llm.adapters)  # fmt: skip
    if api_key is None and not _is_loopback(host):
        err.print(f"[yellow]warning:[/yellow] serving on {host} without --api-key: anyone who can reach it may use it")
    err.print(f"[dim]serving {name} at http://{host}:{port} (OpenAI API under /v1, chat page at /)[/dim]")
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=SHUTDOWN_GRACE_S, log_level="info")


def _served_adapters(values: list[str], model_name: str) -> dict[str, Path]:
    """The adapters to serve side by side, by API name, from the --adapter values (NAME=DIR, or DIR: named after
    its directory); none when a single DIR is given (it is merged)."""
    if len(values) == 1 and "=" not in values[0]:
        return {}
    served: dict[str, Path] = {}
    for value in values:
        name, _, directory = value.partition("=") if "=" in value else (Path(value).name, "", value)
        if not name or not directory:
            raise fail(f"--adapter {value!r}: expected NAME=DIR or DIR")
        if name in served or name == model_name:
            raise fail(f"--adapter {value!r}: the name {name!r} is taken (the model or another adapter); use NAME=DIR")
        if not Path(directory).is_dir():
            raise fail(f"--adapter {value!r}: {directory} is not a directory")
        served[name] = Path(directory)
    return served


def _stack(model, served: dict[str, Path]) -> None:
    """Add each LoRA adapter of `served` to `model` and stack them to serve side by side (finetune.multi_lora)."""
    from lmforge.finetune.adapter_files import load_adapter
    from lmforge.finetune.multi_lora import stack_adapters
    from lmforge.io.peft import read_peft

    for i, (name, directory) in enumerate(served.items()):
        kind = read_peft(directory)[0].get("peft_type")
        if kind != "LORA":
            raise fail(f"--adapter {name}={directory}: a {kind} adapter cannot be served beside others (only LoRA "
                       "adapters can); serve it alone with --adapter DIR")  # fmt: skip
        load_adapter(model, directory, f"adapter_{i}")
    stack_adapters(model, list(served))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
