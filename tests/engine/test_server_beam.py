"""Beam search through `lmforge serve` (vLLM's `use_beam_search`, engine/async_beam_search.py) on a tiny random
model, over real HTTP with the `openai` client.

Oracle: `LLM.beam_search`, the offline search over the same model (itself held to transformers' beam search in
test_engine_beam.py). The search over a running `AsyncLLM` gives the same hypotheses (token ids, texts, finish
reasons, in the same order) and scores (rtol 1e-5), computing only the tokens past each beam's cached blocks; the
server answers with them as its choices (best first), whole or streamed, for completions and chat, also while
plain streaming requests run at once (their answers those of `LLM.generate`); what does not combine with beam
search is a 400 naming the field; the engine holds no request and no block after every test, also after a
cancelled search and after a client that went away mid-search.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
from fake_engine import FakeEngine, byte_tokenizer
from prometheus_client.parser import text_string_to_metric_families
from serving import MODEL, over, serving

from lmforge.config import ModelConfig
from lmforge.engine import LLM, AsyncLLM, SamplingParams
from lmforge.engine.async_beam_search import beam_search
from lmforge.engine.beam_search import BeamSearchParams
from lmforge.engine.server import create_app
from lmforge.infer.sampling import GenerationInputError
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import train_bpe

CONTEXT, BLOCK = 64, 4
TEXT = "Now is the winter of our discontent made glorious summer by this sun of York. "


@pytest.fixture(scope="module")
def model_and_tokenizer():
    """A random two-layer model and a BPE tokenizer trained on one line, eos <|im_end|> (ChatML specials)."""
    tokenizer = train_bpe(texts=[TEXT * 16], vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                          progress=False)  # fmt: skip
    tokenizer.eos_token = "<|im_end|>"
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=24, n_layers=2, n_heads=2, d_ff=48,
                         max_seq_len=CONTEXT)  # fmt: skip
    torch.manual_seed(1)
    return Transformer(config).eval(), tokenizer


@pytest.fixture(scope="module")
def offline(model_and_tokenizer) -> LLM:
    """The oracle: the offline engine over the same model (its own pool; used only while the server is idle)."""
    model, tokenizer = model_and_tokenizer
    return LLM(model, tokenizer, max_num_seqs=8, max_model_len=CONTEXT, block_size=BLOCK)


@pytest.fixture(scope="module")
def real(model_and_tokenizer) -> Iterator[tuple[AsyncLLM, str]]:
    """The server over a real AsyncLLM: 4 sequences at once (a search of width 4 fills them), 4-token blocks."""
    model, tokenizer = model_and_tokenizer
    engine = AsyncLLM(LLM(model, tokenizer, max_num_seqs=4, max_model_len=CONTEXT, block_size=BLOCK))
    app = create_app(engine, MODEL, tokenizer=tokenizer, max_model_len=CONTEXT, max_n=4)
    with serving(app) as base:
        yield engine, base


@pytest.fixture
def client(real) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{real[1]}/v1", api_key="unused", max_retries=0)


def engine_idle(engine: AsyncLLM) -> bool:
    stats = engine.stats()
    return (stats.running, stats.waiting, stats.blocks_used) == (0, 0, 0) and not engine.engine.has_unfinished()


def wait_idle(engine: AsyncLLM, seconds: float = 5.0) -> None:
    """Aborts reach the engine thread asynchronously: wait (a while at most) until it holds nothing."""
    deadline = time.monotonic() + seconds
    while not engine_idle(engine) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine_idle(engine), engine.stats()


@pytest.fixture(autouse=True)
def pool_free_after(real, offline):
    """Every test leaves both engines holding no request and no block (the blocks the prefix cache keeps are free)."""
    yield
    wait_idle(real[0])
    blocks = offline.engine.blocks
    assert blocks.free_blocks == blocks.num_blocks and not offline.engine.has_unfinished()


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


@pytest.fixture(scope="module")
def stops(offline, model_and_tokenizer) -> tuple[int, int]:
    """Two tokens the searches below meet early (the 2nd and 4th of a greedy continuation), as stop ids: beams
    then end at different lengths, some on a stop ("stop"), others at the length limit ("length")."""
    [out] = offline.generate(["winter of"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    tokens = out.outputs[0].token_ids
    return tokens[1], tokens[3]


# (beam width, length_penalty, early_stopping, stop ids: indices into `stops`, ignore_eos)
SETTINGS = [
    (2, 1.0, False, (0,), False),
    (3, 2.0, "never", (0, 1), False),
    (4, -1.0, True, (1,), False),
    (4, 0.0, False, (), True),
]
PROMPTS = ["winter of", "made glorious summer by", "York"]


def params_of(setting, stops: tuple[int, int], max_tokens: int = 10) -> BeamSearchParams:
    width, length_penalty, early_stopping, stop, ignore_eos = setting
    return BeamSearchParams(width, max_tokens, ignore_eos=ignore_eos, length_penalty=length_penalty,
                            early_stopping=early_stopping, stop_token_ids=[stops[i] for i in stop])  # fmt: skip


def assert_same_hypotheses(got, expected) -> None:
    assert [o.token_ids for o in got.outputs] == [o.token_ids for o in expected.outputs]
    assert [(o.index, o.text, o.finish_reason) for o in got.outputs] == [
        (o.index, o.text, o.finish_reason) for o in expected.outputs]  # fmt: skip
    assert [o.score for o in got.outputs] == pytest.approx([o.score for o in expected.outputs], rel=1e-5)
    assert [o.cumulative_logprob for o in got.outputs] == pytest.approx(
        [o.cumulative_logprob for o in expected.outputs], rel=1e-5)  # fmt: skip
    assert got.prompt_token_ids == expected.prompt_token_ids and got.finished


# -- the search over the running engine ------------------------------------------------------------------------


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("text", PROMPTS[:2])
def test_async_search_equals_the_offline_one(real, offline, stops, setting, text):
    engine, _ = real
    params = params_of(setting, stops)
    [expected] = offline.beam_search([text], params)
    got = asyncio.run(beam_search(engine, text, params, "search"))
    assert_same_hypotheses(got, expected)
    assert got.prompt == text and got.request_id == "search"


def test_async_search_at_a_temperature_equals_the_offline_one(real, offline, stops):
    """Beams ranked by the log-probabilities of logits / T, as offline (the step requests' `scaled_logprobs`)."""
    engine, _ = real
    params = dataclasses.replace(params_of(SETTINGS[1], stops), temperature=0.5)
    [expected] = offline.beam_search([PROMPTS[1]], params)
    got = asyncio.run(beam_search(engine, PROMPTS[1], params, "search"))
    assert_same_hypotheses(got, expected)
    [cold] = offline.beam_search([PROMPTS[1]], params_of(SETTINGS[1], stops))
    assert [o.score for o in cold.outputs] != pytest.approx([o.score for o in got.outputs], rel=1e-3)


def test_the_settings_end_beams_both_ways(offline, stops):
    """Some hypotheses end on a stop id, others at the length limit (so the parity above covers both)."""
    reasons = {o.finish_reason for setting in SETTINGS for text in PROMPTS[:2]
               for o in offline.beam_search([text], params_of(setting, stops))[0].outputs}  # fmt: skip
    assert reasons == {"stop", "length"}


def test_steps_feed_only_the_tokens_past_the_cached_blocks(real, offline, monkeypatch):
    """Each step request finds its beam's full blocks computed by the step before (prefix caching): after the
    prompt, a request feeds at most one block of tokens, where it would feed its whole row without the cache."""
    engine, _ = real
    fed, requests, generate = [], [], engine.generate
    run = engine.engine.runner.run
    monkeypatch.setattr(engine.engine.runner, "run", lambda batch, *a: fed.append(batch.tokens) or run(batch, *a))

    def counting(prompt, params, request_id):
        requests.append(len(prompt))
        return generate(prompt, params, request_id)

    monkeypatch.setattr(engine, "generate", counting)
    text, params = "his sun of York made", BeamSearchParams(3, 12, ignore_eos=True)
    got = asyncio.run(beam_search(engine, text, params, "cached"))
    assert_same_hypotheses(got, offline.beam_search([text], params)[0])
    prompt = len(got.prompt_token_ids)
    assert len(requests) > 3 * 8 and sum(fed) <= prompt + BLOCK * (len(requests) - 1) < sum(requests) / 2


def test_a_width_whose_candidates_exceed_the_logprobs_limit_is_refused(real):
    """max(2, 1 + eos tokens) * width top log-probabilities a beam: 2 * 11 > MAX_LOGPROBS (20)."""
    with pytest.raises(GenerationInputError, match="beam_width=11") as raised:
        asyncio.run(beam_search(real[0], "York", BeamSearchParams(11, 4), "wide"))
    assert raised.value.name == "beam_width"


def test_a_cancelled_search_aborts_its_step_requests(real):
    engine, _ = real
    before = engine.engine.generated_tokens

    async def cancel_midway() -> None:
        task = asyncio.ensure_future(beam_search(engine, "York", BeamSearchParams(4, 50, ignore_eos=True), "gone"))
        while not task.done() and engine.engine.generated_tokens < before + 9:  # the prompt's step, two of 4 beams
            await asyncio.sleep(0.002)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_midway())
    wait_idle(engine)
    stopped_at = engine.engine.generated_tokens
    time.sleep(0.1)
    assert engine.engine.generated_tokens == stopped_at < before + 4 * 40  # no step runs on; far from the end


# -- through the server ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", SETTINGS[:3])
def test_completions_answer_the_hypotheses_best_first(client, offline, stops, setting):
    params = params_of(setting, stops)
    reply = client.completions.create(model=MODEL, prompt=PROMPTS, n=params.beam_width, max_tokens=10,
                                      extra_body={"use_beam_search": True, "length_penalty": params.length_penalty,
                                                  "early_stopping": params.early_stopping,
                                                  "stop_token_ids": list(params.stop_token_ids)})  # fmt: skip
    expected = offline.beam_search(PROMPTS, params)
    k = params.beam_width
    assert [c.index for c in reply.choices] == list(range(len(PROMPTS) * k))
    assert [(c.text, c.finish_reason) for c in reply.choices] == [
        (o.text, o.finish_reason) for e in expected for o in e.outputs]  # fmt: skip
    assert reply.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    assert reply.usage.completion_tokens == sum(len(o.token_ids) for e in expected for o in e.outputs)


def test_chat_answers_the_hypotheses_best_first(client, offline, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": "glorious summer"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, n=3, max_tokens=8, temperature=0.7,
                                           extra_body={"use_beam_search": True})  # fmt: skip
    [expected] = offline.beam_search([chat_ids(tokenizer, "glorious summer")], BeamSearchParams(3, 8, temperature=0.7))
    assert [(c.index, c.message.role, c.message.content, c.finish_reason) for c in reply.choices] == [
        (i, "assistant", o.text, o.finish_reason) for i, o in enumerate(expected.outputs)]  # fmt: skip
    assert reply.usage.completion_tokens == sum(len(o.token_ids) for o in expected.outputs)


def metric_counts(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.endswith("_seconds_count")}  # fmt: skip


def test_a_search_counts_in_time_to_first_token_and_end_to_end_latency_once_done(real):
    before = metric_counts(real[1])
    httpx.post(f"{real[1]}/v1/completions", json={"model": MODEL, "prompt": PROMPTS[:2], "n": 2, "max_tokens": 4,
                                                  "use_beam_search": True}, timeout=60).raise_for_status()  # fmt: skip
    after = metric_counts(real[1])
    gained = {name: after[name] - before[name] for name in after}
    assert gained == {"lmforge_time_to_first_token_seconds_count": 2, "lmforge_inter_token_latency_seconds_count": 0,
                      "lmforge_e2e_request_latency_seconds_count": 2}  # fmt: skip


def test_streamed_hypotheses_are_one_chunk_each_then_done(real, offline):
    body = {"model": MODEL, "prompt": "sun of", "n": 3, "max_tokens": 7, "use_beam_search": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{real[1]}/v1/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.status_code == 200 and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    [expected] = offline.beam_search(["sun of"], BeamSearchParams(3, 7))
    assert [[(c["index"], c["text"], c["finish_reason"]) for c in chunk["choices"]] for chunk in chunks[:-1]] == [
        [(i, o.text, o.finish_reason)] for i, o in enumerate(expected.outputs)]  # fmt: skip
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == sum(
        len(o.token_ids) for o in expected.outputs)  # fmt: skip


def test_chat_streamed_equals_the_whole_answer(client):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "York"}], "n": 2, "max_tokens": 6,
               "extra_body": {"use_beam_search": True}}  # fmt: skip
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True))
    assert [(c.choices[0].index, c.choices[0].delta.role, c.choices[0].delta.content, c.choices[0].finish_reason)
            for c in chunks] == [(c.index, "assistant", c.message.content, c.finish_reason)
                                 for c in whole.choices]  # fmt: skip


def test_beam_search_beside_plain_streaming_requests(real, offline, model_and_tokenizer):
    """Three plain streaming chats and a beam search, all at once on an engine that runs 4 sequences: each answer
    is its offline one (the greedy chats `LLM.generate`'s, the beams `LLM.beam_search`'s)."""
    _, tokenizer = model_and_tokenizer
    texts = ["winter", "our discontent", "this sun of York"]
    greedy = [o.outputs[0].text for o in offline.generate([chat_ids(tokenizer, t) for t in texts],
                                                          SamplingParams(temperature=0, max_tokens=10))]  # fmt: skip
    [beams] = offline.beam_search(["made glorious"], BeamSearchParams(4, 10))

    async def plain(client: openai.AsyncOpenAI, text: str) -> str:
        stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                                      max_tokens=10, temperature=0, stream=True)  # fmt: skip
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def searched(client: openai.AsyncOpenAI) -> list[str]:
        reply = await client.completions.create(model=MODEL, prompt="made glorious", n=4, max_tokens=10,
                                                extra_body={"use_beam_search": True})  # fmt: skip
        return [c.text for c in reply.choices]

    async def together() -> list:
        async with openai.AsyncOpenAI(base_url=f"{real[1]}/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(plain(client, t) for t in texts), searched(client))

    *answers, hypotheses = asyncio.run(together())
    assert answers == greedy and hypotheses == [o.text for o in beams.outputs]


def test_a_client_that_leaves_mid_search_frees_everything(real, monkeypatch):
    """A whole-answer beam request whose client times out: the server cancels the search, which aborts its step
    requests; no step runs after it (each forward is slowed so the search outlasts the client)."""
    engine, base = real
    run = engine.engine.runner.run
    monkeypatch.setattr(engine.engine.runner, "run", lambda *a: time.sleep(0.02) or run(*a))
    before = engine.engine.generated_tokens
    body = {"model": MODEL, "prompt": "York", "n": 4, "max_tokens": 50, "ignore_eos": True, "use_beam_search": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json=body, timeout=0.4)
    stopped_at = -1
    while engine.engine.generated_tokens != stopped_at:  # the server notices the client has gone (a loaded
        wait_idle(engine)  # machine may run a step or two first: the engine is idle between steps)
        stopped_at = engine.engine.generated_tokens
        time.sleep(0.3)
    time.sleep(0.1)
    assert before < engine.engine.generated_tokens == stopped_at < before + 4 * 40


# -- refusals --------------------------------------------------------------------------------------------------

BEAM = {"model": MODEL, "use_beam_search": True, "max_tokens": 4}
COMPLETION, CHAT = {**BEAM, "prompt": "York"}, {**BEAM, "messages": [{"role": "user", "content": "York"}]}


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("completions", {**COMPLETION, "logprobs": 1}, "logprobs"),
        ("completions", {**COMPLETION, "logprobs": 0}, "logprobs"),
        ("chat/completions", {**CHAT, "logprobs": True}, "logprobs"),
        ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 2}, "logprobs"),
        ("chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
        ("completions", {**COMPLETION, "n": 2, "best_of": 3}, "best_of"),
        ("completions", {**COMPLETION, "n": 5}, "n"),
        ("chat/completions", {**CHAT, "n": 0}, "n"),
        ("completions", {**COMPLETION, "top_p": 0.5}, "top_p"),
        ("chat/completions", {**CHAT, "repetition_penalty": 1.3}, "repetition_penalty"),
        ("completions", {**COMPLETION, "stop": ["of"]}, "stop"),
        ("completions", {**COMPLETION, "length_penalty": 1e3}, "length_penalty"),
        ("completions", {**COMPLETION, "early_stopping": "always"}, "early_stopping"),
        ("completions", {**COMPLETION, "use_beam_search": "yes"}, "use_beam_search"),
        ("completions", {**COMPLETION, "prompt": "York " * CONTEXT}, "prompt"),
        ("completions", {**COMPLETION, "prompt": ["York", "York " * CONTEXT], "stream": True}, "prompt"),
        ("completions", {**COMPLETION, "prompt": [5, 2**70]}, "prompt"),
        ("completions", {**COMPLETION, "stop_token_ids": [2**70]}, "stop_token_ids"),
    ],
)
def test_what_does_not_combine_is_a_400(real, route, body, param):
    response = httpx.post(f"{real[1]}/v1/{route}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]


def test_a_width_beyond_the_logprobs_limit_is_a_400_naming_n():
    engine = FakeEngine(byte_tokenizer())
    with serving(over(engine, max_n=16)) as base:
        response = httpx.post(f"{base}/v1/completions", json={**COMPLETION, "n": 11})
        assert response.status_code == 400 and response.json()["error"]["param"] == "n"
        assert "n=11" in response.json()["error"]["message"]
        assert httpx.post(f"{base}/v1/completions", json={**COMPLETION, "n": 10}).status_code == 200
    assert engine.active == {}


def test_a_client_that_leaves_aborts_the_step_requests_in_flight():
    """Over the fake engine, whose requests stay active until they finish or are aborted (a generator merely
    cancelled leaves them there): the step requests in flight when the client leaves are aborted."""
    engine = FakeEngine(byte_tokenizer(), delay=0.05)
    with serving(over(engine)) as base:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/completions", json={**COMPLETION, "n": 3, "max_tokens": 40}, timeout=0.3)
        deadline = time.monotonic() + 5
        while (engine.active or not engine.aborted) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.aborted and engine.active == {}
        assert len(engine.requests) < 1 + 3 * 39  # the search stopped long before its end
