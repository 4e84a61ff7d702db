"""Post-training losses at the step level (tiny models, no files): reasoning tag weights and their
normalisation, the DPO loss and rewards, distillation's CE + KL with alpha = 1 equal to plain SFT."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import cached_params, tiny

from minimind_jax import sharding as shd
from minimind_jax.data import IGNORE_INDEX, make_transform
from minimind_jax.precision import get_policy
from minimind_jax.tokenizer import load_tokenizer
from minimind_jax.training.config import from_dict
from minimind_jax.training.stages import (
    build_stage,
    distill_terms,
    dpo_rewards,
    get_stage,
    token_cross_entropy,
)
from minimind_jax.training.step import (
    init_train_state,
    jit_train_step,
    make_apply,
    make_optimizer,
    make_train_step,
)

ROOT = Path(__file__).resolve().parents[1]


def _reason_record(n=0):
    with open(ROOT / "data" / "sample" / "reason.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n + 1), f)][n]


def test_reason_weights_fall_exactly_on_the_tag_tokens():
    tok = load_tokenizer()
    transform = make_transform("reason", tok, 512, special_token_weight=10.0)
    record = _reason_record()
    # a "<" and an "answer" outside any tag must keep weight 1 (MiniMind's isin would weight them)
    record["conversations"][1]["content"] = record["conversations"][1]["content"].replace(
        "</think>", "so a < b, answer > c\n</think>")
    arrays = transform(record, None).arrays
    ids, labels, w = arrays["input_ids"], arrays["labels"], arrays["loss_weights"]
    assert w.dtype == np.float32 and w.shape == ids.shape
    trained = labels != IGNORE_INDEX
    assert np.all(w[~trained] == 0) and set(np.unique(w[trained])) == {1.0, 10.0}
    assert tok.decode(ids[w == 10].tolist()) == "<think></think><answer></answer>"
    tag_len = sum(len(tok.encode(t, add_special_tokens=False)) for t in ("<think>", "</think>", "<answer>", "</answer>"))
    assert int(np.sum(w == 10)) == tag_len
    assert "a < b, answer > c" in tok.decode(ids[(w == 1)].tolist())
    # a tag in the user's message is not trained, so not weighted
    record["conversations"][0]["content"] += " <answer>"
    arrays = transform(record, None).arrays
    assert tok.decode(arrays["input_ids"][arrays["loss_weights"] == 10].tolist()) == "<think></think><answer></answer>"


def _step(stage, cfg, batch, *, params=None, frozen=None, policy="fp32", steps=1, lr=1e-3, mesh=None,
          frozen_config=None, replicate_params=False):
    tx, sched = make_optimizer(lr, 10, schedule="constant")
    mesh = mesh or shd.make_mesh(None, devices=jax.devices()[:1])
    ps = shd.param_shardings(cfg, mesh)
    if replicate_params:  # LoRA: the trained params are the (small, replicated) adapters
        ps = jax.tree.map(lambda _: shd.replicated(mesh), params)
    fs = None if frozen is None else shd.param_shardings(frozen_config or cfg, mesh)
    params = jax.tree.map(jnp.array, params if params is not None else cached_params(cfg))
    frozen = None if frozen is None else jax.tree.map(jnp.array, frozen)
    state, sh = init_train_state(cfg, tx, seed=0, policy=policy, mesh=mesh, param_sharding=ps, params=params,
                                 frozen=frozen, frozen_sharding=fs)
    bs = shd.batch_sharding(mesh, leading=1)
    step = jit_train_step(make_train_step(stage, cfg, policy, tx, sched), sh, bs, mesh)
    out = []
    for _ in range(steps):
        state, m = step(state, shd.shard_batch(batch, bs))
        out.append(jax.device_get(m))
    return state, out


def test_reason_loss_is_normalised_by_the_sum_of_weights():
    tok = load_tokenizer()
    cfg = tiny("tiny3", vocab_size=6400)
    transform = make_transform("reason", tok, 128, special_token_weight=10.0)
    rows = [transform(_reason_record(i), None).arrays for i in range(4)]
    batch = {k: np.stack([r[k] for r in rows]).reshape(2, 2, -1) for k in rows[0]}  # 2 accumulated micro-batches
    _, m = _step(get_stage("reason"), cfg, batch)
    logits = make_apply(cfg, get_policy("fp32"))(cached_params(cfg), jnp.asarray(batch["input_ids"].reshape(4, -1)),
                                                   jax.random.key(0)).logits
    ce, _ = token_cross_entropy(logits, jnp.asarray(batch["labels"].reshape(4, -1)))
    w = batch["loss_weights"].reshape(4, -1)[:, 1:]
    np.testing.assert_allclose(m[0]["loss"], float(jnp.sum(ce * w)) / w.sum(), rtol=1e-5)
    assert m[0]["trained_tokens"] == w.sum()


def test_dpo_rewards_formula():
    rng = np.random.default_rng(0)
    b, t, v = 3, 7, 11
    pol = rng.standard_normal((2 * b, t, v)).astype(np.float32)
    ref = rng.standard_normal((2 * b, t, v)).astype(np.float32)
    labels = rng.integers(0, v, (2 * b, t)).astype(np.int32)
    labels[:, :3] = IGNORE_INDEX  # the prompt
    r = jax.device_get(dpo_rewards(jnp.asarray(pol), jnp.asarray(ref), jnp.asarray(labels), 0.15))

    def seq_logp(logits):
        lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        out = np.zeros(2 * b)
        for i in range(2 * b):
            for s in range(1, t):
                if labels[i, s] != IGNORE_INDEX:
                    out[i] += lp[i, s - 1, labels[i, s]]
        return out

    pi, rf = seq_logp(pol), seq_logp(ref)
    chosen, rejected = 0.15 * (pi[:b] - rf[:b]), 0.15 * (pi[b:] - rf[b:])
    np.testing.assert_allclose(r["chosen"], chosen, rtol=1e-5)
    np.testing.assert_allclose(r["rejected"], rejected, rtol=1e-5)
    np.testing.assert_allclose(r["loss"], np.log1p(np.exp(-(chosen - rejected))), rtol=1e-5)


def test_distill_kl_formula_and_alpha_one_equals_sft():
    rng = np.random.default_rng(0)
    s_logits = rng.standard_normal((2, 5, 9)).astype(np.float32)
    t_logits = rng.standard_normal((2, 5, 9)).astype(np.float32)
    labels = rng.integers(0, 9, (2, 5)).astype(np.int32)
    labels[0, :2] = IGNORE_INDEX
    _, kl, _mask = jax.device_get(distill_terms(jnp.asarray(s_logits), jnp.asarray(t_logits), jnp.asarray(labels), 1.5))

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(t_logits[:, :-1] / 1.5), softmax(s_logits[:, :-1] / 1.5)
    expected = np.where(labels[:, 1:] != IGNORE_INDEX, (p * np.log(p / q)).sum(-1), 0)
    np.testing.assert_allclose(kl, expected, rtol=1e-5, atol=1e-7)

    # alpha = 1: exactly plain SFT (losses and params after two steps), whatever the teacher says
    cfg = tiny("tiny3")
    teacher = tiny("tiny3", hidden_size=32, num_attention_heads=2, head_dim=16, intermediate_size=64)
    batch = {"input_ids": rng.integers(3, 256, (1, 4, 12)).astype(np.int32)}
    batch["labels"] = np.where(np.arange(12) < 4, IGNORE_INDEX, batch["input_ids"]).astype(np.int32)
    settings = {"stage": "distill", "teacher": "t", "distill_alpha": 1.0, "teacher_policy": "fp32"}
    distill = build_stage(from_dict(settings), cfg, get_policy("fp32"), teacher)
    s_state, s_m = _step(get_stage("sft"), cfg, batch, steps=2)
    d_state, d_m = _step(distill, cfg, batch, frozen=cached_params(teacher, seed=5), steps=2)
    assert [m["loss"] for m in s_m] == [m["loss"] for m in d_m]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(s_state.params), jax.device_get(d_state.params))
    assert d_m[0]["kl"] > 0  # the teacher was there, weighted by 0
    # alpha = 0.5: the KL term enters the loss; the teacher may be of the other generation and MoE
    other = tiny("tiny2-moe")
    half = build_stage(from_dict({**settings, "distill_alpha": 0.5}), cfg, get_policy("fp32"), other)
    _, h_m = _step(half, cfg, batch, frozen=cached_params(other, seed=5), frozen_config=other)
    np.testing.assert_allclose(h_m[0]["loss"], 0.5 * h_m[0]["ce"] + 0.5 * 1.5**2 * h_m[0]["kl"], rtol=1e-5)


@pytest.mark.parametrize("name", ["lora", "dpo", "distill"])
def test_stages_shard_like_one_device(name):
    """Two steps on 8 simulated devices (data x fsdp x tensor = 2 x 2 x 2; frozen params sharded like a model,
    LoRA adapters replicated) give one device's losses (fp32, within 1e-5)."""
    from minimind_jax import lora

    cfg = tiny("tiny3")
    rng = np.random.default_rng(4)
    ids = rng.integers(3, 256, (1, 8, 16)).astype(np.int32)
    labels = np.where(np.arange(16) < 5, IGNORE_INDEX, ids).astype(np.int32)
    batch = {"input_ids": ids, "labels": labels}
    base = cached_params(cfg)
    kw = {}
    if name == "lora":
        lc = lora.LoraConfig(rank=4, targets="attention")
        adapters = jax.tree.map(lambda x: x + np.float32(0.01), lora.init_adapters(cfg, lc))
        kw = {"params": adapters, "frozen": base, "replicate_params": True}
        stage = build_stage(from_dict({"stage": "lora", "lora_rank": 4, "lora_targets": "attention"}), cfg)
    elif name == "dpo":
        batch = {"chosen_input_ids": ids[:, :4], "chosen_labels": labels[:, :4], "rejected_input_ids": ids[:, 4:],
                 "rejected_labels": labels[:, 4:]}
        kw = {"frozen": base}
        stage = build_stage(from_dict({"stage": "dpo"}), cfg, get_policy("fp32"))
    else:
        teacher = tiny("tiny3-moe")
        kw = {"frozen": cached_params(teacher, seed=5), "frozen_config": teacher}
        stage = build_stage(from_dict({"stage": "distill", "teacher": "t", "teacher_policy": "fp32"}), cfg,
                            get_policy("fp32"), teacher)
    _, one = _step(stage, cfg, batch, steps=2, **kw)
    state, eight = _step(stage, cfg, batch, steps=2, mesh=shd.make_mesh("data=2,fsdp=2,tensor=2"), **kw)
    np.testing.assert_allclose([m["loss"] for m in eight], [m["loss"] for m in one], atol=1e-5, rtol=0)
    assert one[1]["loss"] != one[0]["loss"]  # the first step trained something
    frozen_specs = [tuple(x.sharding.spec) for x in jax.tree.leaves(state.frozen)]
    assert any("tensor" in spec or "fsdp" in spec for spec in frozen_specs)  # the frozen model is sharded
