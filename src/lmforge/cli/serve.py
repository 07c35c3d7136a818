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
from lmforge.cli.generate import Adapter, DType, Model, load_model_for_cli, prompt_tuned

SHUTDOWN_GRACE_S = 10


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
    dtype: DType = "float32",
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
    adapter: Adapter = None,
) -> None:
    """Serve a model over the OpenAI HTTP API (/v1/chat/completions, /v1/completions, /v1/models), with /health,
    /metrics (Prometheus) and a chat page at /."""
    import uvicorn

    from lmforge.engine import LLM, AsyncLLM
    from lmforge.engine.server import create_app

    name = served_model_name or (model.stem if model.suffix == ".gguf" else model.name)
    module, tokenizer = load_model_for_cli(model, dtype, adapter)
    if prompt_tuned(module):
        raise fail(f"--adapter {adapter}: the engine does not serve prompt- or prefix-tuned models yet (LoRA "
                   "adapters it does); use lmforge generate / chat with it")  # fmt: skip
    speculative = None
    if num_speculative_tokens is not None or speculative_model is not None:
        speculative = {"num_speculative_tokens": num_speculative_tokens or 4, "model": speculative_model}
    llm = LLM(module, tokenizer, max_num_seqs=max_num_seqs, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
              swap_space_gib=swap_space_gib, compile=compile, speculative_config=speculative)  # fmt: skip
    engine = AsyncLLM(llm)
    app = create_app(engine, name, tokenizer=llm.tokenizer, max_model_len=llm.max_model_len, api_key=api_key,
                     max_n=max_num_seqs)  # fmt: skip
    if api_key is None and not _is_loopback(host):
        err.print(f"[yellow]warning:[/yellow] serving on {host} without --api-key: anyone who can reach it may use it")
    err.print(f"[dim]serving {name} at http://{host}:{port} (OpenAI API under /v1, chat page at /)[/dim]")
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=SHUTDOWN_GRACE_S, log_level="info")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
