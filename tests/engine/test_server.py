"""The OpenAI-compatible server (engine/server.py) through the official `openai` client, over real HTTP.

The app runs under uvicorn on a free port in a thread, over `FakeEngine` (fake_engine.py), whose answers follow a
rule the tests compute independently (`script`); the chat prompt's oracle is the tokenizer's own chat template.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
from fake_engine import LN2, FakeEngine, byte_tokenizer, script
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from serving import MODEL, over, serving

import lmforge
from lmforge.config import ModelConfig
from lmforge.engine import LLM, AsyncLLM
from lmforge.engine import openai_protocol as api
from lmforge.engine.server import create_app
from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams as GenerationParams
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import train_bpe

MAX_LEN = 128


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def engine(tokenizer) -> FakeEngine:
    return FakeEngine(tokenizer, max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def url(engine) -> Iterator[str]:
    with serving(over(engine)) as base:
        yield base


@pytest.fixture
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(autouse=True)
def no_leaks(engine):
    """Every test leaves no engine request behind (finished or aborted: the real engine's blocks are free)."""
    yield
    deadline = time.monotonic() + 2
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.active == {}


def chat_prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def expected(tokenizer, prompt_ids: list[int], sample: int, length: int) -> str:
    return tokenizer.decode(script(prompt_ids, sample, length))


def last_request(engine: FakeEngine):
    return list(engine.requests.values())[-1]


# -- answers ---------------------------------------------------------------------------------------------------


def test_chat_completion(client, engine, tokenizer):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi there"}],
                                           max_tokens=5, temperature=0.3, top_p=0.9, seed=7)  # fmt: skip
    prompt = chat_prompt(tokenizer, "hi there")
    request = last_request(engine)
    assert request.prompt_ids == prompt
    assert (request.params.temperature, request.params.top_p, request.params.seed) == (0.3, 0.9, 7)
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected(tokenizer, prompt, 0, 5)
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        len(prompt), 5, len(prompt) + 5)


def test_chat_default_length_is_the_room_left(client, engine, tokenizer):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert last_request(engine).params.max_tokens == MAX_LEN - len(chat_prompt(tokenizer, "x"))


def test_completion(client, engine):
    reply = client.completions.create(model=MODEL, prompt="hello world", max_tokens=4)
    assert reply.choices[0].text == "hell" and reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len("hello world"), 4)
    client.completions.create(model=MODEL, prompt=[104, 105])  # token ids; OpenAI's default max_tokens is 16
    assert last_request(engine).params.max_tokens == 16 and last_request(engine).prompt_ids == [104, 105]


def test_stop_string(client):
    reply = client.completions.create(model=MODEL, prompt="hello world", max_tokens=20, stop=["o w"])
    assert reply.choices[0].text == "hell" and reply.choices[0].finish_reason == "stop"


def test_n_2(client, tokenizer):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "abc"}], n=2,
                                           max_tokens=3)  # fmt: skip
    prompt = chat_prompt(tokenizer, "abc")
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.message.content for c in reply.choices] == [expected(tokenizer, prompt, j, 3) for j in range(2)]
    assert reply.usage.completion_tokens == 6


def test_several_prompts_and_n(client):
    reply = client.completions.create(model=MODEL, prompt=["abcd", "wxyz"], n=2, max_tokens=2)
    assert [(c.index, c.text) for c in reply.choices] == [(0, "ab"), (1, "bc"), (2, "wx"), (3, "xy")]
    assert reply.usage.prompt_tokens == 8 and reply.usage.completion_tokens == 8


def test_chat_logprobs(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ab"}], max_tokens=3,
                                           logprobs=True, top_logprobs=2)  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    for entry in content:
        assert entry.logprob == pytest.approx(-LN2) and entry.bytes == list(entry.token.encode())
        next_char = chr((ord(entry.token) + 1) % 256)
        assert [(t.token, t.logprob) for t in entry.top_logprobs] == [(entry.token, -LN2), (next_char, -LN2 - 1)]


def test_completion_logprobs(client):
    reply = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, logprobs=1)
    lp = reply.choices[0].logprobs
    assert lp.tokens == ["h", "e", "l"] and lp.text_offset == [0, 1, 2]
    assert lp.token_logprobs == pytest.approx([-LN2] * 3)
    assert lp.top_logprobs == [{"h": -LN2}, {"e": -LN2}, {"l": -LN2}]


def test_infinite_logprobs_are_sent_as_the_floor():
    """-inf (a masked id) and NaN are not JSON: both formats send LOGPROB_FLOOR, ranked as the lowest."""
    tokenizer, inf = byte_tokenizer(), float("inf")
    entries = [{104: -inf, 105: -1.0, 106: float("nan")}]
    chat = api.chat_logprobs(tokenizer, [104], entries, 3)["content"][0]
    assert chat["logprob"] == api.LOGPROB_FLOOR
    assert [(t["token"], t["logprob"]) for t in chat["top_logprobs"]] == [
        ("i", -1.0), ("h", api.LOGPROB_FLOOR), ("j", api.LOGPROB_FLOOR)]  # fmt: skip
    legacy = api.completion_logprobs(tokenizer, [104], entries, 1, offset=0)
    assert legacy["token_logprobs"] == [api.LOGPROB_FLOOR] and legacy["top_logprobs"] == [{"i": -1.0}]
    json.dumps([chat, legacy], allow_nan=False)  # strict JSON


# -- streaming -------------------------------------------------------------------------------------------------


def test_chat_streaming_equals_the_whole_answer(client, tokenizer):
    messages = [{"role": "user", "content": "stream me"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, n=2)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, n=2, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    for choice in whole.choices:
        deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert deltas[0].role == "assistant"
        assert "".join(d.content or "" for d in deltas) == choice.message.content
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_streaming_with_logprobs(client):
    chunks = list(client.completions.create(model=MODEL, prompt="hello", max_tokens=4, logprobs=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "hell"
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == ["h", "e", "l", "l"]
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == [0, 1, 2, 3]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_raw_sse_ends_with_done(url):
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": MODEL, "prompt": "ab", "max_tokens": 2,
                                                             "stream": True}) as response:  # fmt: skip
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert [json.loads(line[6:])["object"] for line in lines[:-1]] == ["text_completion"] * 2


def test_disconnect_mid_stream_aborts(tokenizer):
    engine = FakeEngine(tokenizer, delay=0.02)
    with serving(over(engine)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}],
                                                max_tokens=100, stream=True)  # fmt: skip
        for _, _ in zip(range(3), stream, strict=False):
            pass
        stream.close()
        deadline = time.monotonic() + 5
        while not engine.aborted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.aborted == list(engine.requests) and engine.active == {}
        assert len(next(iter(engine.requests.values())).outputs[0].token_ids) < 100


def test_disconnect_while_waiting_for_a_whole_answer_aborts(tokenizer):
    engine = FakeEngine(tokenizer, delay=0.02)
    with serving(over(engine)) as base:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "wait", "max_tokens": 100},
                       timeout=0.3)  # fmt: skip
        deadline = time.monotonic() + 5
        while not engine.aborted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.aborted == list(engine.requests) and engine.active == {}


def test_shutdown_aborts_streams_still_running_after_the_grace_period(tokenizer):
    engine, received = FakeEngine(tokenizer, delay=0.02), []

    def client(base: str) -> None:
        stream = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0).completions.create(
            model=MODEL, prompt="long", max_tokens=1000, stream=True)
        with contextlib.suppress(openai.APIError, httpx.HTTPError):
            received.extend(c.choices[0].text for c in stream)

    with serving(over(engine), timeout_graceful_shutdown=0.3) as base:
        thread = threading.Thread(target=client, args=(base,))
        thread.start()
        while not engine.active:
            time.sleep(0.01)
    thread.join(10)
    assert engine.aborted == list(engine.requests) and engine.active == {} and engine.shut_down
    assert 0 < len(received) < 1000


def test_concurrent_streaming_clients(url, tokenizer):
    prompts = [f"client {i} says hello" for i in range(8)]

    async def one(client: openai.AsyncOpenAI, text: str) -> str:
        stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                                      max_tokens=12, stream=True)  # fmt: skip
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def all_of_them() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    answers = asyncio.run(all_of_them())
    assert answers == [expected(tokenizer, chat_prompt(tokenizer, p), 0, 12) for p in prompts]


# -- errors and security ---------------------------------------------------------------------------------------


def assert_openai_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]
    assert error["type"] == "invalid_request_error"
    return error


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("chat/completions", {**CHAT, "model": "gpt-4"}, "model"),
        ("chat/completions", {**CHAT, "temperature": "hot"}, "temperature"),
        ("chat/completions", {**CHAT, "max_tokens": True}, "max_tokens"),
        ("chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ("chat/completions", {**CHAT, "messages": []}, "messages"),
        ("chat/completions", {**CHAT, "temperature": -1}, "temperature"),
        ("chat/completions", {**CHAT, "top_p": 2}, "top_p"),
        ("chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
        ("chat/completions", {**CHAT, "seed": -3}, "seed"),
        ("chat/completions", {**CHAT, "n": 17}, "n"),
        ("chat/completions", {**CHAT, "n": 0}, "n"),
        ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * MAX_LEN}]}, "messages"),
        ("completions", {"model": MODEL, "prompt": "x" * MAX_LEN}, "prompt"),
        ("completions", {"model": MODEL, "prompt": "x" * MAX_LEN, "stream": True}, "prompt"),
        ("completions", {"model": MODEL, "prompt": ["ok", "x" * MAX_LEN]}, "prompt"),
        ("completions", {"model": MODEL, "prompt": "hi", "logprobs": 99}, "logprobs"),
        ("completions", {"model": MODEL, "prompt": "hi", "echo": True}, "echo"),
        ("completions", {"model": MODEL, "prompt": "hi", "best_of": 1, "n": 2}, "best_of"),
        ("completions", {"model": MODEL}, "prompt"),
    ],
)
def test_bad_requests_are_400(url, route, body, param):
    assert_openai_error(httpx.post(f"{url}/v1/{route}", json=body), 400, param)


def test_malformed_json_is_400(url):
    response = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                          headers={"content-type": "application/json"})  # fmt: skip
    assert "JSON" in assert_openai_error(response, 400, None)["message"]


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt="hi", top_p=3.0)
    assert raised.value.status_code == 400 and "top_p" in raised.value.message


def test_a_conversation_the_template_refuses_is_400():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}x"
    )
    with serving(over(FakeEngine(tokenizer))) as base:
        body = {**CHAT, "messages": [{"role": "system", "content": "be brief"}]}
        error = assert_openai_error(httpx.post(f"{base}/v1/chat/completions", json=body), 400, "messages")
        assert "no system role" in error["message"]
        reply = httpx.post(f"{base}/v1/chat/completions", json={**CHAT, "max_tokens": 1}).json()
        assert reply["choices"][0]["message"]["content"] == "x"


def test_api_key(tokenizer):
    engine = FakeEngine(tokenizer)
    with serving(over(engine, api_key="sesame")) as base:
        with pytest.raises(openai.AuthenticationError) as raised:
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        assert raised.value.status_code == 401
        for route, body in (("chat/completions", CHAT), ("completions", {"model": MODEL, "prompt": "a"})):
            error = assert_openai_error(httpx.post(f"{base}/v1/{route}", json=body), 401, None)
            assert error["code"] == "invalid_api_key"
        assert httpx.get(f"{base}/health").status_code == 200
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in good.models.list()] == [MODEL]
        assert good.completions.create(model=MODEL, prompt="ab", max_tokens=2).choices[0].text == "ab"
    assert engine.shut_down  # the app's shutdown shut the engine down


# -- models, health, metrics -----------------------------------------------------------------------------------


def test_models_and_health(client, url):
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [(MODEL, "model", "lmforge")]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert_openai_error(httpx.get(f"{url}/v1/nothing"), 404, None)


def test_metrics(tokenizer):
    engine = FakeEngine(tokenizer)
    with serving(over(engine)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, n=2)
        client.completions.create(model=MODEL, prompt=["ab", "cd"], max_tokens=4)
        list(client.completions.create(model=MODEL, prompt="xyz", max_tokens=20, stop=["yz"], stream=True))
        text = httpx.get(f"{base}/metrics").text
    samples = {s.name + json.dumps(s.labels, sort_keys=True): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip
    stats = engine.stats()
    assert samples["lmforge_generation_tokens_total{}"] == stats.generated_tokens == 3 * 2 + 4 * 2 + 3
    assert samples["lmforge_prompt_tokens_total{}"] == stats.prompt_tokens
    assert samples["lmforge_spec_decode_draft_tokens_total{}"] == stats.draft_tokens == 7 * 17
    assert samples["lmforge_spec_decode_accepted_tokens_total{}"] == stats.accepted_draft_tokens == 5 * 17
    assert samples["lmforge_num_requests_running{}"] == 0 and samples["lmforge_num_requests_waiting{}"] == 0
    assert samples["lmforge_kv_cache_blocks_free{}"] == 1000 and samples["lmforge_kv_cache_blocks_used{}"] == 0
    assert samples["lmforge_prefix_cache_hit_rate{}"] == 0.25
    assert samples['lmforge_request_success_total{"finished_reason": "length"}'] == 4
    assert samples['lmforge_request_success_total{"finished_reason": "stop"}'] == 1
    # 4 engine requests; each streams one update per step: the first its time to first token, the rest gaps
    assert samples["lmforge_time_to_first_token_seconds_count{}"] == 4
    assert samples["lmforge_inter_token_latency_seconds_count{}"] == (3 - 1) + 2 * (4 - 1) + (3 - 1)
    assert samples["lmforge_e2e_request_latency_seconds_count{}"] == 4


# -- the chat page, the command, the real engine ---------------------------------------------------------------


def test_chat_page_is_served(url):
    response = httpx.get(url)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    for needle in ('fetch("/v1/chat/completions"', "include_usage", 'id="temperature"', 'id="max_tokens"',
                   "[DONE]", "tok/s", "first token"):  # fmt: skip
        assert needle in page, needle
    assert "innerHTML" not in page  # model text is inserted as text, never as markup


def test_serve_command_help_and_errors(tmp_path):
    from typer.testing import CliRunner

    from lmforge.cli import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output  # no flag cut short
    for flag in ("--host", "--port", "--api-key", "--max-num-seqs", "--max-model-len", "--served-model-name",
                 "--compile", "--num-speculative-tokens", "--speculative-model"):
        assert flag in help_text
    assert "127.0.0.1" in help_text
    missing = runner.invoke(app, ["serve", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    assert [line for line in missing.stderr.splitlines() if line.startswith("error:")] != []
    assert runner.invoke(app, ["serve", str(tmp_path), "--port", "70000"]).exit_code == 2


@pytest.fixture(scope="module")
def tiny_model():
    """A tiny random Llama with a byte-level BPE tokenizer (ChatML specials, max_seq_len 64)."""
    tok = train_bpe(texts=["To be, or not to be, that is the question. " * 20], vocab_size=280,
                    special_tokens=["<|im_start|>", "<|im_end|>"], progress=False)  # fmt: skip
    tok.eos_token = "<|im_end|>"
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=280, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=64))
    return model.eval(), tok


@pytest.fixture(scope="module")
def real(tiny_model) -> Iterator[tuple[AsyncLLM, str]]:
    """The server over the real AsyncLLM on the tiny model (4 sequences at once, blocks of 4 tokens)."""
    model, tok = tiny_model
    llm = LLM(model, tok, max_num_seqs=4, max_model_len=64, block_size=4)
    engine = AsyncLLM(llm)
    with serving(create_app(engine, MODEL, tokenizer=tok, max_model_len=llm.max_model_len, max_n=4)) as base:
        yield engine, base


def assert_pool_free(engine: AsyncLLM) -> None:
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.blocks_used) == (0, 0, 0)


def test_real_engine_end_to_end(tiny_model, real):
    """Greedy chat answers through the server equal one-at-a-time `generate` on the same prompts, for one client
    (whole and streamed) and for 32 concurrent streaming clients (8 times what the engine decodes at once); the
    pool is free afterwards."""
    model, tok = tiny_model
    engine, base = real
    conversations = [[{"role": "user", "content": "to be " * (i % 6) + f"or not {i}"}] for i in range(32)]
    oracles = [
        "".join(e.text for e in generate(model, tok, tok.apply_chat_template(c, add_generation_prompt=True),
                                         GenerationParams(temperature=0, max_tokens=8)))
        for c in conversations
    ]  # fmt: skip

    async def streamed(client: openai.AsyncOpenAI, messages: list[dict]) -> str:
        stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                      stream=True)  # fmt: skip
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def concurrently() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(streamed(client, c) for c in conversations))

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    whole = client.chat.completions.create(model=MODEL, messages=conversations[0], max_tokens=8, temperature=0)
    assert whole.choices[0].message.content == oracles[0] != ""
    assert whole.usage.prompt_tokens == len(tok.apply_chat_template(conversations[0], add_generation_prompt=True))
    assert asyncio.run(concurrently()) == oracles
    assert_pool_free(engine)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
PLAUSIBLE = {
    "max_tokens": st.integers(-1, 80), "max_completion_tokens": st.integers(-1, 80), "n": st.integers(0, 5),
    "best_of": st.integers(0, 5), "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-1, 300), "min_p": st.floats(-0.5, 1.5), "frequency_penalty": st.floats(-3, 3),
    "presence_penalty": st.floats(-3, 3), "repetition_penalty": st.floats(-1, 3), "seed": st.integers(-1, 2**64),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3),
    "stop_token_ids": st.lists(st.integers(-1, 300), max_size=3), "ignore_eos": st.booleans(),
    "logprobs": st.integers(-1, 21) | st.booleans(), "top_logprobs": st.integers(-1, 21),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "echo": st.booleans(),
}  # fmt: skip
PROMPTS = {
    "completions": st.text(max_size=70) | st.lists(st.integers(-1, 300), max_size=70)
    | st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=3),
    "chat/completions": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user"] * 4 + ["system", "bot"]),
                                                        "content": st.text(max_size=20)}), min_size=1, max_size=3),
}  # fmt: skip


def plausible_or_anything(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly `strategy` (in and just out of range), sometimes any JSON value."""
    return st.one_of(strategy, strategy, strategy, JSON_VALUES)


@st.composite
def request_bodies(draw) -> tuple[str, dict]:
    route = draw(st.sampled_from(list(PROMPTS)))
    body = {"model": draw(st.sampled_from([MODEL] * 12 + ["other", None, 3]))}
    body["prompt" if route == "completions" else "messages"] = draw(plausible_or_anything(PROMPTS[route]))
    for name in draw(st.sets(st.sampled_from(sorted(PLAUSIBLE)), max_size=3)):
        body[name] = draw(plausible_or_anything(PLAUSIBLE[name]))
    return route, body


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=request_bodies())
def test_fuzzed_requests_get_a_200_or_a_400_never_a_500(real, request):
    """Random bodies (every field, any JSON type or value, NaN and huge numbers too) against the real engine: a
    well-formed 200 (whole or streamed to [DONE]) or an OpenAI-style 400, and the pool free after each."""
    engine, base = real
    route, body = request
    with httpx.stream("POST", f"{base}/v1/{route}", content=json.dumps(body), timeout=30,
                      headers={"content-type": "application/json"}) as response:  # fmt: skip
        lines = [line for line in response.iter_lines() if line]
    event(f"{response.status_code} {route}" + (" stream" if body.get("stream") is True else ""))
    if response.status_code == 400:
        assert set(json.loads(lines[0])["error"]) == {"message", "type", "param", "code"}
    else:
        assert response.status_code == 200, lines
        if body.get("stream") is True:
            assert lines[-1] == "data: [DONE]" and all("error" not in json.loads(x[6:]) for x in lines[:-1])
        else:
            assert json.loads(lines[0])["choices"]
    assert_pool_free(engine)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_serve_command_serves_then_stops_on_a_signal(tiny_model, tmp_path, signal_number):
    """`lmforge serve DIR` in its own process answers on 127.0.0.1 and, on SIGINT or SIGTERM, shuts down cleanly
    (uvicorn's handlers, then the engine's shutdown) without a traceback."""

    model, tok = tiny_model
    lmforge.save(model, tmp_path / "m", tokenizer=tok)
    port = free_port()
    # with SIGTERM, the model drafts for itself (speculative decoding from the command line)
    drafting = ["--num-speculative-tokens", "2", "--speculative-model", str(tmp_path / "m")]
    process = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(tmp_path / "m"), "--port", str(port),
                                "--served-model-name", MODEL, "--api-key", "k",
                                *(drafting if signal_number == signal.SIGTERM else [])],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, temperature=0)  # fmt: skip
        assert reply.usage.completion_tokens >= 1
        drafts = [s.value for f in text_string_to_metric_families(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
                  for s in f.samples if s.name == "lmforge_spec_decode_draft_tokens_total"]  # fmt: skip
        assert (drafts[0] > 0) == (signal_number == signal.SIGTERM), drafts
        process.send_signal(signal_number)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    # uvicorn re-raises a SIGTERM it handled once the shutdown is done, so the process ends as SIGTERM's default
    # says (status 143 in a shell: what service managers count as a clean stop); SIGINT ends with status 0
    assert process.returncode == (0 if signal_number == signal.SIGINT else -signal.SIGTERM), stderr
    assert "Application shutdown complete" in stderr and "Traceback" not in stderr
    assert "serving tiny at http://127.0.0.1:" in stderr
