"""`AsyncLLM`: streaming over one `LLM`, for a server.

One background thread steps the engine for every request. Requests and aborts reach it through a command queue
(run between steps, so the engine is only ever touched by that thread); outputs go back to the event loop that
asked, through an `asyncio.Queue` per request. `generate` is an async generator that yields the request's
cumulative outputs as its tokens arrive; the last has `finished`. Stopping the iteration early (a client that went
away) or `abort` ends the request and frees its blocks; `shutdown` aborts whatever is in flight and stops the
thread. A failed step (NaN logits) aborts every request in flight and raises the error in each generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from lmforge.engine.engine import Prompt
from lmforge.engine.llm import LLM
from lmforge.engine.params import EngineStats, RequestOutput
from lmforge.infer import sampling
from lmforge.infer.sampling import GenerationInputError


class AsyncLLM:
    """Streaming over one `LLM`: a background thread steps the engine for every request (see the module
    docstring). Requests and aborts reach the thread through a queue; outputs come back on the asking event loop."""

    def __init__(self, llm: LLM) -> None:
        self.llm, self.engine = llm, llm.engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # (callable,) run on the engine thread
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> AsyncLLM:
        return cls(LLM(path, **kwargs))

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def generate(
        self, prompt: Prompt, params: sampling.SamplingParams | None, request_id: str, adapter: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative outputs as tokens arrive; the last has `finished`. A bad input raises
        before anything is scheduled. Leaving the loop early aborts the request. `adapter`: one of the engine's
        LoRA adapters (`Engine.adapters`; None: the base model)."""
        if request_id in self._streams:
            raise GenerationInputError("request_id", f"{request_id!r} is already running")
        request = self.engine.make_request(request_id, prompt, params, adapter)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._submit(lambda: self.engine.add(request))
        finished = False
        try:
            while not finished:
                out = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._submit(lambda: self._abort(request_id))

    async def abort(self, request_id: str) -> None:
        """End the request: its generator yields a last output with finish_reason "abort"; its blocks are freed."""
        self._submit(lambda: self._abort(request_id))

    def shutdown(self) -> None:
        """Abort every request in flight (their generators end with "abort") and stop the engine thread."""
        for request_id in list(self._streams):
            self._submit(lambda r=request_id: self._abort(r))
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- the engine thread --------------------------------------------------------------------------------------

    def _submit(self, command) -> None:
        self._commands.put(command)
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            while not self._commands.empty():
                self._commands.get()()
            if self._stop:
                return
            if not self.engine.has_unfinished():
                self._wake.wait()
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # the model failed: every request in flight gets the error
                for request_id in list(self.engine.requests):
                    self.engine.abort(request_id)
                    self._deliver(request_id, error, last=True)
                continue
            for out in outputs:
                self._deliver(out.request_id, out, last=out.finished)

    def _abort(self, request_id: str) -> None:
        out = self.engine.abort(request_id)
        if out is None:  # it had finished already
            self._streams.pop(request_id, None)
        else:
            self._deliver(request_id, out, last=True)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException, last: bool) -> None:
        target = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if target is None:
            return
        loop, stream = target
        with contextlib.suppress(RuntimeError):  # the asking loop is closed: nobody listens
            loop.call_soon_threadsafe(stream.put_nowait, item)
