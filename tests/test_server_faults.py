"""The server under hostile or unlucky requests: body limits, template injection, hopeless prompts, absurd
sampling values, clients that leave before their answer, more clients than slots and queue, requests that
take too long, a server shutting down."""

import concurrent.futures
import http.client
import json
import socket
import time

import openai
import pytest

from test_server import HELLO, ScriptedGenerator, _Server, _user
from minimind_jax.engine import CHUNK_SCORES, CHUNK_TOKENS
from minimind_jax.server import APIError, create_app, parse_chat_request
from minimind_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def server(tok):
    gen = ScriptedGenerator(tok)
    srv = _Server(create_app(gen, tok, "scripted", decoder=gen, max_body_bytes=64 * 1024, max_prompt_tokens=100))
    yield srv, gen
    srv.stop()


def _post(server, body):
    return server.raw("POST", "/v1/chat/completions", body=json.dumps(body).encode())


def test_body_over_the_limit_is_413(server):
    srv, _ = server
    big = {"messages": [{"role": "user", "content": "x" * 100_000}]}
    status, body = _post(srv, big)
    assert status == 413 and body["error"]["code"] == "body_too_large"
    # without a Content-Length (chunked): refused while it streams in
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    payload = json.dumps(big).encode()
    conn.request("POST", "/v1/chat/completions", body=iter([payload[i:i + 8192] for i in range(0, len(payload), 8192)]),
                 headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"}, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()
    assert srv.raw("GET", "/health")[0] == 200


def test_completions_share_the_body_limit_and_json_checks(server):
    srv, _ = server
    status, body = srv.raw("POST", "/v1/completions", body=json.dumps({"prompt": "x" * 100_000}).encode())
    assert status == 413 and body["error"]["code"] == "body_too_large"
    status, body = srv.raw("POST", "/v1/completions", body=b"[" * 20_000 + b"]" * 20_000)
    assert status == 400 and body["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("kwargs,param", [({"chat_template": "{{ 7 * 7 }}"}, "chat_template_kwargs.chat_template"),
                                          ({"documents": []}, "chat_template_kwargs.documents"),
                                          ({"continue_final_message": True}, "chat_template_kwargs.continue_final_message"),
                                          ({"open_thinking": "yes"}, "chat_template_kwargs.open_thinking"),
                                          ([], "chat_template_kwargs")])
def test_only_the_thinking_switch_reaches_the_template(server, kwargs, param):
    srv, gen = server
    before = len(gen.records)
    status, body = _post(srv, {"messages": HELLO, "chat_template_kwargs": kwargs})
    assert status == 400 and body["error"]["param"] == param, body
    assert len(gen.records) == before  # nothing was generated
    status, body = _post(srv, {"messages": HELLO, "chat_template_kwargs": {"enable_thinking": True}})
    assert status == 200


def test_prompt_limits_name_the_limit(server, tok):
    srv, _ = server
    # over --max-prompt-tokens (100) but within the body limit
    status, body = _post(srv, {"messages": [{"role": "user", "content": "word " * 300}]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded" and "limit is 100" in body["error"]["message"]
    # far beyond what 100 tokens can hold: refused before tokenising
    longest = max(map(len, tok.get_vocab()))
    status, body = _post(srv, {"messages": [{"role": "user", "content": "z" * (100 * longest + 1)}]})
    assert status == 400 and "bytes" in body["error"]["message"]


def test_absurd_sampling_values_are_400(server):
    srv, _ = server
    for bad, param in [({"top_k": 10 ** 30}, "top_k"), ({"top_k": -1}, "top_k")]:
        status, body = _post(srv, {"messages": HELLO, **bad})
        assert status == 400 and body["error"]["param"] == param, body


def test_deeply_nested_json_is_400(server):
    srv, _ = server
    status, body = srv.raw("POST", "/v1/chat/completions", body=b"[" * 20_000 + b"]" * 20_000)
    assert status == 400 and body["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_non_streaming_client_that_leaves_stops_its_generation(server, route):
    srv, gen = server
    request = ({"messages": [{"role": "user", "content": "HOLD please"}]} if route == "/v1/chat/completions"
               else {"prompt": "HOLD please"})
    body = json.dumps({**request, "max_tokens": 450}).encode()
    before = len(gen.records)
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 30
    while len(gen.records) == before or len(gen.records[-1]["tokens"]) < 2:
        assert time.monotonic() < deadline  # its decode has started
        time.sleep(0.01)
    record = gen.records[-1]
    sock.close()
    time.sleep(1.5)  # the scripted HOLD answer takes 400 steps x 30 ms = 12 s when nobody stops it
    assert record["released"] and len(record["tokens"]) < 100, (len(record["tokens"]), record["released"])
    assert srv.raw("GET", "/health")[0] == 200


def test_requests_waiting_on_the_engine_do_not_hold_up_new_ones(tok):
    """40 non-streamed completions generating for 12 s each (8 slots, the rest queued) each wait in a thread;
    a new request is still parsed and answered at once (the loop's default pool of cpu_count + 4 threads
    would be full of waiting ones), and the leaving clients' rows are cancelled."""
    gen = ScriptedGenerator(tok)
    srv = _Server(create_app(gen, tok, "scripted", decoder=gen))
    body = json.dumps({"prompt": "HOLD please", "max_tokens": 450}).encode()
    socks = []
    try:
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", srv.port))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            socks.append(sock)
        deadline = time.monotonic() + 30
        while srv.raw("GET", "/health")[1]["queued"] < 32:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        status, answer = srv.raw("POST", "/v1/chat/completions", body=b"{not json")
        assert status == 400 and answer["error"]["code"] == "invalid_json"
        assert time.monotonic() - t0 < 3.0
    finally:
        for sock in socks:
            sock.close()
        deadline = time.monotonic() + 30
        while srv.raw("GET", "/health")[1]["slots_in_use"]:
            assert time.monotonic() < deadline, "the leaving clients' rows were not cancelled"
            time.sleep(0.1)
        srv.stop()


@pytest.fixture()
def one_slot(tok):
    """A server of one slot and a queue of one; a request not done in 1.5 s times out."""
    gen = ScriptedGenerator(tok, slots=1)
    srv = _Server(create_app(gen, tok, "scripted", decoder=gen, max_queue=1, request_timeout_s=1.5))
    yield srv, gen
    srv.stop()


def test_more_clients_than_slots_and_queue_are_429_and_slow_ones_504(one_slot):
    srv, gen = one_slot
    held = srv.client.chat.completions.create(model="scripted", messages=_user("HOLD"), stream=True)
    chunks = iter(held)
    next(chunks)  # the slot is taken for 400 steps x 30 ms, far beyond the timeout
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_post, srv, {"messages": _user("HOLD again")})
        deadline = time.monotonic() + 30
        while srv.raw("GET", "/health")[1]["queued"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        health = srv.raw("GET", "/health")[1]
        assert (health["slots"], health["slots_in_use"], health["queued"]) == (1, 1, 1)
        status, body = _post(srv, {"messages": HELLO})
        assert status == 429 and body["error"]["code"] == "queue_full" and body["error"]["type"] == "rate_limit_error"
        assert "1 requests are waiting" in body["error"]["message"]
        with pytest.raises(openai.APIError, match="timeout of 1.5 s"):  # the stream ends with an error event
            for _ in chunks:
                pass
        status, body = waiting.result(60)  # it ran out of time too (in the queue, or in the slot after it)
    assert status == 504 and body["error"]["code"] == "timeout", body
    assert gen.records and all(r["released"] for r in gen.records)
    assert srv.raw("GET", "/health")[1]["slots_in_use"] == 0
    answer = srv.client.chat.completions.create(model="scripted", messages=HELLO)
    assert answer.choices[0].message.content == "Hi there."


def test_twenty_clients_against_four_slots(tok):
    """20 clients at once, 4 slots and 8 places in the queue: every client gets an answer or a 429, never an
    error of the server, and the server is idle and answering afterwards."""
    gen = ScriptedGenerator(tok, slots=4)
    srv = _Server(create_app(gen, tok, "scripted", decoder=gen, max_queue=8))
    try:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda i: _post(srv, {"messages": _user(f"SLOW {i}"), "max_tokens": 10}),
                                    range(20)))
        statuses = sorted(status for status, _ in results)
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 9, statuses  # the 8 queued and 1 slot at least
        assert all(body["choices"][0]["message"]["content"].startswith("slow") for status, body in results
                   if status == 200)
        assert not gen.active.any() and len(gen.records) == statuses.count(200)
        health = srv.raw("GET", "/health")[1]
        assert (health["slots_in_use"], health["queued"]) == (0, 0)
    finally:
        srv.stop()


def test_a_server_shutting_down_is_503(one_slot):
    srv, _ = one_slot
    srv.app.state.engine.close()  # what the app's lifespan does when uvicorn stops
    status, body = _post(srv, {"messages": HELLO})
    assert status == 503 and body["error"]["code"] == "shutting_down" and body["error"]["type"] == "server_error"


def test_parse_rejects_template_override():
    with pytest.raises(APIError) as e:
        parse_chat_request({"messages": HELLO, "chat_template_kwargs": {"chat_template": "x"}})
    assert e.value.status == 400


def _get(srv, path):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def test_chat_page_and_health(server):
    srv, _ = server
    status, page = _get(srv, "/")
    assert status == 200 and b'<script src="/static/app.js">' in page
    status, js = _get(srv, "/static/app.js")
    assert status == 200 and b"innerHTML" not in js and b"textContent" in js
    assert _get(srv, "/static/server.py")[0] == 404
    status, body = srv.raw("GET", "/health")
    assert status == 200 and body["model"] == "scripted"


def test_another_model_name_is_a_404_naming_the_served_model(server):
    for route in ("/v1/chat/completions", "/v1/completions"):
        status, body = server[0].raw("POST", route, body=json.dumps(
            {"model": "gpt-4o", "messages": HELLO, "prompt": "x", "max_tokens": 3}).encode())
        assert status == 404 and body["error"]["code"] == "model_not_found", body
        assert body["error"]["param"] == "model" and "'scripted'" in body["error"]["message"]
    status, body = _post(server[0], {"model": "scripted", "messages": HELLO, "max_tokens": 3})
    assert status == 200 and body["model"] == "scripted"
    status, body = _post(server[0], {"messages": HELLO, "max_tokens": 3})  # no model: the served one
    assert status == 200 and body["model"] == "scripted"


def test_any_model_name_is_answered_as_the_served_model_when_asked(tok):
    gen = ScriptedGenerator(tok)
    srv = _Server(create_app(gen, tok, "scripted", decoder=gen, any_model_name=True))
    try:
        status, body = _post(srv, {"model": "gpt-4o", "messages": HELLO, "max_tokens": 3})
        assert status == 200 and body["model"] == "scripted"
    finally:
        srv.stop()


def test_served_name_is_the_run_directory():
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("serve_openai_api", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "serve_openai_api.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.served_name("out/quickstart/sft_128/weights") == "sft_128"
    assert mod.served_name("out/quickstart/sft_128/weights/") == "sft_128"
    assert mod.served_name("MiniMind2") == "MiniMind2"
    args = mod.build_parser().parse_args(["--ckpt", "x", "--cache-len", "512", "--max-queue", "4",
                                          "--request-timeout", "2.5", "--warm-up", "--prefill-chunk", "256"])
    assert (args.cache_len, args.max_queue, args.request_timeout, args.warm_up) == (512, 4, 2.5, True)
    assert (args.prefill_chunk, args.prefill_chunk_scores) == (256, CHUNK_SCORES)
    assert mod.build_parser().parse_args(["--ckpt", "x"]).prefill_chunk == CHUNK_TOKENS
    assert mod.DEFAULT_CACHE_LEN == 4096


class FloodingGenerator(ScriptedGenerator):
    """The scripted decoder with long answers: a "FLOOD" prompt is answered "flood " x 6000, a token every 4 ms
    (about 25 s in all), in slots of 8192 tokens."""

    def __init__(self, tok):
        super().__init__(tok, slots=2)
        self.cache_len = self.config.max_position_embeddings = 8192

    def script(self, prompt: str) -> str:
        return "flood " * 6000 if "FLOOD" in prompt else super().script(prompt)

    def step(self):
        time.sleep(0.004)
        return super().step()


def _never_reading_client(port: int, route: str, body: dict) -> socket.socket:
    """A connection that sends a streamed request and never reads (a small receive buffer: it fills soon)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    data = json.dumps({**body, "stream": True}).encode()
    sock.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_a_client_that_never_reads_its_stream_frees_its_slot(tok, route):
    """The stream's chunks fill the client's and the server's buffers; once no send has gone through for the
    stall time (1 s here) the row is cancelled, long before its 6000 tokens (~25 s) would end it."""
    gen = FloodingGenerator(tok)
    srv = _Server(create_app(gen, tok, "scripted", decoder=gen, stream_stall_s=1.0))
    request = ({"messages": _user("FLOOD please")} if route == "/v1/chat/completions" else {"prompt": "FLOOD please"})
    try:
        start = time.monotonic()
        sock = _never_reading_client(srv.port, route, {**request, "max_tokens": 6000})
        deadline = start + 30
        while not gen.records:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        record = gen.records[-1]
        while not record["released"]:
            assert time.monotonic() < deadline, len(record["tokens"])
            time.sleep(0.05)
        freed_after = time.monotonic() - start
        print(f"freed after {freed_after:.1f} s, {len(record['tokens'])} tokens")
        assert len(record["tokens"]) < 3000 and freed_after < 12, (freed_after, len(record["tokens"]))
        assert srv.raw("GET", "/health")[1]["slots_in_use"] == 0
        # the server answers others meanwhile, and the stalled client gets an error event if it reads at last
        assert srv.client.chat.completions.create(model="scripted", messages=HELLO).choices[0].message.content == "Hi there."
        sock.settimeout(10)
        received = b""
        while b"data: [DONE]" not in received:
            more = sock.recv(65536)
            assert more, received[-300:]
            received += more
        assert b'"code": "stream_not_read"' in received
        sock.close()
    finally:
        srv.stop()
