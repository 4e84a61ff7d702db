"""POST /v1/completions (minimind_jax.completions) on a tiny model with the bundled tokenizer's vocabulary:
echoed prompt log-probs equal a direct forward pass, the openai client reads the fields, bad input is a 400."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import cached_params
from fastapi import FastAPI
from fastapi.testclient import TestClient

from minimind_jax import ModelConfig
from minimind_jax.completions import completions_router
from minimind_jax.generate import Generator
from minimind_jax.model.transformer import MiniMindLM
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
    from minimind_jax.server import create_app

    _, cfg, params, tok = served
    with TestClient(create_app(Generator(params, cfg), tok, "tiny")) as client:
        r = client.post("/v1/completions", json={"prompt": [1, 5, 9], "max_tokens": 0, "echo": True, "logprobs": 1})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["choices"][0]["logprobs"]["token_logprobs"][1:],
                                   _direct_logprobs(cfg, params, [1, 5, 9])[0], atol=1e-5)
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
