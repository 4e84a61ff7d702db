"""Generation: the KV-cache decode against full forward passes, left-padded batches, MiniMind's sampling rules,
seeds, eos stopping, streaming, and the precision policies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import cached_params, tiny

from minimind_jax.generate import (
    Generator,
    SamplingParams,
    TextStream,
    _filter,
    _make_rows,
    greedy_generate,
)
from minimind_jax.model.transformer import MiniMindLM

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(3, 20))]  # 5, 3 and 17 tokens: two prompt buckets


def _generator(name, **kw):
    cfg = tiny(name)
    return Generator(cached_params(cfg), cfg, eos_ids=(), **kw), cfg


_FORWARDS = {}


def _forward(model):
    if model not in _FORWARDS:
        _FORWARDS[model] = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
    return _FORWARDS[model]


def _reference_greedy(cfg, params, prompt, n, penalty=1.0):
    """argmax over repeated full forward passes without a cache, MiniMind's repetition penalty included."""
    model = MiniMindLM(cfg)
    fwd = _forward(model)
    ids = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, 32), np.int32)  # right padding: causal attention ignores it, one compile
        padded[0, : len(ids)] = ids
        logits = np.asarray(fwd(params, jnp.asarray(padded))[0, len(ids) - 1], np.float64)
        seen = np.unique(ids)
        logits[seen] /= penalty
        ids.append(int(np.argmax(logits)))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", ["tiny3", "tiny3-moe", "tiny2"])
def test_greedy_with_cache_equals_full_forward_argmax(name):
    gen, cfg = _generator(name)
    results = gen.generate(PROMPTS, 10)
    for prompt, res in zip(PROMPTS, results):
        assert res.tokens == _reference_greedy(cfg, gen.params, prompt, 10)
        assert res.finish_reason == "length"


def test_repetition_penalty_follows_minimind():
    gen, cfg = _generator("tiny3")
    res = gen.generate(PROMPTS[:2], 10, SamplingParams.make_greedy(repetition_penalty=8.0))
    for prompt, r in zip(PROMPTS, res):
        assert r.tokens == _reference_greedy(cfg, gen.params, prompt, 10, penalty=8.0)
    plain = gen.generate(PROMPTS[:2], 10)
    assert [r.tokens for r in res] != [r.tokens for r in plain]  # the penalty did change something


@pytest.mark.parametrize("name", ["tiny3", "tiny2-moe"])
def test_left_padded_batch_equals_one_by_one(name):
    gen, _ = _generator(name)
    batch = gen.generate(PROMPTS, 12)
    for prompt, res in zip(PROMPTS, batch):
        assert gen.generate([prompt], 12)[0].tokens == res.tokens


def test_sampling_is_reproducible_per_seed_and_row():
    gen, _ = _generator("tiny3")
    s = SamplingParams(temperature=1.0, top_p=1.0, seed=3)
    a = gen.generate(PROMPTS, 16, s)
    b = gen.generate(PROMPTS, 16, s)
    c = gen.generate(PROMPTS, 16, SamplingParams(temperature=1.0, top_p=1.0, seed=4))
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert all(x.tokens != y.tokens for x, y in zip(a, c))
    # a row's draw depends on its own seed only, not on the rest of the batch
    assert gen.generate([PROMPTS[1]], 16, s)[0].tokens == a[1].tokens
    mixed = gen.generate(PROMPTS, 16, [s, SamplingParams.make_greedy(), s])
    assert mixed[0].tokens == a[0].tokens and mixed[2].tokens == a[2].tokens
    assert mixed[1].tokens == gen.generate([PROMPTS[1]], 16)[0].tokens


def test_top_k_one_and_tiny_top_p_equal_greedy():
    gen, _ = _generator("tiny3-moe")
    greedy = [r.tokens for r in gen.generate(PROMPTS, 10)]
    top1 = gen.generate(PROMPTS, 10, SamplingParams(temperature=1.3, top_k=1, top_p=1.0, seed=9))
    nucleus = gen.generate(PROMPTS, 10, SamplingParams(temperature=0.7, top_p=1e-6, seed=9))
    assert [r.tokens for r in top1] == greedy
    assert [r.tokens for r in nucleus] == greedy


def _minimind_filter(logits, seen, temperature, top_k, top_p, penalty):
    """MiniMind's generate() logits processing, transcribed to numpy (float64)."""
    logits = np.array(logits, np.float64) / temperature
    logits[seen] /= penalty
    if top_k > 0:
        kth = np.sort(logits)[::-1][top_k - 1]
        logits[logits < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-logits, kind="stable")
        sorted_logits = logits[order]
        probs = np.exp(sorted_logits - sorted_logits.max())
        probs /= probs.sum()
        mask = np.cumsum(probs) > top_p
        mask[1:], mask[0] = mask[:-1].copy(), False
        logits[order[mask]] = -np.inf
    return logits


@pytest.mark.parametrize("top_k,top_p,penalty", [(0, 1.0, 1.0), (5, 1.0, 1.0), (0, 0.5, 1.0), (7, 0.8, 1.2),
                                                  (50, 0.9, 0.8)])
def test_filter_matches_minimind(top_k, top_p, penalty):
    rng = np.random.default_rng(top_k)
    logits = rng.normal(size=(3, 97)).astype(np.float32) * 3
    seen = rng.random((3, 97)) < 0.2
    temps = [0.5, 1.0, 1.7]
    rows = _make_rows([SamplingParams(temperature=t, top_k=top_k, top_p=top_p, repetition_penalty=penalty)
                       for t in temps], [1, 1, 1], [])
    _, filtered = _filter(jnp.asarray(logits), jnp.asarray(seen), rows)
    filtered = np.asarray(filtered)
    for i, t in enumerate(temps):
        ref = _minimind_filter(logits[i], seen[i], t, top_k, top_p, penalty)
        np.testing.assert_array_equal(np.isinf(filtered[i]), np.isinf(ref))
        kept = ~np.isinf(ref)
        np.testing.assert_allclose(filtered[i][kept], ref[kept], rtol=1e-5)
        if top_k or top_p < 1:
            assert kept.sum() < logits.shape[1]  # the filters did remove something


def test_samples_stay_inside_the_filtered_set():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(1, 50)).astype(np.float32))
    s = SamplingParams(temperature=1.0, top_k=4, top_p=1.0)
    rows = _make_rows([s], [1], [])
    from minimind_jax.generate import _pick

    allowed = set(np.argsort(-np.asarray(logits[0]))[:4].tolist())
    drawn = {int(_pick(logits, jnp.zeros((1, 50), bool), rows, jnp.int32(i))[0]) for i in range(60)}
    assert drawn <= allowed and len(drawn) > 1


def test_eos_stops_each_row_on_its_own():
    gen, cfg = _generator("tiny3")
    s = SamplingParams(temperature=1.0, top_p=1.0, seed=5)  # sampled: the random model's greedy output repeats
    free = gen.generate(PROMPTS, 12, s)
    first = {}
    for i, t in enumerate(free[0].tokens):
        first.setdefault(t, i)
    eos, at = next((t, i) for t, i in first.items() if i >= 2)  # a token row 0 first produces at step >= 2
    stopped = gen.generate(PROMPTS, 12, s, eos_ids=(eos,))
    for full, res in zip(free, stopped):
        cut = full.tokens.index(eos) + 1 if eos in full.tokens else len(full.tokens)
        assert res.tokens == full.tokens[:cut]
        assert res.finish_reason == ("stop" if eos in full.tokens else "length")
    assert len(stopped[0].tokens) == at + 1
    # per-row limits
    limited = gen.generate(PROMPTS, [2, 5, 12], s)
    assert [len(r.tokens) for r in limited] == [2, 5, 12]
    assert [r.tokens for r in limited] == [f.tokens[:n] for f, n in zip(free, [2, 5, 12])]


def test_stream_yields_the_same_tokens_step_by_step():
    gen, _ = _generator("tiny3")
    full = gen.generate(PROMPTS, 9, SamplingParams(seed=1))
    chunks = list(gen.stream(PROMPTS, 9, SamplingParams(seed=1)))
    assert len(chunks) == 9 and all(len(c) == len(PROMPTS) for c in chunks)
    assert all(len(toks) == 1 for c in chunks for toks in c)
    for i, res in enumerate(full):
        assert sum((c[i] for c in chunks), []) == res.tokens
    seen = []
    via_callback = gen.generate(PROMPTS, 9, SamplingParams(seed=1), callback=seen.append)
    assert [r.tokens for r in via_callback] == [r.tokens for r in full] and len(seen) == 9


@pytest.mark.parametrize("policy,name", [("bf16", "tiny3"), ("bf16-params", "tiny3-moe")])
def test_policies_generate(policy, name):
    cfg = tiny(name)
    gen = Generator(cached_params(cfg), cfg, policy, eos_ids=())
    assert jax.tree.leaves(gen.params)[0].dtype == (jnp.bfloat16 if policy == "bf16-params" else jnp.float32)
    res = gen.generate(PROMPTS, 6)
    assert all(len(r.tokens) == 6 and all(0 <= t < cfg.vocab_size for t in r.tokens) for r in res)
    # under the same policy, the cached decode still picks the full forward pass's first token
    model = MiniMindLM(cfg, policy)
    for prompt, r in zip(PROMPTS, res):
        logits = model.apply({"params": gen.params}, jnp.asarray([prompt])).logits[0, -1]
        assert r.tokens[0] == int(jnp.argmax(logits))


def test_greedy_generate_and_bad_input():
    cfg = tiny("tiny3")
    params = cached_params(cfg)
    gen = Generator(params, cfg, eos_ids=())
    assert greedy_generate(params, cfg, PROMPTS[0], 5, eos_id=-1) == gen.generate([PROMPTS[0]], 5)[0].tokens
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate([[1], []], 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.generate([[1, cfg.vocab_size]], 4)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        gen.generate([[1, 2]], cfg.max_position_embeddings)


def test_text_stream_holds_back_partial_characters():
    from minimind_jax.tokenizer import load_tokenizer

    tok = load_tokenizer()
    text = "你好, world! 🙂 done"
    ids = tok.encode(text, add_special_tokens=False)
    stream = TextStream(tok)
    pieces = [stream.push([i]) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny minimind-3 model with the bundled tokenizer's vocabulary, saved in this project's checkpoint format
    and in MiniMind's safetensors layout."""
    import convert
    from minimind_jax import ModelConfig
    from minimind_jax.checkpoint import save_checkpoint

    cfg = ModelConfig.preset("tiny3", vocab_size=6400)
    params = cached_params(cfg)
    root = tmp_path_factory.mktemp("gen")
    save_checkpoint(root / "ckpt", params, cfg)
    convert.save_torch(params, cfg, root / "torch", format="minimind", dtype="float32")
    return cfg, params, root


def _generate_script():
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "generate_script", pathlib.Path(__file__).resolve().parents[1] / "scripts" / "generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("fmt", ["ckpt", "torch"])
def test_generate_script_prints_ids(saved_model, fmt, capsys):
    cfg, params, root = saved_model
    script = _generate_script()
    assert script.main(["--ckpt", str(root / fmt), "--prompt-ids", "1,5,9", "--prompt-ids", "7,8",
                        "--greedy", "--print-ids", "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    gen = Generator(params, cfg)
    expected = gen.generate([[1, 5, 9], [7, 8]], 6)
    assert lines == [" ".join(map(str, p + r.tokens)) for p, r in zip([[1, 5, 9], [7, 8]], expected)]
    assert script.main(["--ckpt", str(root / fmt), "--prompt", "hello", "--max-new-tokens", "3", "--seed", "1"]) == 0
    assert script.main(["--ckpt", str(root / "missing"), "--prompt", "x"]) == 2
    assert "missing" in capsys.readouterr().err


def test_generate_script_separates_replies_only_between_prompts(saved_model, capsys):
    _, _, root = saved_model
    script = _generate_script()
    base = ["--ckpt", str(root / "ckpt"), "--greedy", "--max-new-tokens", "4", "--no-stream"]
    assert script.main(base + ["--prompt", "hello"]) == 0
    assert "---" not in capsys.readouterr().out.splitlines()
    assert script.main(base + ["--prompt", "hello", "--prompt", "sun"]) == 0
    assert capsys.readouterr().out.splitlines().count("---") == 1


@pytest.mark.torch
@pytest.mark.parametrize("name", ["tiny3", "tiny2"])
def test_greedy_matches_transformers_generate(name, tmp_path):
    """Our greedy decode and transformers' generate (Qwen3ForCausalLM / LlamaForCausalLM loaded from the converter's
    HF export of the same weights) produce the same tokens, left-padded batch included."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import convert

    cfg = tiny(name)
    params = jax.tree.map(lambda x: x * 3.0, cached_params(cfg))  # sharper logits than the 0.02 init
    convert.save_torch(params, cfg, tmp_path / "hf", format="hf", dtype="float32")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    gen = Generator(params, cfg, eos_ids=())
    prompts = PROMPTS[:2]
    ours = gen.generate(prompts, 12)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, pad_token_id=0)[:, width:]
    assert [r.tokens for r in ours] == ref.tolist()
