"""The server's OpenAPI schema fuzzed with schemathesis: every operation, generated requests valid and invalid.

The app (engine/server.py, with an API key) runs in-process over `FakeEngine` (fake_engine.py); schemathesis
loads its /openapi.json and sends each operation a bounded, seeded set of generated requests (positive cases the
schema allows, negative ones it forbids), with the key; its `ignored_auth` check resends them without a key and
with a wrong one. Each response must pass schemathesis's checks (no 5xx; status code, content type, headers and
body as documented; schema-invalid data refused; auth enforced; unsupported methods 405 with Allow) and ours: a
4xx body is the OpenAI error body (a validation error a 400, never FastAPI's 422), every event of a stream is a
documented chunk and the stream ends with [DONE], and the engine holds no request once the response is read.
The fake engine takes a millisecond a step, so a stream schemathesis stops reading (at `max_stream_events`) is
still running there: the app must abort it.
"""

from __future__ import annotations

import json
import time

import schemathesis
from fake_engine import FakeEngine, byte_tokenizer
from hypothesis import HealthCheck, seed, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from lmforge.engine import openai_protocol as api
from lmforge.engine.server import create_app

MODEL, MAX_LEN, KEY = "tiny", 64, "sesame"
CHUNKS = {"/v1/chat/completions": api.ChatCompletionChunk, "/v1/completions": api.CompletionChunk}


engine = FakeEngine(byte_tokenizer(), max_model_len=MAX_LEN, delay=0.001)
app = create_app(engine, MODEL, tokenizer=engine.tokenizer, max_model_len=MAX_LEN, api_key=KEY, max_n=4)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
schema.config.generation.update(modes=["positive", "negative"], max_examples=25, deterministic=True)
schema.config.max_stream_events = 32  # read 32 events, then leave: long streams are cut as by a client going away


@schemathesis.check
def openai_bodies(ctx, response, case) -> bool:
    """A 4xx carries the OpenAI error body (and is not FastAPI's 422); a stream's events are documented chunks
    (or an error body) ending with [DONE], unless schemathesis stopped reading at its event limit (and so left
    mid-stream, as a client that disconnects)."""
    assert response.status_code != 422, "a validation error must be answered 400"
    if 400 <= response.status_code < 500:
        api.ErrorResponse.model_validate_json(response.content)
    content_type = response.headers.get("content-type", [""])[0]
    if response.status_code == 200 and content_type.startswith("text/event-stream"):
        events = [event.removeprefix("data: ") for event in response.text.split("\n\n") if event]
        if len(events) < schema.config.max_stream_events_for(operation=case.operation):
            assert events.pop() == "[DONE]", events[-1:]
        for event in events:
            payload = json.loads(event)
            (api.ErrorResponse if "error" in payload else CHUNKS[case.operation.path]).model_validate(payload)
    return True


CHECKS = [
    not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
    response_schema_conformance, negative_data_rejection, ignored_auth, unsupported_method, openai_bodies,
]  # fmt: skip


@schema.parametrize()
@seed(14)
@settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_every_operation_conforms_to_the_schema(case):
    """Each generated request; a valid generation request that does not stream is sent again streaming (schemathesis
    rarely draws stream=true among so many fields), so both answers of every valid request are checked."""
    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS)
    valid = case.meta.generation.mode is GenerationMode.POSITIVE and case.operation.path in CHUNKS
    if valid and isinstance(case.body, dict) and case.body.get("stream") is not True:
        case.body = case.body | {"stream": True}
        case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS)
    assert_engine_idle()


def assert_engine_idle() -> None:
    """The fake engine holds no request: each finished or was aborted (the real engine's blocks are free)."""
    deadline = time.monotonic() + 2  # a stream cut short is aborted by the app's cancelled task, just after
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.active == {}, "the engine still holds a request after its response was read"


def test_the_schema_documents_what_the_server_answers():
    """The hand-written parts of the schema: the bearer scheme on /v1 only, 400/401 with the error body and no
    422, SSE events naming their chunk model (present in the components), /metrics as text."""
    document = app.openapi()
    paths, components = document["paths"], document["components"]["schemas"]
    assert document["components"]["securitySchemes"] == {"HTTPBearer": {"type": "http", "scheme": "bearer"}}
    for path, chunk in CHUNKS.items():
        responses = paths[path]["post"]["responses"]
        assert set(responses) == {"200", "400", "401"}
        assert paths[path]["post"]["security"] == [{"HTTPBearer": []}]
        for status in ("400", "401"):
            assert responses[status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"}  # fmt: skip
        event = responses["200"]["content"]["text/event-stream"]["schema"]
        refs = event["properties"]["data"]["anyOf"][0]["contentSchema"]["anyOf"]
        assert refs == [{"$ref": f"#/components/schemas/{name}"} for name in (chunk.__name__, "ErrorResponse")]
        assert chunk.__name__ in components
    assert "security" not in paths["/health"]["get"] and "security" not in paths["/metrics"]["get"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert "HTTPValidationError" not in components
    assert not any("422" in op["responses"] for path in paths.values() for op in path.values())
