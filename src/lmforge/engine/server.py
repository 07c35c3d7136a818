"""`create_app`: the OpenAI-compatible HTTP server (FastAPI) over an `AsyncLLM`, with Prometheus metrics.

Routes:

    POST /v1/chat/completions   messages rendered by the tokenizer's chat template (add_generation_prompt=True)
    POST /v1/completions        a prompt (text or token ids) or a list of them
    GET  /v1/models             the served model, and each LoRA adapter served beside it
    GET  /health                200 while the server runs
    GET  /metrics               Prometheus text (no key needed, as vLLM)
    GET  /                      the chat page (static/chat.html: streams with fetch, keeps the conversation)

Both generation routes answer in one JSON body, or with ``"stream": true`` as server-sent events: one
``data: {chunk}\\n\\n`` per choice and engine step that produced something, then ``data: [DONE]\\n\\n``.
Each HTTP request becomes one engine request per prompt (`Generation`), started together; the first output of
each is awaited before the response starts, so a prompt the engine refuses (too long for the context, ...) is a
400 in streaming mode too. A client that goes away mid-stream cancels the response task (Starlette does this on
http.disconnect); the cancellation ends in `Generation.close`, which aborts every unfinished engine request
(shielded from the cancellation), so the engine frees its blocks.

With ``"use_beam_search": true`` (vLLM's extension, `openai_protocol`), each prompt is a beam search of width `n`
over the running engine (`engine.async_beam_search`: every step is ordinary engine requests, batched with the
others); the choices are its `n` hypotheses, best first (index i * n + j: prompt i's j-th best). The searches run
to their end before the answer starts (a client that leaves first cancels them, which aborts their step
requests); with ``"stream": true`` the answer is one chunk per hypothesis, its whole text at once, then the usage
chunk if asked and [DONE]: a hypothesis is known only once the search stops.

Adapters (`adapters`): an engine whose model stacks several LoRA adapters (`finetune.multi_lora`) serves each
under its own name beside the base model's; a request's `model` picks which one its tokens come from (vLLM's LoRA
serving), and requests of every adapter batch together.

Errors: every refusal is a 400 with the OpenAI body {"error": {message, type: "invalid_request_error", param,
code}}: malformed JSON and wrong types (pydantic, strict), an unknown model, out-of-range values (the engine's
`SamplingParams` and `GenerationInputError`), `n` above `max_n`. With `api_key`, every /v1 route needs
``Authorization: Bearer <key>`` (401 otherwise; compared in constant time). An unexpected error is a 500 with the
same body and no traceback (the traceback goes to the server's log).

The OpenAPI schema (/openapi.json, /docs) documents what the server answers, so a client generator or a fuzzer
(tests/engine/test_server_schema.py runs schemathesis on it) can hold it to it: each request model, `model` as one of
the served models, the JSON answer and, for "stream": true, the SSE events (the chunk model as JSON, then
[DONE]), the 400 and (with a key) 401 error body, the bearer security scheme on /v1; no FastAPI 422 (never sent).
A wrong method is a 405 with its Allow header, in the same error body.

Metrics (per app, in its own registry): gauges read from `engine.stats()` at each scrape (running and waiting
requests, sequences swapped to host memory, KV blocks used and free, prefix-cache hit rate), counters of prompt and
generated tokens (their `rate()` is tokens/s), of speculative draft tokens proposed and accepted (their ratio: the
acceptance rate) and of finished requests by finish reason, and histograms of time to first token, of the time
between two streamed updates of a request (inter-token latency: one engine step yields one token per output), and
of the end-to-end request latency. A beam search's answer comes whole, so its first token is its last: it counts
in time to first token and end-to-end latency when it is done, never in inter-token latency (its step requests
are the server's own, not counted).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from lmforge.engine import openai_protocol as api
from lmforge.engine.async_beam_search import beam_search_prompts
from lmforge.engine.beam_search import BeamSearchParams
from lmforge.engine.params import SamplingParams
from lmforge.infer.sampling import GenerationInputError
from lmforge.utils.errors import LmforgeError

log = logging.getLogger("lmforge.server")
CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI completions default; chat defaults to the room left in the context
BEARER = HTTPBearer(auto_error=False)  # a missing or non-bearer Authorization header is None: the 401 is ours
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The app's Prometheus registry: engine gauges and token counters read at scrape time, latency histograms."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.registry = engine, CollectorRegistry()
        self.registry.register(self)
        self.ttft = self._histogram("time_to_first_token_seconds", "Time from arrival to the first generated token.")
        self.itl = self._histogram("inter_token_latency_seconds", "Time between two streamed updates of a request.")
        self.e2e = self._histogram("e2e_request_latency_seconds", "Time from arrival to the last token.")
        self.finished = Counter("lmforge_request_success", "Finished engine requests, by finish reason.",
                                ["finished_reason"], registry=self.registry)  # fmt: skip

    def _histogram(self, name: str, doc: str) -> Histogram:
        return Histogram(f"lmforge_{name}", doc, buckets=LATENCY_BUCKETS, registry=self.registry)

    def collect(self):
        """The engine's own numbers (a prometheus_client custom collector)."""
        stats = self.engine.stats()
        for name, doc, value in (
            ("num_requests_running", "Requests being decoded or prefilled.", stats.running),
            ("num_requests_waiting", "Requests waiting to be scheduled.", stats.waiting),
            ("num_requests_swapped", "Sequences preempted to host memory (swap space).", stats.swapped),
            ("kv_cache_blocks_used", "KV-cache blocks in use.", stats.blocks_used),
            ("kv_cache_blocks_free", "KV-cache blocks free.", stats.blocks_free),
            ("prefix_cache_hit_rate", "Share of prompt tokens found in the prefix cache.", stats.prefix_cache_hit_rate),
        ):
            yield GaugeMetricFamily(f"lmforge_{name}", doc, value=value)
        yield CounterMetricFamily("lmforge_prompt_tokens", "Prompt tokens processed.", value=stats.prompt_tokens)
        yield CounterMetricFamily("lmforge_generation_tokens", "Tokens generated.", value=stats.generated_tokens)
        yield CounterMetricFamily("lmforge_spec_decode_draft_tokens", "Draft tokens proposed (speculative decoding).",
                                  value=stats.draft_tokens)  # fmt: skip
        yield CounterMetricFamily("lmforge_spec_decode_accepted_tokens", "Draft tokens the target accepted.",
                                  value=stats.accepted_draft_tokens)  # fmt: skip

    def describe(self):
        return []  # computed at scrape time: no fixed description (registering must not call the engine)

    def finish(self, output: Any, seconds: float) -> None:
        """A finished request's end-to-end latency and its outputs' finish reasons."""
        self.e2e.observe(seconds)
        for o in output.outputs:
            self.finished.labels(o.finish_reason or "unknown").inc()


class Generation:
    """The engine requests behind one HTTP request (one per prompt), started together, their outputs merged.

    `start` submits every prompt and waits for each one's first output (or error); iterating yields
    (prompt index, cumulative RequestOutput) as they arrive; `close` aborts what is unfinished."""

    def __init__(
        self, engine: Any, prompts: list[api.Prompt], params: Any, metrics: Metrics, adapter: str | None = None
    ) -> None:
        base = api.new_id("req")
        self.engine, self.metrics, self.params, self.adapter = engine, metrics, params, adapter
        self.ids = [f"{base}-{i}" for i in range(len(prompts))]
        self.prompts, self.unfinished = prompts, set(range(len(prompts)))
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pumps: list[asyncio.Task] = []
        self.arrival = time.perf_counter()
        self.last: dict[int, float] = {}  # per prompt: when its last new tokens came
        self.tokens: dict[int, int] = {}  # per prompt: tokens generated so far, over its outputs
        self.buffered: list[tuple[int, Any]] = []

    async def _pump(self, index: int) -> None:
        try:
            routed = {} if self.adapter is None else {"adapter": self.adapter}
            async for output in self.engine.generate(self.prompts[index], self.params, self.ids[index], **routed):
                await self.queue.put((index, output))
        except Exception as e:  # handed to the consumer, which raises it
            await self.queue.put((index, e))
        else:
            await self.queue.put((index, None))

    async def _next(self) -> tuple[int, Any]:
        index, item = await self.queue.get()
        if isinstance(item, Exception):
            raise item
        if item is None or item.finished:
            self.unfinished.discard(index)
        if item is not None:
            self._observe(index, item)
        return index, item

    def _observe(self, index: int, output: Any) -> None:
        now, tokens = time.perf_counter(), sum(len(o.token_ids) for o in output.outputs)
        if tokens > self.tokens.get(index, 0):
            if index in self.last:
                self.metrics.itl.observe(now - self.last[index])
            else:
                self.metrics.ttft.observe(now - self.arrival)
            self.last[index], self.tokens[index] = now, tokens
        if output.finished:
            self.metrics.finish(output, now - self.arrival)

    async def start(self) -> None:
        """Submit every prompt; return once each has produced its first output. A refused prompt raises (after the
        others are aborted)."""
        self.pumps = [asyncio.create_task(self._pump(i)) for i in range(len(self.prompts))]
        seen: set[int] = set()
        try:
            while len(seen) < len(self.prompts):
                index, item = await self._next()
                seen.add(index)
                self.buffered.append((index, item))
        except BaseException:
            await self.close()
            raise

    async def __aiter__(self) -> AsyncIterator[tuple[int, Any]]:
        """(prompt index, cumulative output) until every prompt has finished."""
        for index, item in self.buffered:
            if item is not None:
                yield index, item
        while self.unfinished:
            index, item = await self._next()
            if item is not None:
                yield index, item

    async def close(self) -> None:
        """Abort the unfinished engine requests and stop the pumps (shielded: runs while being cancelled; once)."""
        with anyio.CancelScope(shield=True):
            for index in sorted(self.unfinished):
                await self.engine.abort(self.ids[index])
                self.metrics.finished.labels("abort").inc(self.params.n)
            self.unfinished.clear()
            for pump in self.pumps:
                pump.cancel()
            await asyncio.gather(*self.pumps, return_exceptions=True)


class Finished:
    """Final outputs (a beam search's, one per prompt) in `Generation`'s shape, for `_respond`: iterating yields
    (prompt index, output); nothing is left to abort."""

    def __init__(self, outputs: list[Any]) -> None:
        self.outputs = outputs

    async def __aiter__(self) -> AsyncIterator[tuple[int, Any]]:
        for index, output in enumerate(self.outputs):
            yield index, output

    async def close(self) -> None:
        pass


def create_app(
    engine: Any, model_name: str, *, tokenizer: Any, max_model_len: int, api_key: str | None = None,
    max_n: int = 16, adapters: Sequence[str] = (),
) -> FastAPI:  # fmt: skip
    """The server for `engine` (an `AsyncLLM`: generate, abort, stats, shutdown) serving `model_name`, and each of
    the engine's LoRA `adapters` under its own name (a request's `model` picks one, as vLLM's LoRA serving does).

    `tokenizer` renders chat templates and spells logprob tokens; `max_model_len` bounds a chat answer's default
    length (the room left in the context); `n` (and `best_of`) above `max_n` are refused. The app's shutdown shuts
    the engine down (after uvicorn has finished or cancelled the requests in flight)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.state.metrics = metrics = Metrics(engine)
    _install_error_handlers(app)
    served = [model_name, *adapters]  # a request's `model`: the base model or an adapter's name
    if len(set(served)) != len(served):
        raise ValueError(f"the served model names must differ: {served}")
    _complete_schema(app, served)
    v1 = APIRouter(prefix="/v1", **({} if api_key is None else _guarded(api_key)))

    def adapter_of(body: api._Request) -> str | None:
        """The adapter `body.model` names (None: the base model), or the 404 an unknown model gets."""
        if body.model not in served:
            names = ", ".join(repr(n) for n in served)
            raise api.OpenAIError(f"model {body.model!r} does not exist; this server serves {names}",
                                  param="model", code="model_not_found")  # fmt: skip
        return None if body.model == model_name else body.model

    def checked_params(body: api._Request, max_tokens: int) -> Any:
        """The engine's SamplingParams for `body`, or the 400 its `n`, `best_of` or a value gets."""
        kwargs = body.sampling_kwargs(max_tokens)
        for name in ("n", "best_of"):
            if (kwargs.get(name) or 0) > max_n:
                raise api.OpenAIError(f"{name}={kwargs[name]}: at most {max_n}", param=name)
        try:
            return SamplingParams(**kwargs)
        except GenerationInputError as e:
            raise _refused(e) from None

    async def beam_searched(prompts: list[api.Prompt], params: BeamSearchParams, form: api.ChatFormat,
                            body: api._Request, request: Request) -> Any:  # fmt: skip
        """A beam search per prompt, all at once, to their end (cancelled if the client leaves first: a 499),
        then the answer `_respond` sends; a prompt or width the engine refuses is a 400."""
        finals, arrival = [], time.perf_counter()

        async def search() -> None:
            finals.extend(await beam_search_prompts(engine, prompts, params, api.new_id("beam"), tokenizer=tokenizer,
                                                    max_model_len=max_model_len,
                                                    adapter=adapter_of(body)))  # fmt: skip

        try:
            if not await _unless_disconnected(search(), request):
                return Response(status_code=499)
        except GenerationInputError as e:
            if e.name == "beam_width":
                raise api.OpenAIError(f"n={params.beam_width} with use_beam_search: {e.rule}", param="n") from None
            raise _refused(e) from None
        done = time.perf_counter() - arrival
        for output in finals:
            metrics.ttft.observe(done)
            metrics.finish(output, done)
        return await _respond(Finished(finals), form, body, request)

    @v1.post("/chat/completions", responses=_generation_responses(api.ChatCompletion, api.ChatCompletionChunk))
    async def chat_completions(body: api.ChatCompletionRequest, request: Request) -> Any:
        adapter = adapter_of(body)
        messages = [m.for_template() for m in body.messages]
        try:
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except (LmforgeError, TemplateError) as e:
            raise api.OpenAIError(f"the chat template: {e}", param="messages") from None
        room = max_model_len - len(prompt)
        if room < 1:
            raise api.OpenAIError(f"the conversation is {len(prompt)} tokens; the context holds {max_model_len}",
                                  param="messages", code="context_length_exceeded")  # fmt: skip
        max_tokens = _first_given(body.max_completion_tokens, body.max_tokens, room)
        params = checked_params(body, max_tokens)
        chat = api.ChatFormat(tokenizer, body.model, body.engine_logprobs())
        if body.use_beam_search:
            return await beam_searched([prompt], body.beam_search_params(max_tokens), chat, body, request)
        generation = await _started(engine, [prompt], params, metrics, adapter)
        return await _respond(generation, chat, body, request)

    @v1.post("/completions", responses=_generation_responses(api.Completion, api.CompletionChunk))
    async def completions(body: api.CompletionRequest, request: Request) -> Any:
        adapter = adapter_of(body)
        max_tokens = _first_given(body.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS)
        params = checked_params(body, max_tokens)
        form = api.CompletionFormat(tokenizer, body.model, body.engine_logprobs())
        if body.use_beam_search:
            return await beam_searched(body.prompts(), body.beam_search_params(max_tokens), form, body, request)
        generation = await _started(engine, body.prompts(), params, metrics, adapter)
        return await _respond(generation, form, body, request)

    @v1.get("/models", response_model=api.ModelList)
    async def models() -> dict:
        card = {"object": "model", "created": int(time.time()), "owned_by": "lmforge", "max_model_len": max_model_len}
        parents = [None] + [model_name] * len(adapters)  # an adapter's card names its base model, as vLLM's
        return {"object": "list", "data": [card | {"id": name, "parent": parent}
                                           for name, parent in zip(served, parents, strict=True)]}  # fmt: skip

    app.include_router(v1)

    @app.get("/health", response_model=api.Health)
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    page = CHAT_PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def _first_given(*values: int | None) -> int:
    return next(v for v in values if v is not None)


def _bearer_check(api_key: str) -> Callable[[HTTPAuthorizationCredentials | None], None]:
    """The /v1 dependency: `Authorization: Bearer <api_key>` (compared in constant time), else a 401. FastAPI's
    `HTTPBearer` declares the scheme in the OpenAPI schema, so clients and fuzzers know the routes need it."""

    def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise api.OpenAIError("a valid API key is needed: Authorization: Bearer <key>", code="invalid_api_key",
                                  status=401)  # fmt: skip

    return check


def _guarded(api_key: str) -> dict[str, Any]:
    """The /v1 router's options with `api_key`: the bearer check, and its 401 documented."""
    return {"dependencies": [Depends(_bearer_check(api_key))],
            "responses": {401: _error_response("No valid API key: Authorization: Bearer <key> is needed")}}  # fmt: skip


def _error_response(description: str) -> dict[str, Any]:
    return {"model": api.ErrorResponse, "description": description}


def _generation_responses(answer: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI responses of a generation route: the answer as JSON, or with "stream": true server-sent events
    whose data is a `chunk` as JSON (an ErrorResponse if the server fails mid-stream), the last one [DONE]; a 400
    for a refused request."""
    refs = [{"$ref": f"#/components/schemas/{model.__name__}"} for model in (chunk, api.ErrorResponse)]
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": refs},
                 "description": f"a {chunk.__name__} (or an ErrorResponse) as JSON"}  # fmt: skip
    data = {"anyOf": [json_data, {"const": "[DONE]", "description": "the end of the stream"}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {
        200: {"model": answer, "description": f"The {answer.__name__}, or with stream=true an SSE stream of "
              f"{chunk.__name__} events.", "content": {"text/event-stream": {"schema": event}}},
        400: _error_response("A refused request: malformed JSON, a wrong type, an unknown model, a value out of "
                             "range, a prompt longer than the context."),
    }  # fmt: skip


def _complete_schema(app: FastAPI, served: list[str]) -> None:
    """Complete FastAPI's OpenAPI schema: `model` is one of the served models (any other is a 400), the chunks (which
    only SSE events reference) join the components, and the 422 FastAPI documents for every route with a body goes:
    this server answers validation errors 400."""
    build, chunks = app.openapi, [api.ChatCompletionChunk, api.CompletionChunk]

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema["components"]["schemas"]
            _, defs = models_json_schema([(c, "serialization") for c in chunks],
                                         ref_template="#/components/schemas/{model}")  # fmt: skip
            components.update(defs["$defs"])
            for request in (api.ChatCompletionRequest, api.CompletionRequest):
                components[request.__name__]["properties"]["model"]["enum"] = list(served)
            for path in schema["paths"].values():
                for operation in path.values():
                    operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


def _install_error_handlers(app: FastAPI) -> None:
    """Every error as the OpenAI body: 400 for a bad request, the route's status for 401/404/405, 500 otherwise."""

    @app.exception_handler(api.OpenAIError)
    async def refused(_: Request, e: api.OpenAIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
            return JSONResponse(api.OpenAIError(message, code="json_invalid").body(), status_code=400)
        param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
        message = f"{param or 'the body'}: {first.get('msg')}"
        return JSONResponse(api.OpenAIError(message, param=param, code=first.get("type")).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http(_: Request, e: HTTPException) -> JSONResponse:  # 404, 405 (with its Allow header), ...
        body = api.OpenAIError(str(e.detail), status=e.status_code).body()
        return JSONResponse(body, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def crashed(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        body = api.OpenAIError("internal server error", kind="server_error", status=500).body()
        return JSONResponse(body, status_code=500)


async def _started(
    engine: Any, prompts: list[api.Prompt], params: Any, metrics: Metrics, adapter: str | None = None
) -> Generation:
    """A `Generation` whose prompts the engine accepted; a refused one is a 400 naming the field."""
    generation = Generation(engine, prompts, params, metrics, adapter)
    try:
        await generation.start()
    except GenerationInputError as e:
        raise _refused(e) from None
    return generation


def _refused(error: GenerationInputError) -> api.OpenAIError:
    """The engine's refusal as a 400 naming the request field (`top_p=2.0: must be in [0, 1]`)."""
    return api.OpenAIError(str(error).removeprefix("SamplingParams."), param=error.name)


async def _respond(
    generation: Generation | Finished, form: api.ChatFormat, body: api._Request, request: Request
) -> Any:
    """The whole answer as one JSON body (its requests aborted if the client leaves first), or the SSE response."""
    if body.stream:
        return StreamingResponse(_events(generation, form, body), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip
    final: dict[int, Any] = {}

    async def collect() -> None:
        async for index, output in generation:
            final[index] = output

    try:
        if not await _unless_disconnected(collect(), request):
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    finally:
        await generation.close()
    n = len(next(iter(final.values())).outputs)
    choices = [form.choice(i * n + j, o) for i in sorted(final) for j, o in enumerate(final[i].outputs)]
    return api.envelope(api.new_id(form.id_prefix), form.object, form.model, choices, api.usage_of(final.values()))


async def _unless_disconnected(work: Coroutine, request: Request) -> bool:
    """Run `work` to its end (True), or cancel it when the client disconnects first (False) and wait for it to
    wind down (shielded: its cleanup, such as aborting engine requests, runs to its end). Once the body is read,
    the next ASGI message a request receives is http.disconnect."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watch):
            pending.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(task, watch, return_exceptions=True)
    if not task.done() or task.cancelled():
        return False
    task.result()  # its error, if any
    return True


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(generation: Generation | Finished, form: api.ChatFormat, body: api._Request) -> AsyncIterator[str]:
    """SSE: one chunk per engine update with what is new in each output, the usage chunk if asked, [DONE]."""
    id, sent, final = api.new_id(form.id_prefix), {}, {}
    extra = {"usage": None} if body.include_usage else {}
    try:
        async for index, output in generation:
            final[index] = output
            for j, o in enumerate(output.outputs):  # one chunk per choice, as OpenAI streams n > 1
                key = index * len(output.outputs) + j
                first = key not in sent
                if (new := sent.setdefault(key, api.Delta()).advance(o.text, o.token_ids, o.finish_reason)) is not None:
                    choice = form.chunk_choice(key, o, new[0], new[1], first)
                    yield _sse(api.envelope(id, form.chunk_object, form.model, [choice]) | extra)
        if body.include_usage:
            yield _sse(api.envelope(id, form.chunk_object, form.model, [], api.usage_of(final.values())))
    except Exception:  # the status is sent: report it in the stream, log the traceback
        log.exception("internal error while streaming")
        yield _sse(api.OpenAIError("internal server error", kind="server_error", status=500).body())
    finally:
        await generation.close()
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
