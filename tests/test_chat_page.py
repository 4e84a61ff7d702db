"""The chat page at ``/`` in a real browser: headless Chromium driven by selenium against the server on 127.0.0.1.

The server runs the tiny random model (tiny3 with the shipped tokenizer's 6400 ids) through its real engine;
the page is typed into and clicked like a person would. What the page shows is checked against the tokens the
engine generated for each request (and each request's prompt against the conversation so far), the thinking
switch against the prompt and where the text lands, and the stop button against the server: the slot of the
row it stops must be freed. A screenshot of the two-turn conversation (the second reply's thinking
collapsed) is saved to ``out/test-artifacts/chat_page.png``.

Skips (with the reason) without selenium or without Debian's ``chromium`` and ``chromium-driver`` (``.ci/run``
installs them when missing).
"""

import json
import os
import pathlib
import shutil
import threading
import time

import pytest

from _util import cached_params, tiny
from minimind_jax.chat_format import split_reasoning
from minimind_jax.engine import SlotDecoder
from minimind_jax.generate import Generator
from minimind_jax.server import create_app
from minimind_jax.tokenizer import load_tokenizer
from test_server import _Server

pytest.importorskip("selenium", reason="selenium is not installed (it is in the dev extra: pip install -e '.[dev]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver on PATH "
                                       "(apt-get install chromium chromium-driver)")

SCREENSHOT = pathlib.Path(__file__).resolve().parents[1] / "out" / "test-artifacts" / "chat_page.png"
TURN_TOKENS = 24  # a full reply of the first two turns
LONG_TOKENS = 400  # the reply stopped mid-stream: ~3 s of decoding on two CPU cores

# Everything the page shows, read in one go: header, error box, buttons and every message of the log.
PAGE_STATE_JS = """
const text = (node) => node ? node.textContent : null;
return {
  model: text(document.getElementById("model")),
  error: document.getElementById("error").hidden ? null : text(document.getElementById("error")),
  sendDisabled: document.getElementById("send").disabled,
  stopDisabled: document.getElementById("stop").disabled,
  bold: document.querySelectorAll("#log b").length,
  messages: Array.from(document.querySelectorAll("#log .msg")).map((m) => ({
    role: m.classList.contains("user") ? "user" : "assistant",
    content: text(m.querySelector(".content")),
    think: text(m.querySelector(".think .think-text")),
    thinkOpen: m.querySelector(".think") ? m.querySelector(".think").open : null,
    finish: m.dataset.finish || null,
  })),
};
"""


class RecordingDecoder:
    """The server's decode slots over the tiny model, recording every request the engine puts in a slot: its
    prompt, its tokens so far, and whether the engine has let go of it (the slot is free)."""

    def __init__(self, decoder: SlotDecoder):
        self.decoder = decoder
        self.requests: list[dict] = []
        self._in_slot: dict[int, dict] = {}

    def __getattr__(self, name):  # slots, cache_len, active, reset
        return getattr(self.decoder, name)

    def prefill(self, slot, prompt_ids, sampling):
        record = {"prompt": list(prompt_ids), "tokens": [], "closed": threading.Event()}
        self.requests.append(record)
        record["tokens"].append(self.decoder.prefill(slot, prompt_ids, sampling))
        self._in_slot[slot] = record
        return record["tokens"][0]

    def step(self):
        tokens = self.decoder.step()
        for slot, record in self._in_slot.items():
            record["tokens"].append(int(tokens[slot]))
        return tokens

    def release(self, slot):
        self.decoder.release(slot)
        self._in_slot.pop(slot)["closed"].set()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def served(tok):
    cfg = tiny("tiny3", vocab_size=len(tok))
    generator = Generator(cached_params(cfg), cfg)
    gen = RecordingDecoder(SlotDecoder.for_generator(generator, slots=1))
    server = _Server(create_app(generator, tok, "tiny3", decoder=gen))
    yield server, gen
    server.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver  # selenium is optional (the dev extra): imported once the skip checks pass
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,900", "--disable-extensions", "--no-first-run"]:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _state(driver) -> dict:
    return driver.execute_script(PAGE_STATE_JS)


def _wait(driver, what: str, predicate, timeout: float = 60.0) -> dict:
    """Polls the page state until ``predicate(state)`` holds; fails naming ``what`` with the last state."""
    deadline = time.monotonic() + timeout
    while True:
        state = _state(driver)
        if predicate(state):
            return state
        if time.monotonic() > deadline:
            pytest.fail(f"the page did not show {what} within {timeout:.0f} s; it shows {json.dumps(state)}")
        time.sleep(0.02)


def _set(driver, element_id: str, value) -> None:
    driver.execute_script("document.getElementById(arguments[0]).value = arguments[1];", element_id, str(value))


def _type(driver, text: str, *, enter: bool) -> None:
    """Types a message into the composer and sends it with Enter or the Send button."""
    from selenium.webdriver.common.by import By  # selenium is optional (the dev extra)
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    if enter:
        box.send_keys(Keys.ENTER)
    else:
        driver.find_element(By.ID, "send").click()


def _click(driver, element_id: str) -> None:
    from selenium.webdriver.common.by import By  # selenium is optional (the dev extra)

    driver.find_element(By.ID, element_id).click()


def _server_reply(record: dict, tok, *, thinking: bool) -> tuple[str | None, str, str]:
    """(reasoning, content, finish reason) of the tokens the server's engine generated for one request."""
    eos = {2, tok.token_to_id("<|im_end|>")}
    tokens = record["tokens"]
    text = tok.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
    finish = "stop" if tokens and tokens[-1] in eos else "length"
    return (*split_reasoning(text, start_in_reasoning=thinking), finish)


def _one_stream(gen, since: int) -> dict:
    """The record of the one request the engine decoded for one message sent after ``since`` requests."""
    new = gen.requests[since:]
    assert len(new) == 1, f"the engine decoded {len(new)} requests for one message (this test records those)"
    return new[0]


def _save_screenshot(driver) -> None:
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    partial = SCREENSHOT.with_suffix(".partial.png")
    assert driver.save_screenshot(str(partial)), "chromium could not take a screenshot"
    os.replace(partial, SCREENSHOT)
    print(f"chat page screenshot: {SCREENSHOT}")


def _two_turns(driver, gen, tok):
    """Turn 1 plain (sent with Enter), turn 2 with thinking on (sent with the button): each reply shows what the
    server generated, the second's reasoning in a thinking block that is collapsed when the reply ends."""
    _set(driver, "max-tokens", TURN_TOKENS)
    first = "Hello <b>there</b>"  # shown as text: no <b> element appears
    n_streams = len(gen.requests)
    _type(driver, first, enter=True)
    state = _wait(driver, "the first reply finished", lambda s: len(s["messages"]) == 2 and s["messages"][1]["finish"])
    user, reply = state["messages"]
    assert (user["role"], user["content"]) == ("user", first) and state["bold"] == 0
    record = _one_stream(gen, n_streams)
    assert record["prompt"] == tok.apply_chat_template([{"role": "user", "content": first}], add_generation_prompt=True,
                                                       tokenize=True, sanitize_control_tokens=True, open_thinking=False)
    reasoning, content, finish = _server_reply(record, tok, thinking=False)
    assert content.strip() and reasoning is None and len(record["tokens"]) <= TURN_TOKENS
    assert (reply["role"], reply["content"], reply["think"], reply["finish"]) == ("assistant", content, None, finish)

    _click(driver, "thinking")
    second = "And what about the moon?"
    _type(driver, second, enter=False)
    state = _wait(driver, "the second reply finished", lambda s: len(s["messages"]) == 4 and s["messages"][3]["finish"])
    record = _one_stream(gen, n_streams + 1)
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": content},
               {"role": "user", "content": second}]
    assert record["prompt"] == tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True,
                                                       sanitize_control_tokens=True, open_thinking=True)
    reasoning, content, finish = _server_reply(record, tok, thinking=True)
    reply = state["messages"][3]
    assert state["messages"][2]["content"] == second
    assert reasoning and (reply["think"], reply["content"], reply["finish"]) == (reasoning, content, finish)
    assert reply["thinkOpen"] is False
    assert not state["sendDisabled"] and state["stopDisabled"] and state["error"] is None
    _save_screenshot(driver)


def _start_long_reply(driver, gen) -> dict:
    """A new chat whose long reply is seen growing on the page; returns the server's record of its stream. A sampled
    reply may end on its own (eos) before that is seen: then it starts over, up to three times."""
    for _ in range(3):
        _click(driver, "new-chat")
        assert _state(driver)["messages"] == []
        n_streams = len(gen.requests)
        _type(driver, "Tell me a long story.", enter=True)
        grown = []
        state = _wait(driver, "the reply growing while streamed", lambda s: len(s["messages"]) == 2 and (
            s["messages"][1]["finish"] or grown.append(len(s["messages"][1]["content"])) or len(set(grown) - {0}) >= 3))
        if state["messages"][1]["finish"] is None:
            assert not state["stopDisabled"] and state["sendDisabled"]
            return _one_stream(gen, n_streams)
    pytest.fail(f"three long replies in a row ended by themselves: {state['messages'][1]}")


def _stop_mid_stream(driver, gen, tok):
    """A long reply: it grows on the page while streamed; Stop ends it there, and the server stops decoding it."""
    _click(driver, "thinking")
    _set(driver, "max-tokens", LONG_TOKENS)
    record = _start_long_reply(driver, gen)
    _click(driver, "stop")
    at_click = len(record["tokens"])
    state = _wait(driver, "the stopped reply", lambda s: s["messages"][1]["finish"] == "stopped", timeout=10)
    assert record["closed"].wait(5), "the server still decodes the stopped reply 5 s after Stop"
    decoded = len(record["tokens"])
    print(f"stop: {at_click} tokens decoded at the click, {decoded} when the server let go of the row")
    assert decoded < LONG_TOKENS, f"the server decoded the stopped reply to its limit ({decoded} tokens)"
    assert decoded - at_click <= 40, f"the server decoded {decoded - at_click} more tokens after Stop"
    _, content, _ = _server_reply(record, tok, thinking=False)
    shown = state["messages"][1]["content"]
    assert shown and content.startswith(shown) and state["error"] is None  # what had streamed in before Stop
    assert not state["sendDisabled"] and state["stopDisabled"]
    return state["messages"][1]["content"]


def test_chat_page_in_a_browser(served, browser, tok):
    server, gen = served
    browser.get(f"http://127.0.0.1:{server.port}/")
    state = _wait(browser, "the model's name", lambda s: s["model"].startswith("tiny3"), timeout=20)
    n_params = server.raw("GET", "/health")[1]["parameters"]
    assert state["model"] == f"tiny3 · {n_params / 1e6:.1f}M parameters"

    _two_turns(browser, gen, tok)
    stopped = _stop_mid_stream(browser, gen, tok)

    # the page goes on after a stop: the stopped reply stays, and a request too long for the context is an error
    _set(browser, "max-tokens", 100000)
    _type(browser, "One more?", enter=False)
    state = _wait(browser, "the error", lambda s: s["error"] is not None, timeout=20)
    assert "context" in state["error"] and state["messages"][1]["content"] == stopped
    assert not state["sendDisabled"]
    health = server.raw("GET", "/health")[1]
    assert health["queued"] == 0 and health["slots_in_use"] == 0
