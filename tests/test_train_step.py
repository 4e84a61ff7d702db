"""The train step: accumulation, SFT masking, loss scaling, sharded equality (8 simulated CPU devices)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _util import tiny
from minimind_jax import sharding as shd
from minimind_jax.data import IGNORE_INDEX, encode_sft
from minimind_jax.precision import make_loss_scale
from minimind_jax.tokenizer import load_tokenizer
from minimind_jax.training.stages import get_stage, lm_loss, token_cross_entropy
from minimind_jax.training.step import (
    init_train_state,
    jit_train_step,
    make_apply,
    make_optimizer,
    make_train_step,
    minimind_schedule,
)


def _batch(accum, b, t, seed=0, vocab=256, pad_tail=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (accum, b, t)).astype(np.int32)
    labels = ids.copy()
    if pad_tail:  # different numbers of trained tokens per row / micro-batch
        for a in range(accum):
            for i in range(b):
                labels[a, i, rng.integers(t // 2, t):] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def _run(cfg, batches, *, mesh=None, policy="fp32", lr=1e-3, loss_scale="auto", stage="pretrain", seed=0):
    tx, sched = make_optimizer(lr, 10, schedule="constant")
    mesh = mesh or shd.make_mesh(None, devices=jax.devices()[:1])
    ps = shd.param_shardings(cfg, mesh)
    state, sh = init_train_state(cfg, tx, seed=seed, policy=policy, mesh=mesh, param_sharding=ps,
                                 loss_scale=loss_scale)
    bs = shd.batch_sharding(mesh, leading=1)
    step = jit_train_step(make_train_step(get_stage(stage), cfg, policy, tx, sched), sh, bs, mesh)
    out = []
    for b in batches:
        state, m = step(state, shd.shard_batch(b, bs))
        out.append(jax.device_get(m))
    return state, out


def test_minimind_schedule_formula():
    sched = minimind_schedule(5e-4, 100)
    for s in (0, 37, 100):
        expected = 5e-4 * (0.1 + 0.45 * (1 + np.cos(np.pi * s / 100)))
        np.testing.assert_allclose(float(sched(s)), expected, rtol=1e-6)
    assert float(sched(0)) == pytest.approx(5e-4) and float(sched(100)) == pytest.approx(5e-5)


def test_accumulation_equals_one_big_batch():
    """k micro-batches of b rows give the same update as one batch of k*b rows, even though the micro-batches
    hold different numbers of trained tokens (the loss is normalised over the whole step)."""
    cfg = tiny("tiny3")
    big = _batch(1, 8, 16, seed=3)
    micro = {k: v.reshape(4, 2, 16) for k, v in big.items()}
    s1, m1 = _run(cfg, [big])
    s4, m4 = _run(cfg, [micro])
    np.testing.assert_allclose(m1[0]["loss"], m4[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1[0]["grad_norm"], m4[0]["grad_norm"], rtol=1e-5)
    # Adam's first update is about lr * g / (|g| + eps): for gradients near zero, float rounding of the two
    # summation orders moves a weight by up to ~1e-6 of the 1e-3 step; the rest agree to rounding.
    chex.assert_trees_all_close(jax.device_get(s1.params), jax.device_get(s4.params), atol=1e-5, rtol=1e-6)
    # and the update is not trivially zero
    s0, _ = _run(cfg, [])
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s1.params, s0.params)
    assert max(jax.tree.leaves(diff)) > 1e-4


def test_loss_is_token_mean_of_cross_entropy():
    cfg = tiny("tiny3")
    b = _batch(1, 4, 12, seed=1)
    s0, _ = _run(cfg, [])
    _, m = _run(cfg, [b])
    logits = make_apply(cfg, __import__("minimind_jax").get_policy("fp32"))(
        s0.params, jnp.asarray(b["input_ids"][0]), jax.random.key(0)).logits
    losses, mask = token_cross_entropy(logits, jnp.asarray(b["labels"][0]))
    np.testing.assert_allclose(m[0]["loss"], float(losses.sum() / mask.sum()), rtol=1e-6)
    assert m[0]["trained_tokens"] == float(mask.sum())


def test_sft_loss_ignores_user_tokens():
    """SFT trains only on the assistant's replies: the labels of every user / system token are -100, and
    rewriting a user message that follows the last reply cannot change the loss (the model is causal)."""
    tok = load_tokenizer()
    cfg = tiny("tiny3", vocab_size=6400)
    params = __import__("_util").cached_params(cfg)
    apply = make_apply(cfg, __import__("minimind_jax").get_policy("fp32"))

    def loss_of(user_text):
        record = {"conversations": [{"role": "user", "content": "1+1等于几？"},
                                    {"role": "assistant", "content": "等于2。"},
                                    {"role": "user", "content": user_text}]}
        enc = encode_sft(record, tok, 64).arrays
        batch = {k: jnp.asarray(v[None]) for k, v in enc.items()}
        loss_sum, _, _ = lm_loss(apply, params, None, batch, jax.random.key(0))
        return float(loss_sum), enc

    a, enc_a = loss_of("谢谢")
    b, enc_b = loss_of("再见，明天见！这是另一段完全不同的话")
    assert not np.array_equal(enc_a["input_ids"], enc_b["input_ids"])
    assert a == b
    # only the reply (the template's empty think block, "等于2。", <|im_end|>\n) is labelled
    trained = tok.decode(enc_a["input_ids"][enc_a["labels"] != IGNORE_INDEX].tolist())
    assert trained == "<think>\n\n</think>\n\n等于2。<|im_end|>\n"


def test_fp16_dynamic_scale_recovers_from_overflow():
    """An fp16 run started with a loss scale far too large overflows: those steps are skipped (params
    unchanged), the scale halves each time, and training then proceeds with finite updates."""
    cfg = tiny("tiny3")
    tx, sched = make_optimizer(1e-3, 10, schedule="constant")
    mesh = shd.make_mesh(None, devices=jax.devices()[:1])
    ps = shd.param_shardings(cfg, mesh)
    state, sh = init_train_state(cfg, tx, seed=0, policy="fp16", mesh=mesh, param_sharding=ps)
    state = state.replace(loss_scale=make_loss_scale("dynamic", initial=2.0**40, period=1000))
    bs = shd.batch_sharding(mesh, leading=1)
    step = jax.jit(make_train_step(get_stage("pretrain"), cfg, "fp16", tx, sched))
    batch = shd.shard_batch(_batch(1, 4, 16, seed=2), bs)
    p0 = jax.device_get(state.params)
    first = None
    skipped, scales, losses = [], [], []
    for i in range(40):
        before = jax.device_get(state.params)
        state, m = step(state, batch)
        m = jax.device_get(m)
        if first is None:
            first = m
            chex.assert_trees_all_equal(before, jax.device_get(state.params))  # the overflowing step changed nothing
        skipped.append(int(m["skipped"]))
        scales.append(float(m["loss_scale"]))
        losses.append(float(m["loss"]))
    assert not first["finite"] and skipped[0] == 1
    assert scales[1] == scales[0] / 2
    recovered = skipped[-1]
    assert 1 <= recovered < 40 and skipped[-5:] == [recovered] * 5  # no more skips once the scale fits
    assert float(state.loss_scale.loss_scale) < 2.0**40
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
    assert losses[-1] < losses[recovered]  # finite steps train
    assert not np.allclose(jax.tree.leaves(p0)[0], jax.tree.leaves(jax.device_get(state.params))[0])


@pytest.mark.parametrize("preset", ["tiny3", "tiny3-moe"])
@pytest.mark.parametrize("mesh_spec", ["data=8", "fsdp=8", "data=2,fsdp=2,tensor=2"])
def test_sharded_training_matches_one_device(preset, mesh_spec):
    """DP, FSDP and DP x FSDP x TP on 8 simulated devices give one device's losses (fp32) within 1e-5 over
    three steps of two accumulated micro-batches each."""
    cfg = tiny(preset)
    batches = [_batch(2, 8, 16, seed=s) for s in range(3)]
    ref = _one_device_reference(preset)
    state, got = _run(cfg, batches, mesh=shd.make_mesh(mesh_spec))
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g["loss"], r["loss"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(g["aux_loss"], r["aux_loss"], atol=1e-6, rtol=0)
    # params really are sharded as the rules say
    if "fsdp" in mesh_spec:
        spec = state.params["embed_tokens"].sharding.spec
        assert "fsdp" in tuple(spec)
    if "tensor" in mesh_spec:
        assert "tensor" in tuple(state.params["layers_0"]["self_attn"]["q_proj"]["kernel"].sharding.spec)


@functools.lru_cache(maxsize=None)
def _one_device_reference(preset):
    return _run(tiny(preset), [_batch(2, 8, 16, seed=s) for s in range(3)])[1]


def test_parse_mesh():
    assert shd.parse_mesh(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert shd.parse_mesh("fsdp=4,tensor=2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert shd.parse_mesh("tensor=2", 8) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert shd.parse_mesh("2,-1,2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    for bad in ("data=3", "pipeline=2", "1,2", "data=-1,fsdp=-1", "data=x"):
        with pytest.raises(shd.MeshError, match="--mesh"):
            shd.parse_mesh(bad, 8)


def test_indivisible_dims_are_replicated():
    cfg = tiny("tiny3", vocab_size=250)  # 250 rows do not split over tensor=8
    specs = shd.param_specs(cfg, shd.make_mesh("tensor=8"))
    assert tuple(specs["layers_0"]["mlp"]["gate_proj"]["kernel"]) == (None, "tensor")  # 128 / 8
    assert tuple(specs["embed_tokens"]) == ()
    specs = shd.param_specs(tiny("tiny3"), shd.make_mesh("fsdp=2,tensor=4"))
    assert tuple(specs["embed_tokens"]) == ("tensor", "fsdp")
