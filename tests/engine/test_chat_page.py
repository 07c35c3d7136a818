"""The chat page (engine/static/chat.html, served at /) end to end in a real headless Chromium, driven by selenium.

The app runs under uvicorn on a free port in a thread over `FakeEngine` (fake_engine.py) with a per-token delay,
so a streamed answer takes several tenths of a second and the page can be watched growing. The oracles: the
fake engine's rule (`script`) on the prompt the tokenizer's own chat template renders for the whole conversation,
the server's non-streamed answer to the same request, and the request the engine received (the page's
temperature and max tokens inputs, every earlier turn of the conversation).

Chromium is not optional here: without Debian's `chromium` and `chromium-driver` (CI installs them, .ci/run) the
test fails and says so.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from fake_engine import FakeEngine, byte_tokenizer, script
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from serving import MODEL, over, serving

DELAY = 0.04  # seconds per generated token: a 12-token answer streams for about half a second
STATS = re.compile(r"first token (\d+\.\d\d) s · (\d+) tokens · (\d+\.\d) tok/s")
# The page's state in one round trip: the last assistant bubble's text and the stats line.
STATE = """
const bubbles = document.querySelectorAll("#log .msg");
const last = bubbles[bubbles.length - 1];
return [last ? last.className : "", last ? last.textContent : "", document.getElementById("stats").textContent,
        document.getElementById("send").disabled];
"""


def chromium_paths() -> tuple[str, str]:
    """Chromium and its driver, or a failure saying to install them (no skip: CI installs both)."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail("the chat page test needs Debian's chromium and chromium-driver: apt-get install chromium "
                    "chromium-driver (.ci/run installs them)")  # fmt: skip
    return browser, driver


@pytest.fixture(scope="module")
def engine() -> FakeEngine:
    return FakeEngine(byte_tokenizer(), delay=DELAY, max_model_len=512)


@pytest.fixture(scope="module")
def url(engine) -> Iterator[str]:
    with serving(over(engine)) as base:
        yield base


@contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
    """Headless Chromium under selenium (a context manager the test enters, so a missing browser fails the test
    itself rather than erroring in a fixture)."""
    binary, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def set_input(browser: webdriver.Chrome, element_id: str, value: str) -> None:
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def watch_answer(browser: webdriver.Chrome, timeout: float = 10) -> tuple[list[str], str, str]:
    """Poll the page until the answer is complete (the stats line appears and Send is enabled again): the distinct
    non-empty texts the assistant bubble showed before that, its final text, and the stats line."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kind, text, stats, busy = browser.execute_script(STATE)
        assert "error" not in kind, f"the page shows an error: {text}"
        if stats and not busy:
            return seen, text, stats
        if "assistant" in kind and text and (not seen or seen[-1] != text):
            seen.append(text)
        time.sleep(0.005)
    raise AssertionError(f"no complete answer within {timeout} s; the page showed {seen}")


def non_streamed(url: str, messages: list[dict], temperature: float, max_tokens: int) -> str:
    body = {"model": MODEL, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def check_turn(browser, engine: FakeEngine, url: str, conversation: list[dict], temperature: float,
               max_tokens: int) -> str:  # fmt: skip
    """The answer the page streamed for `conversation` (its last message just sent): it grew over several polls,
    equals the fake engine's rule on the whole conversation's chat prompt and the server's non-streamed answer, the
    request carried the page's temperature and max tokens, and the stats line shows time to first token and tok/s.
    Returns the answer."""
    seen, answer, stats = watch_answer(browser)
    request = list(engine.requests.values())[-1]
    prompt = engine.tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    assert request.prompt_ids == prompt  # every earlier turn, in order, rendered by the chat template
    assert (request.params.temperature, request.params.max_tokens) == (temperature, max_tokens)
    assert answer == engine.tokenizer.decode(script(prompt, 0, max_tokens)) != ""

    streamed = [text for text in seen if text != answer]
    assert len(streamed) >= 2, f"the answer did not grow while streaming: {seen}"
    assert all(answer.startswith(text) for text in seen) and len(set(map(len, seen))) == len(seen)

    shown = STATS.fullmatch(stats)
    assert shown is not None, f"the stats line {stats!r} does not show time to first token and tok/s"
    ttft, tokens, rate = shown.groups()
    assert int(tokens) == max_tokens
    assert DELAY <= float(ttft) + 0.005 < 5  # the engine's first token takes one DELAY
    assert 0 < float(rate) <= 1.05 / DELAY  # at most one token per DELAY (rounded to 0.1)

    assert non_streamed(url, conversation, temperature, max_tokens) == answer
    return answer


def test_chat_page_streams_a_conversation(engine, url):
    """Open /, set temperature and max tokens, send a message (the Send button), watch the answer stream in, send
    a second turn (Enter), then start a new chat: each request carries the whole conversation so far and the
    inputs' values."""
    with chromium() as browser:
        browser.get(url + "/")
        WebDriverWait(browser, 10).until(lambda b: b.find_element(By.ID, "model").text == MODEL)
        conversation = [{"role": "user", "content": "hello, page"}]
        set_input(browser, "temperature", "0.3")
        set_input(browser, "max_tokens", "12")
        browser.find_element(By.ID, "input").send_keys(conversation[0]["content"])
        browser.find_element(By.ID, "send").click()
        answer = check_turn(browser, engine, url, conversation, 0.3, 12)

        conversation += [{"role": "assistant", "content": answer}, {"role": "user", "content": "and again"}]
        set_input(browser, "max_tokens", "9")
        browser.find_element(By.ID, "input").send_keys("and again", Keys.ENTER)
        check_turn(browser, engine, url, conversation, 0.3, 9)
        users = browser.find_elements(By.CSS_SELECTOR, "#log .user")
        assert [u.text for u in users] == ["hello, page", "and again"]

        browser.find_element(By.ID, "reset").click()  # "new chat": the next request holds only its own message
        assert browser.find_elements(By.CSS_SELECTOR, "#log .msg") == []
        set_input(browser, "temperature", "0")
        set_input(browser, "max_tokens", "6")
        browser.find_element(By.ID, "input").send_keys("fresh start", Keys.ENTER)
        check_turn(browser, engine, url, [{"role": "user", "content": "fresh start"}], 0.0, 6)
