"""POST /v1/completions (minimind_jax.completions) on a tiny model with the bundled tokenizer's vocabulary:
echoed prompt log-probs equal a direct forward pass, the openai client reads the fields, bad input is a 400."""

import concurrent.futures
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import cached_params
from fastapi import FastAPI
from fastapi.testclient import TestClient

from minimind_jax import ModelConfig
from minimind_jax.completions import completions_router
from minimind_jax.generate import Generator, SamplingParams
from minimind_jax.model.transformer import MiniMindLM
from minimind_jax.server import create_app
from minimind_jax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def served():
    cfg = ModelConfig.preset("tiny3", vocab_size=6400)
    params = jax.tree.map(lambda x: x * 3.0, cached_params(cfg))
    gen = Generator(params, cfg, eos_ids=())
    tok = load_tokenizer()
    app = FastAPI()
    app.include_router(completions_router(gen, tok, "tiny"))
    return TestClient(app), cfg, params, tok


def _direct_logprobs(cfg, params, ids):
    logits = MiniMindLM(cfg).apply({"params": params}, jnp.asarray([ids])).logits[0].astype(jnp.float32)
    lp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    return [lp[i - 1, ids[i]] for i in range(1, len(ids))], lp


def test_echo_logprobs_equal_a_forward_pass(served):
    client, cfg, params, tok = served
    text = "The sky is blue. 天空是蓝色的。"
    r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = tok.encode(text, add_special_tokens=False)
    want, lp = _direct_logprobs(cfg, params, ids)
    block = choice["logprobs"]
    assert choice["text"] == text and block["token_logprobs"][0] is None and block["top_logprobs"][0] is None
    np.testing.assert_allclose(block["token_logprobs"][1:], want, atol=1e-5)
    assert "".join(block["tokens"]) == text
    assert block["text_offset"] == [len("".join(block["tokens"][:i])) for i in range(len(ids))]
    best = np.argsort(-lp[0])[:3]
    np.testing.assert_allclose(sorted(block["top_logprobs"][1].values(), reverse=True), lp[0][best], atol=1e-5)
    # token-id prompts, a batch of them, score the same
    r2 = client.post("/v1/completions", json={"prompt": [ids, ids[:4]], "max_tokens": 0, "echo": True,
                                              "logprobs": 0})
    got = r2.json()["choices"]
    np.testing.assert_allclose(got[0]["logprobs"]["token_logprobs"][1:], want, atol=1e-5)
    np.testing.assert_allclose(got[1]["logprobs"]["token_logprobs"][1:], want[:3], atol=1e-5)


def test_openai_client_generation_n_stop_seed(served):
    openai = pytest.importorskip("openai")
    client, cfg, params, tok = served
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)
    out = api.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2,
                                 n=2)
    assert len(out.choices) == 2 and out.choices[0].text == out.choices[1].text  # greedy: n rows agree
    assert len(out.choices[0].logprobs.tokens) == 6 and all(len(t) <= 2 for t in out.choices[0].logprobs.top_logprobs)
    assert out.usage.completion_tokens == 12
    a = api.completions.create(model="tiny", prompt="Hi", max_tokens=5, temperature=1.0, seed=3)
    b = api.completions.create(model="tiny", prompt="Hi", max_tokens=5, temperature=1.0, seed=3)
    assert a.choices[0].text == b.choices[0].text
    # token-id prompts (a batch of them), echo and top_p through the client
    ids = tok.encode("Once upon a time", add_special_tokens=False)
    both = api.completions.create(model="tiny", prompt=[ids, ids[:2]], max_tokens=0, echo=True, logprobs=1,
                                  top_p=0.5)
    assert [c.text for c in both.choices] == [tok.decode(ids), tok.decode(ids[:2])]
    np.testing.assert_allclose(both.choices[0].logprobs.token_logprobs[1:], _direct_logprobs(cfg, params, ids)[0],
                               atol=1e-5)
    assert both.usage.prompt_tokens == len(ids) + 2 and both.usage.completion_tokens == 0
    nucleus = api.completions.create(model="tiny", prompt="Hi", max_tokens=5, temperature=1.0, top_p=1e-6, seed=9)
    greedy = api.completions.create(model="tiny", prompt="Hi", max_tokens=5, temperature=0)
    assert nucleus.choices[0].text == greedy.choices[0].text  # a tiny top_p keeps only the best token
    full = api.completions.create(model="tiny", prompt="Hi", max_tokens=8, temperature=0).choices[0].text
    if len(full) > 2:
        cut = api.completions.create(model="tiny", prompt="Hi", max_tokens=8, temperature=0, stop=[full[2]])
        assert cut.choices[0].text == full[:full.index(full[2])] and cut.choices[0].finish_reason == "stop"


def test_bad_requests_are_400s(served):
    client, cfg, _, _ = served
    r = client.post("/v1/completions", json={"prompt": "x", "logprobs": 21})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    r = client.post("/v1/completions", json={"prompt": [5] * cfg.max_position_embeddings, "max_tokens": 1})
    assert r.status_code == 400 and str(cfg.max_position_embeddings) in r.json()["error"]["message"]
    for body in ({"prompt": []}, {"prompt": [[1, 99999]]}, {"prompt": "x", "stop": 3}, {"prompt": "x", "n": 0}):
        assert client.post("/v1/completions", json=body).status_code == 400
    assert client.post("/v1/completions", content=b"{not json").status_code == 400


def test_the_server_app_serves_completions(served):
    _, cfg, params, tok = served
    with TestClient(create_app(Generator(params, cfg), tok, "tiny")) as client:
        r = client.post("/v1/completions", json={"prompt": [1, 5, 9], "max_tokens": 0, "echo": True, "logprobs": 1})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["choices"][0]["logprobs"]["token_logprobs"][1:],
                                   _direct_logprobs(cfg, params, [1, 5, 9])[0], atol=1e-5)
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
        r = client.post("/v1/completions", json={"prompt": [1, 5, 9], "max_tokens": 3, "stream": True,
                                                 "stream_options": {"include_usage": True}})
        events = r.text.split("\n\n")
        assert r.status_code == 200 and events[-2] == "data: [DONE]"
        assert json.loads(events[-3][len("data: "):])["usage"]["completion_tokens"] == 3


def test_the_server_prefills_long_prompts_in_the_chunks_it_is_given(served):
    """``prefill_chunk`` reaches the engine's decoder: a 40-token prompt goes in chunks of 16 and still gives
    the Generator's greedy tokens; a chunk of 0 tokens is refused when the app is made."""
    _, cfg, params, tok = served
    gen = Generator(params, cfg)
    app = create_app(gen, tok, "tiny", max_batch=2, prefill_chunk=16, prefill_chunk_scores=16 * 64)
    assert (app.state.engine.decoder.chunk_tokens, app.state.engine.decoder.chunk_scores) == (16, 1024)
    prompt = [(7 * i) % 200 + 3 for i in range(40)]
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
    expected = gen.generate([prompt], 5, [SamplingParams(temperature=0.0)], eos_ids=tuple(app.state.engine.eos_ids))
    assert r.json()["choices"][0]["text"] == tok.decode(
        [t for t in expected[0].tokens if t not in app.state.engine.eos_ids])
    with pytest.raises(ValueError, match="chunk_tokens"):
        create_app(gen, tok, "tiny", prefill_chunk=0)


def _stream(api, **kwargs) -> tuple[dict, list, object]:
    """The streamed choices joined per index ({index: (text, logprobs lists, finish)}), the chunks, the usage."""
    joined, chunks, usage = {}, [], None
    for chunk in api.completions.create(stream=True, **kwargs):
        chunks.append(chunk)
        if not chunk.choices:
            usage = chunk.usage
            continue
        assert len(chunk.choices) == 1 and chunk.object == "text_completion"
        c = chunk.choices[0]
        text, lists, finish = joined.get(c.index, ("", {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                         "text_offset": []}, None))
        assert finish is None, "nothing follows a choice's finish_reason"
        if c.logprobs is not None:
            for key in lists:
                lists[key] += getattr(c.logprobs, key)
        joined[c.index] = (text + c.text, lists, c.finish_reason)
    return joined, chunks, usage


def _same_logprobs(streamed: dict, choice) -> None:
    want = choice.logprobs
    assert streamed["tokens"] == want.tokens and streamed["text_offset"] == want.text_offset
    np.testing.assert_allclose([np.nan if v is None else v for v in streamed["token_logprobs"]],
                               [np.nan if v is None else v for v in want.token_logprobs], atol=1e-6)
    for got, exp in zip(streamed["top_logprobs"], want.top_logprobs):
        assert (got is None) == (exp is None)
        if got is not None:
            assert got.keys() == exp.keys()
            np.testing.assert_allclose([got[t] for t in exp], list(exp.values()), atol=1e-6)


@pytest.mark.parametrize("echo", [False, True])
def test_stream_equals_the_plain_response(served, echo):
    openai = pytest.importorskip("openai")
    client, cfg, params, tok = served
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)
    ask = dict(model="tiny", prompt=["Once upon a time", "天空是"], max_tokens=7, temperature=0.9, seed=5, n=2,
               logprobs=2, echo=echo)
    plain = api.completions.create(**ask)
    joined, chunks, usage = _stream(api, stream_options={"include_usage": True}, **ask)
    assert sorted(joined) == [0, 1, 2, 3] and len(plain.choices) == 4
    for choice in plain.choices:
        text, lists, finish = joined[choice.index]
        assert text == choice.text and finish == choice.finish_reason == "length"
        _same_logprobs(lists, choice)
    assert joined[0][0] != joined[1][0]  # the n rows of a prompt draw from their own seeds
    assert usage is not None and usage.model_dump() == plain.usage.model_dump()
    assert chunks[-1].usage is usage and all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].model == "tiny"
    # without stream_options there is no usage chunk and no usage key
    joined2, chunks2, usage2 = _stream(api, **ask)
    assert usage2 is None and all(c.choices for c in chunks2) and joined2 == joined


def test_stream_holds_back_stop_strings_and_ends_at_eos(served):
    openai = pytest.importorskip("openai")
    client, cfg, params, tok = served
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)
    ask = dict(model="tiny", prompt="The sky is", max_tokens=12, temperature=0)
    plain = api.completions.create(logprobs=0, **ask).choices[0]
    full, pieces = plain.text, plain.logprobs.tokens
    # a stop string that starts in one streamed step's text (token j's) and ends in the next one's
    j = next(j for j in range(1, len(pieces) - 1) if "\ufffd" not in pieces[j] + pieces[j + 1]
             and pieces[j].strip() and pieces[j + 1].strip())
    stop = pieces[j][-1] + pieces[j + 1][:2]
    joined, chunks, _ = _stream(api, stop=[stop, "never-there"], **ask)
    text, _, finish = joined[0]
    assert text == full[:full.index(stop)] and finish == "stop"
    # a prefix of a stop string at the end is held back while it might complete, then sent
    joined, _, _ = _stream(api, stop=[full[-2:] + "\x00"], logprobs=0, **ask)
    assert joined[0][0] == full and joined[0][2] == "length" and "".join(joined[0][1]["tokens"]) == full
    # an eos the row stops on: finish_reason stop, its log-prob in the last chunk, as without stream
    eos = Generator(params, cfg, eos_ids=()).generate([tok.encode("The sky is", add_special_tokens=False)],
                                                      12)[0].tokens[3]
    app = FastAPI()
    app.include_router(completions_router(Generator(params, cfg, eos_ids=(eos,)), tok, "tiny"))
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=TestClient(app))
    plain = api.completions.create(logprobs=1, **ask).choices[0]
    joined, _, _ = _stream(api, logprobs=1, **ask)
    assert plain.finish_reason == joined[0][2] == "stop" and joined[0][0] == plain.text
    _same_logprobs(joined[0][1], plain)


def test_stream_events_and_errors(served):
    client, cfg, params, tok = served
    ids = [1, 5, 9, 14]
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1,
                                             "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    bodies = [json.loads(e[len("data: "):]) for e in events[:-1]]
    echo, last = bodies[0]["choices"][0], bodies[-1]["choices"][0]
    np.testing.assert_allclose(echo["logprobs"]["token_logprobs"][1:], _direct_logprobs(cfg, params, ids)[0],
                               atol=1e-5)
    assert echo["text"] == tok.decode(ids) and last["finish_reason"] == "length" and last["text"] == ""
    assert len(bodies) == 2 and all("usage" not in b for b in bodies)
    for body in ({"prompt": "x", "stream": "yes"}, {"prompt": "x", "stream_options": {"include_usage": True}},
                 {"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}},
                 {"prompt": "x", "stream": True, "logprobs": 21}):
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] in ("stream", "stream_options", "logprobs")


def test_completions_run_on_the_engines_slots_beside_chat(served):
    """Through the server, completion rows are decoded on the engine's slots: they give the Generator's tokens
    for their seeds, a chat request joins their running decode, and a full queue is a 429."""
    _, cfg, params, tok = served
    gen = Generator(params, cfg)
    app = create_app(gen, tok, "tiny", max_batch=4)
    engine = app.state.engine
    with TestClient(app) as client:
        body = {"prompt": ["The sky is", "Once upon"], "max_tokens": 6, "n": 2, "seed": 5, "temperature": 1.0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        rows = [tok.encode(p, add_special_tokens=False) for p in body["prompt"] for _ in range(2)]
        samplings = [SamplingParams(temperature=1.0, top_p=1.0, seed=5 + j) for _ in range(2) for j in range(2)]
        expected = gen.generate(rows, 6, samplings, eos_ids=tuple(engine.eos_ids))
        assert [c["text"] for c in r.json()["choices"]] == [
            tok.decode([t for t in e.tokens if t not in engine.eos_ids]) for e in expected]

        before = engine.steps_with_rows[3]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(client.post, "/v1/completions", json={"prompt": [1, 5, 9], "max_tokens": 480, "n": 2})
            deadline = time.monotonic() + 60
            while engine.slots_in_use < 2:
                assert time.monotonic() < deadline and not long.done(), "the completion rows did not start"
                time.sleep(0.005)
            chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                             "max_tokens": 4})
            assert chat.status_code == 200 and not long.done()  # answered while the completion rows ran
            assert engine.steps_with_rows[3] > before  # steps that decoded the two completion rows and the chat row
            assert long.result(120).status_code == 200

    with TestClient(create_app(gen, tok, "tiny", max_batch=1, max_queue=0)) as client:  # nothing may wait
        for stream in (False, True):
            r = client.post("/v1/completions", json={"prompt": [1, 5, 9], "max_tokens": 3, "stream": stream})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
            assert r.json()["error"]["type"] == "rate_limit_error"
        r = client.post("/v1/completions", json={"prompt": [1, 5, 9], "max_tokens": 0, "echo": True, "logprobs": 0})
        assert r.status_code == 200  # scoring alone needs no slot
