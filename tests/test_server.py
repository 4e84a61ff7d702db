"""The OpenAI-compatible server, through the official ``openai`` client against uvicorn on 127.0.0.1.

Two servers per module: one over a tiny random model (tiny3 with the shipped tokenizer's 6400 ids), whose
answers are checked against the Generator itself; one over a scripted fake generator, whose answers are
chosen text (reasoning, tool calls, failures, slow streams) so the output handling can be checked exactly.
"""

import concurrent.futures
import http.client
import json
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn

from _util import cached_params, tiny
from minimind_jax.chat_format import split_reasoning
from minimind_jax.generate import Generator, SamplingParams
from minimind_jax.model.transformer import MiniMindLM
from minimind_jax.server import create_app, parse_chat_request, token_bytes
from minimind_jax.sse import listening_socket
from minimind_jax.tokenizer import load_tokenizer

HELLO = [{"role": "user", "content": "Hello! Please tell me about the sun."}]  # 17..32 prompt tokens


class _Server:
    def __init__(self, app):
        self.app = app
        sock = listening_socket("127.0.0.1", 0)  # as scripts/serve_openai_api.py serves: a 64 KiB send buffer
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0,
                                    timeout=120)

    def raw(self, method, path, body=None, headers=None):
        """(status, parsed JSON) of a plain HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, json.loads(data)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    cfg = tiny("tiny3", vocab_size=len(tok))
    gen = Generator(cached_params(cfg), cfg)
    server = _Server(create_app(gen, tok, "tiny3", max_batch=4))
    yield server, gen
    server.stop()


def _prompt(tok, messages):
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, sanitize_control_tokens=True)


def _expected(gen, tok, messages, n, seed):
    """What the model answers (sampling at temperature 1 with ``seed``), straight from the Generator."""
    ids = _prompt(tok, messages)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, seed=seed)
    res = gen.generate([ids], n, sampling, eos_ids=(tok.token_to_id("<|im_end|>"),))[0]
    text = tok.decode([t for t in res.tokens if t != 2], skip_special_tokens=True)
    return split_reasoning(text, start_in_reasoning=False)[1], res.finish_reason, len(ids), len(res.tokens)


def _sampled(seed):
    return dict(temperature=1.0, top_p=1.0, seed=seed)


def test_non_streaming_and_streaming_answer_what_the_generator_says(model, tok):
    server, gen = model
    content, finish, n_prompt, n_new = _expected(gen, tok, HELLO, 12, seed=3)
    assert content.strip()
    r = server.client.chat.completions.create(model="tiny3", messages=HELLO, max_tokens=12, **_sampled(3))
    assert r.object == "chat.completion" and r.model == "tiny3" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == content
    assert choice.finish_reason == finish and not choice.message.tool_calls
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, n_new,
                                                                                          n_prompt + n_new)

    chunks = list(server.client.chat.completions.create(
        model="tiny3", messages=HELLO, max_tokens=12, stream=True, stream_options={"include_usage": True},
        **_sampled(3)))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == content and len(pieces) > 3  # streamed piece by piece
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [finish]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_new

    greedy = server.client.chat.completions.create(model="tiny3", messages=HELLO, max_tokens=12, temperature=0)
    ids = _prompt(tok, HELLO)
    expected = tok.decode(gen.generate([ids], 12, eos_ids=(2,))[0].tokens, skip_special_tokens=True)
    assert greedy.choices[0].message.content == expected


def test_two_concurrent_clients_are_decoded_together_and_both_answered(model, tok):
    server, gen = model
    asks = [(HELLO, 12, 5), ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}], 7, 6)]
    expected = [_expected(gen, tok, m, n, seed) for m, n, seed in asks]
    engine = server.app.state.engine
    before = engine.steps_with_rows[2]
    barrier = threading.Barrier(len(asks))

    def ask(i):
        messages, n, seed = asks[i]
        barrier.wait()
        if i == 0:
            return server.client.chat.completions.create(model="tiny3", messages=messages, max_tokens=n,
                                                         **_sampled(seed))
        return "".join(c.choices[0].delta.content or "" for c in server.client.chat.completions.create(
            model="tiny3", messages=messages, max_tokens=n, stream=True, **_sampled(seed)))

    for _ in range(3):  # the two requests normally share decode steps; retry if one ended before the other came
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first, second = pool.map(ask, range(2))
        # each row samples with its own seed: the batch changes nothing
        assert first.choices[0].message.content == expected[0][0]
        assert first.usage.completion_tokens == expected[0][3]
        assert second == expected[1][0]
        if engine.steps_with_rows[2] > before:
            break
    assert engine.steps_with_rows[2] > before


def test_stop_and_seed(model, tok):
    server, gen = model
    content, *_ = _expected(gen, tok, HELLO, 12, seed=3)
    stop = content[4:6]
    r = server.client.chat.completions.create(model="tiny3", messages=HELLO, max_tokens=12, stop=[stop, "never"],
                                              **_sampled(3))
    assert r.choices[0].message.content == content[: content.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    tokens = gen.generate([_prompt(tok, HELLO)], 12, SamplingParams(temperature=1.0, top_p=1.0, seed=3))[0].tokens
    upto = next(k for k in range(1, 13) if stop in tok.decode(tokens[:k], skip_special_tokens=True))
    assert r.usage.completion_tokens == upto  # counted up to the token that completed the stop string
    kw = dict(model="tiny3", messages=HELLO, max_tokens=10)
    a = server.client.chat.completions.create(**kw, **_sampled(7)).choices[0].message.content
    b = server.client.chat.completions.create(**kw, **_sampled(7)).choices[0].message.content
    c = server.client.chat.completions.create(**kw, **_sampled(8), extra_body={"top_k": 50})
    assert a == b != c.choices[0].message.content


def _forward_logprobs(gen, ids):
    """log p(next token | ids[:p + 1]) at every position p: a direct fp32 forward pass, no cache."""
    logits = MiniMindLM(gen.config, gen.policy).apply({"params": gen.params}, jnp.asarray([ids])).logits[0]
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def test_n_choices_and_logprobs_equal_the_generator_and_a_forward_pass(model, tok):
    server, gen = model
    ids, eos = _prompt(tok, HELLO), tok.token_to_id("<|im_end|>")
    kw = dict(model="tiny3", messages=HELLO, max_tokens=10, n=3, logprobs=True, top_logprobs=3, **_sampled(11))
    r = server.client.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    total = 0
    for i, choice in enumerate(r.choices):  # choice i is what seed 11 + i gives alone
        content, finish, _, n_new = _expected(gen, tok, HELLO, 10, seed=11 + i)
        assert (choice.message.content, choice.finish_reason) == (content, finish)
        total += n_new
        tokens = gen.generate([ids], 10, SamplingParams(temperature=1.0, top_p=1.0, seed=11 + i),
                              eos_ids=(eos,))[0].tokens
        reply = tokens[:-1] if tokens[-1] == eos else tokens
        logp = _forward_logprobs(gen, ids + reply)[len(ids) - 1:]  # row j: the distribution of reply token j
        entries = choice.logprobs.content
        assert len(entries) == len(reply)
        np.testing.assert_allclose([e.logprob for e in entries], logp[np.arange(len(reply)), reply], atol=1e-5)
        for e, row in zip(entries, logp):
            best = np.argsort(-row)[:3]
            np.testing.assert_allclose([a.logprob for a in e.top_logprobs], row[best], atol=1e-5)
            assert [bytes(a.bytes) for a in e.top_logprobs] == [token_bytes(tok, t) for t in best]
        raw = b"".join(bytes(e.bytes) for e in entries)
        assert raw.decode("utf-8", "replace") == tok.decode(reply)  # the tokens' bytes spell the reply
    assert r.usage.completion_tokens == total and len({c.message.content for c in r.choices}) > 1

    chunks = list(server.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    for i, choice in enumerate(r.choices):  # each choice's chunks, joined, are its plain answer
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]
        streamed = [e for c in mine if c.logprobs for e in c.logprobs.content]
        assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in choice.logprobs.content]
        np.testing.assert_allclose([e.logprob for e in streamed], [e.logprob for e in choice.logprobs.content],
                                   atol=1e-6)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == total

    plain = server.client.chat.completions.create(model="tiny3", messages=HELLO, max_tokens=4, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert server.client.chat.completions.create(model="tiny3", messages=HELLO, max_tokens=4).choices[0].logprobs is None


def test_invalid_requests_get_openai_errors(model):
    server, _ = model
    status, body = server.raw("POST", "/v1/chat/completions", body=b'{"messages": [')
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    for bad, param in [({"model": "tiny3"}, "messages"), ({"messages": []}, "messages"),
                       ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
                       ({"messages": [{"role": "user"}]}, "messages[0].content"),
                       ({"messages": HELLO, "temperature": 5}, "temperature"),
                       ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
                       ({"messages": HELLO, "max_tokens": 600}, "max_tokens"),  # beyond the 512-token context
                       ({"messages": HELLO, "n": 9}, "n"), ({"messages": HELLO, "n": 0}, "n"),
                       ({"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),  # without logprobs
                       ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                       ({"messages": HELLO, "logprobs": "yes"}, "logprobs"),
                       ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                        "messages[0].content[0]"),
                       ([1, 2], None)]:
        status, body = server.raw("POST", "/v1/chat/completions", body=json.dumps(bad).encode())
        assert status == 400 and body["error"]["param"] == param, (bad, body)
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="tiny3", messages=[{"role": "user", "content": "word " * 600}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model="tiny3", messages=HELLO, top_p=1.5, stream=True)
    assert server.raw("GET", "/v1/nowhere")[0] == 404
    status, body = server.raw("GET", "/v1/chat/completions")
    assert status == 405 and "error" in body


def test_models_and_health(model):
    server, gen = model
    assert [m.id for m in server.client.models.list()] == ["tiny3"]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(gen.params))
    status, health = server.raw("GET", "/health")
    assert status == 200 and health.pop("tokens_per_s") >= 0
    assert health == {"status": "ok", "model": "tiny3", "parameters": n_params, "queued": 0, "slots": 4,
                      "slots_in_use": 0}


# ---------------------------------------------------------------------------------------------- a scripted model


class ScriptedGenerator:
    """Generator stand-in with its own decode slots (the engine's decoder): every slot answers a fixed text
    (picked by a keyword in its prompt), one token per step, then eos; records every request (prompt text,
    tokens given, whether its slot was released). "FAIL" raises in the prefill, "FAIL_LATER" in the step
    after its second token; while a "SLOW" or "HOLD" row is decoded every step takes 30 ms."""

    def __init__(self, tok, slots: int = 8):
        self.tok = tok
        self.config = types.SimpleNamespace(vocab_size=len(tok), max_position_embeddings=512)
        self.eos_ids = (2,)
        self.slots, self.cache_len = slots, 512
        self.active = np.zeros(slots, bool)
        self.records = []  # {"prompt", "tokens", "released"} per request, in the order they were prefilled
        self._script = [None] * slots

    def script(self, prompt: str) -> str:
        if "THINK" in prompt:
            body = "Let me think.\n</think>\n\nThe answer is 4."
            return body if prompt.endswith("<think>\n") else "<think>\n" + body
        if "TOOL" in prompt:
            if "<tools>" not in prompt:
                return "I have no tools."
            return ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
        if "SLOW" in prompt:
            return "slow " * 40
        if "HOLD" in prompt:
            return "wait " * 400
        return "Hi there."

    def prefill(self, slot, prompt_ids, sampling):
        text = self.tok.decode(prompt_ids)
        if "FAIL" in text and "FAIL_LATER" not in text:
            raise RuntimeError("scripted failure")
        script = self.tok.encode(self.script(text), add_special_tokens=False) + [self.eos_ids[0]]
        record = {"prompt": text, "tokens": script[:1], "released": False}
        self.records.append(record)
        self._script[slot] = (record, script)
        self.active[slot] = True
        return script[0]

    def step(self):
        live = [self._script[s] for s in np.flatnonzero(self.active)]
        if any("SLOW" in r["prompt"] or "HOLD" in r["prompt"] for r, _ in live):
            time.sleep(0.03)
        if any("FAIL_LATER" in r["prompt"] and len(r["tokens"]) == 2 for r, _ in live):
            raise RuntimeError("scripted failure mid-stream")
        out = np.zeros(self.slots, np.int64)
        for slot in np.flatnonzero(self.active):
            record, script = self._script[slot]
            record["tokens"].append(script[min(len(record["tokens"]), len(script) - 1)])
            out[slot] = record["tokens"][-1]
        return out

    def release(self, slot):
        self.active[slot] = False
        self._script[slot][0]["released"] = True

    def reset(self):
        for slot in np.flatnonzero(self.active):
            self.release(slot)


@pytest.fixture(scope="module")
def scripted(tok):
    gen = ScriptedGenerator(tok)
    server = _Server(create_app(gen, tok, "scripted", decoder=gen))
    yield server, gen
    server.stop()


def _user(text):
    return [{"role": "user", "content": text}]


WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}]


def test_reasoning_content(scripted):
    server, _ = scripted
    for extra in [None, {"chat_template_kwargs": {"open_thinking": True}}]:  # model opens <think> / prompt does
        m = server.client.chat.completions.create(model="scripted", messages=_user("THINK"), extra_body=extra)
        message = m.choices[0].message
        assert message.content == "The answer is 4." and message.reasoning_content == "Let me think."
        chunks = list(server.client.chat.completions.create(model="scripted", messages=_user("THINK"), stream=True,
                                                            extra_body=extra))
        deltas = [c.choices[0].delta for c in chunks]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Let me think."
        assert "".join(d.content or "" for d in deltas) == "The answer is 4."
        assert not any("<" in (d.content or "") + (getattr(d, "reasoning_content", None) or "") for d in deltas)
    plain = server.client.chat.completions.create(model="scripted", messages=_user("hello")).choices[0].message
    assert plain.content == "Hi there." and getattr(plain, "reasoning_content", None) is None


def test_tool_calls(scripted):
    server, _ = scripted
    r = server.client.chat.completions.create(model="scripted", messages=_user("TOOL"), tools=WEATHER)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(server.client.chat.completions.create(model="scripted", messages=_user("TOOL"), tools=WEATHER,
                                                        stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Checking."
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        (0, "get_weather", {"city": "Paris"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the tool result goes back through the template; without tools nothing is parsed
    follow = _user("TOOL") + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    assert server.client.chat.completions.create(model="scripted", messages=follow).choices[0].message.content == \
        "I have no tools."
    none = server.client.chat.completions.create(model="scripted", messages=_user("TOOL"), tools=WEATHER, tool_choice="none")
    assert none.choices[0].message.content == "I have no tools." and not none.choices[0].message.tool_calls


def test_generation_failure_is_a_500_and_the_server_goes_on(scripted):
    server, _ = scripted
    with pytest.raises(openai.InternalServerError) as e:
        server.client.chat.completions.create(model="scripted", messages=_user("FAIL"))
    assert "scripted failure" in e.value.message
    with pytest.raises(openai.APIError, match="mid-stream"):
        for _ in server.client.chat.completions.create(model="scripted", messages=_user("FAIL_LATER"), stream=True):
            pass
    assert server.client.chat.completions.create(model="scripted", messages=_user("x")).choices[0].message.content == \
        "Hi there."


def test_queued_requests_join_the_running_decode_and_a_dropped_stream_stops(scripted):
    server, gen = scripted
    engine = server.app.state.engine
    slow = server.client.chat.completions.create(model="scripted", messages=_user("SLOW"), stream=True)
    next(iter(slow))  # the slow row is being decoded: the next three join it, without waiting for its end
    record = gen.records[-1]
    before = list(engine.steps_with_rows)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(server.client.chat.completions.create, model="scripted", messages=_user(f"q{i}"))
                   for i in range(3)]
        answers = [f.result(timeout=60).choices[0].message.content for f in futures]
    assert answers == ["Hi there."] * 3 and not record["released"]  # answered while the slow row ran
    assert sum(engine.steps_with_rows[3:]) > sum(before[3:])  # steps with the slow row and two others or more
    slow.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while not record["released"]:
        assert time.monotonic() < deadline, "the abandoned row's slot was not freed"
        time.sleep(0.01)
    assert len(record["tokens"]) < 41  # it stopped before the end of its answer


def test_parse_chat_request_defaults_and_extensions():
    req = parse_chat_request({"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                             {"type": "text", "text": "b"}]}],
                              "temperature": 0, "stop": "END", "max_completion_tokens": 5, "seed": -1,
                              "chat_template_kwargs": {"enable_thinking": True}})
    assert req.messages == [{"role": "system", "content": "a\nb"}]
    assert req.sampling.is_greedy and req.stop == ["END"] and req.max_tokens == 5
    assert req.sampling.seed == 2 ** 32 - 1 and req.template_kwargs == {"open_thinking": True}
    req = parse_chat_request({"messages": _user("x"), "top_k": 3, "repetition_penalty": 1.1})
    assert (req.sampling.top_k, req.sampling.repetition_penalty, req.sampling.is_greedy) == (3, 1.1, False)
    assert req.max_tokens is None and req.tools is None and not req.stream
    req = parse_chat_request({"messages": _user("x"), "n": 3, "logprobs": True, "seed": 2 ** 32 - 1})
    assert (req.n, req.logprobs, req.top_logprobs) == (3, True, 0)
    assert [req.choice_sampling(i).seed for i in range(3)] == [2 ** 32 - 1, 0, 1]


def test_token_bytes_spell_the_text(tok):
    text = "你好 world <think>é\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert b"".join(token_bytes(tok, t) for t in ids) == text.encode("utf-8")
