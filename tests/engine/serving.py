"""Serving an app in tests: uvicorn on a free port in a thread (`serving`), the app over a fake engine (`over`)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fake_engine import FakeEngine

from lmforge.engine.server import create_app

MODEL = "tiny"  # the served model's name


@contextmanager
def serving(app, **config) -> Iterator[str]:
    """`app` served by uvicorn (`config`: more uvicorn.Config options) on a free port in a thread; yields its base
    URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def over(engine: FakeEngine, **options):
    """The app over a fake engine."""
    return create_app(engine, MODEL, tokenizer=engine.tokenizer, max_model_len=engine.max_model_len, **options)
