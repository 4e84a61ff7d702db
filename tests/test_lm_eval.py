"""The lm-eval model ``minimind-jax`` against lm-eval's own ``hf`` model on the converter's HF export of one tiny
model: the same per-request log-likelihoods (fp32, 1e-4), the same accuracy on the bundled multiple-choice
samples, perplexity equal to scripts/eval.py --data, and clear errors for unknown tasks."""

import importlib.util
import json
import math
import pathlib

import jax
import numpy as np
import pytest
from _util import cached_params

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.torch

from lm_eval.api.instance import Instance  # noqa: E402

from minimind_jax.evaluation.harness import MiniMindJaxLM  # noqa: E402
from minimind_jax.evaluation.offline import available_tasks, evaluate, task_configs  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = ["minimind_ceval", "minimind_cmmlu", "minimind_arc"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(ours, lm-eval's hf model, export directory) on the same fp32 weights of a tiny minimind-3 model."""
    pytest.importorskip("transformers")
    import convert
    from lm_eval.models.huggingface import HFLM

    from minimind_jax import ModelConfig
    from minimind_jax.tokenizer import DEFAULT_TOKENIZER_DIR

    cfg = ModelConfig.preset("tiny3", vocab_size=6400)
    params = jax.tree.map(lambda x: x * 3.0, cached_params(cfg))  # sharper logits than the 0.02 init
    hf_dir = tmp_path_factory.mktemp("lm_eval") / "hf"
    convert.save_torch(params, cfg, hf_dir, format="hf", dtype="float32", tokenizer=DEFAULT_TOKENIZER_DIR)
    ours = MiniMindJaxLM(pretrained=str(hf_dir), batch_size=8)
    ref = HFLM(pretrained=str(hf_dir), batch_size=8, dtype="float32", device="cpu")
    return ours, ref, hf_dir


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def test_loglikelihoods_and_accuracy_match_hf(models):
    ours, ref, _ = models
    got = evaluate(ours, TASKS, data_dir=ROOT / "data" / "sample" / "eval", log_samples=True)
    want = evaluate(ref, TASKS, data_dir=ROOT / "data" / "sample" / "eval", log_samples=True)
    for task in TASKS:
        a = sorted(got["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(want["samples"][task], key=lambda s: s["doc_id"])
        assert len(a) == len(b) == 12
        lls_a = np.array([[r[0][0] for r in s["resps"]] for s in a])
        lls_b = np.array([[r[0][0] for r in s["resps"]] for s in b])
        np.testing.assert_allclose(lls_a, lls_b, atol=1e-4, rtol=0)
        assert [[r[0][1] for r in s["resps"]] for s in a] == [[r[0][1] for r in s["resps"]] for s in b]
        for metric in ("acc,none", "acc_norm,none"):
            assert got["results"][task][metric] == want["results"][task][metric]


def test_empty_context_rolling_and_generation_match_hf(models):
    ours, ref, _ = models
    pairs = [("", "Hello world"), ("The sky is", " blue"), ("<|im_start|>user\nhi<|im_end|>\n", "ok")]
    np.testing.assert_allclose([x[0] for x in ours.loglikelihood(_requests("loglikelihood", pairs))],
                               [x[0] for x in ref.loglikelihood(_requests("loglikelihood", pairs))], atol=1e-4)
    texts = [("A short text.",), ("你好，世界！" * 3,)]
    np.testing.assert_allclose(ours.loglikelihood_rolling(_requests("loglikelihood_rolling", texts)),
                               ref.loglikelihood_rolling(_requests("loglikelihood_rolling", texts)), atol=1e-4)
    gen = [("Once upon a time", {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}),
           ("1 + 1 =", {"until": ["."], "max_gen_toks": 8, "do_sample": False})]
    assert ours.generate_until(_requests("generate_until", gen)) == \
        ref.generate_until(_requests("generate_until", gen))


def test_chat_template_matches_hf(models):
    ours, ref, _ = models
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    assert ours.apply_chat_template(chat) == ref.apply_chat_template(chat)
    prefilled = chat + [{"role": "assistant", "content": "The answer is"}]
    assert ours.apply_chat_template(prefilled, add_generation_prompt=False) == \
        ref.apply_chat_template(prefilled, add_generation_prompt=False)


def test_rolling_perplexity_equals_eval_script(models, tmp_path):
    ours, _, hf_dir = models
    records = [json.loads(line) for line in (ROOT / "data" / "sample" / "pretrain.jsonl").open(encoding="utf-8")]
    records = [r for r in records if len(ours.tok_encode(r["text"])) < 200][:3]
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("eval_script", ROOT / "scripts" / "eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    report = tmp_path / "eval.json"
    assert script.main(["--ckpt", str(hf_dir), "--data", str(data), "--max_seq_len", "256", "--json",
                        str(report)]) == 0
    result = json.loads(report.read_text())
    # eval.py scores bos + text + eos; rolling scores the text after the bos prefix, so append the eos
    eos = ours.tokenizer.eos_token
    rolling = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(r["text"] + eos,) for r in records]))
    tokens = sum(len(ours.tok_encode(r["text"] + eos)) for r in records)
    assert tokens == result["tokens"]
    np.testing.assert_allclose(-sum(rolling) / tokens, result["loss"], rtol=1e-5)
    np.testing.assert_allclose(math.exp(-sum(rolling) / tokens), result["perplexity"], rtol=1e-4)


def test_unknown_task_is_a_clear_error(models, tmp_path):
    ours, _, hf_dir = models
    # lm-eval's CLI passes its own --batch_size (default 1); the one in --model_args wins
    assert MiniMindJaxLM.create_from_arg_string(f"pretrained={hf_dir},batch_size=4", {"batch_size": 1}).batch_size == 4
    assert set(TASKS) <= set(available_tasks())
    with pytest.raises(ValueError, match="unknown task no_such_task"):
        evaluate(ours, ["no_such_task"])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        task_configs([str(tmp_path / "missing.yaml")])
    with pytest.raises(FileNotFoundError, match="ceval.jsonl"):
        task_configs(["minimind_ceval"], data_dir=tmp_path)


def test_local_completions_against_our_server_gives_the_same_numbers(models):
    """lm-eval's local-completions model, over HTTP on 127.0.0.1, against the completions route."""
    import socket
    import threading
    import time

    import uvicorn
    from fastapi import FastAPI
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from minimind_jax.completions import completions_router

    ours, _, hf_dir = models
    app = FastAPI()
    app.include_router(completions_router(ours.generator, ours.tokenizer, "tiny"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        remote = LocalCompletionsAPI(base_url=f"http://127.0.0.1:{port}/v1/completions", model="tiny",
                                     tokenizer_backend="huggingface", tokenizer=str(hf_dir), max_retries=1,
                                     max_length=ours.max_length)
        pairs = [("The sky is", " blue"), ("Question: What is 3 plus 4?\nAnswer:", " 7"), ("你好", "，世界")]
        got = remote.loglikelihood(_requests("loglikelihood", pairs))
        want = ours.loglikelihood(_requests("loglikelihood", pairs))
        np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4)
        assert [g[1] for g in got] == [w[1] for w in want]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
