"""Precision policies and loss scaling (``minimind_jax.precision``).

The train-step pattern exercised here is the one the trainer uses::

    (loss, grads, finite) = scaled_value_and_grad(loss_fn, loss_scale)(params, batch)
    loss_scale = loss_scale.adjust(finite)
    updates, opt_state = skip_nonfinite(optax.chain(clip, adamw)).update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
"""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from minimind_jax import MiniMindLM, ModelConfig, init_params
from minimind_jax.precision import (
    DYNAMIC_INITIAL_SCALE,
    DynamicLossScale,
    NoOpLossScale,
    Policy,
    StaticLossScale,
    current_scale,
    default_loss_scale,
    get_policy,
    make_loss_scale,
    scaled_value_and_grad,
    skip_nonfinite,
    skipped_steps,
)

F32, BF16, F16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)


# ============================================================================================ policies
@pytest.mark.parametrize("name, expected", [
    ("fp32", (F32, F32, F32)),
    ("bf16", (F32, BF16, F32)),
    ("fp16", (F32, F16, F32)),
    ("bf16-params", (BF16, BF16, BF16)),
    # MiniMind's --dtype names
    ("float32", (F32, F32, F32)),
    ("bfloat16", (F32, BF16, F32)),
    ("float16", (F32, F16, F32)),
])
def test_get_policy_dtypes(name, expected):
    pol = get_policy(name)
    assert isinstance(pol, Policy)
    got = tuple(jnp.dtype(d) for d in (pol.param_dtype, pol.compute_dtype, pol.output_dtype))
    assert got == expected
    assert pol.needs_loss_scaling == (expected[1] == F16)


def test_get_policy_aliases_and_passthrough():
    assert get_policy("float16") is get_policy("fp16")
    assert get_policy("bfloat16") is get_policy("bf16")
    custom = Policy(jnp.float32, jnp.float16, jnp.float16, "mine")
    assert get_policy(custom) is custom
    assert str(get_policy("bf16")) == "bf16 (params=float32, compute=bfloat16, output=float32)"


def test_get_policy_unknown_names_choices():
    with pytest.raises(ValueError) as excinfo:
        get_policy("fp8")
    msg = str(excinfo.value)
    assert "'fp8'" in msg
    for choice in ("fp32", "bf16", "fp16", "bf16-params", "float32", "bfloat16", "float16"):
        assert choice in msg


def test_cast_to_compute_only_floating_leaves():
    tree = {
        "w": jnp.ones((2, 3), jnp.float32),
        "h": jnp.ones((3,), jnp.float16),
        "ids": jnp.arange(4, dtype=jnp.int32),
        "mask": jnp.array([True, False]),
        "np_int": np.arange(3, dtype=np.int64),
        "n": 3,  # a Python scalar: no dtype, left alone
    }
    out = get_policy("bf16").cast_to_compute(tree)
    assert out["w"].dtype == BF16 and out["h"].dtype == BF16
    chex.assert_trees_all_close(out["w"].astype(jnp.float32), tree["w"])
    # Non-floating leaves are returned untouched (same object, same dtype).
    for key in ("ids", "mask", "np_int", "n"):
        assert out[key] is tree[key]
    assert out["ids"].dtype == jnp.int32 and out["mask"].dtype == jnp.bool_

    out16 = get_policy("fp16").cast_to_compute(tree)
    assert out16["w"].dtype == F16 and out16["h"] is tree["h"]  # already the compute dtype
    assert out16["ids"] is tree["ids"]

    # cast_to_param / cast_to_output follow the same rule with their own dtype.
    p = get_policy("bf16-params").cast_to_param(tree)
    assert p["w"].dtype == BF16 and p["ids"] is tree["ids"]
    o = get_policy("fp16").cast_to_output({"logits": jnp.ones((2,), jnp.float16), "ids": tree["ids"]})
    assert o["logits"].dtype == F32 and o["ids"] is tree["ids"]


def test_make_loss_scale_kinds_and_defaults():
    dyn = make_loss_scale("dynamic")
    assert isinstance(dyn, DynamicLossScale)
    assert float(dyn.loss_scale) == 2.0**15 == DYNAMIC_INITIAL_SCALE
    assert dyn.period == 2000 and dyn.factor == 2 and float(dyn.min_loss_scale) == 1.0
    assert int(dyn.counter) == 0
    assert isinstance(make_loss_scale("none"), NoOpLossScale)
    static = make_loss_scale("static", initial=128.0)
    assert isinstance(static, StaticLossScale) and float(current_scale(static)) == 128.0
    assert float(current_scale(make_loss_scale("none"))) == 1.0
    with pytest.raises(ValueError, match="none, static or dynamic"):
        make_loss_scale("adaptive")
    # fp16 compute needs dynamic scaling; bf16 / fp32 (float32's exponent range) need none.
    assert isinstance(default_loss_scale("fp16"), DynamicLossScale)
    assert float(current_scale(default_loss_scale("float16"))) == 2.0**15
    for name in ("fp32", "bf16", "bf16-params"):
        assert isinstance(default_loss_scale(name), NoOpLossScale)


# ===================================================================== dynamic loss scale (adjust)
class DynamicAdjustTest(chex.TestCase):
    """``adjust`` alone, jitted and not (jit flattens the scale: every field must survive that)."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_period_doubles_once_and_overflow_halves(self):
        adjust = self.variant(lambda ls, finite: ls.adjust(finite))
        ls = make_loss_scale("dynamic", period=3)
        scales = []
        for finite in [True] * 7 + [False] + [True] * 3:
            ls = adjust(ls, jnp.asarray(finite))
            assert isinstance(ls, DynamicLossScale)
            assert ls.period == 3 and ls.factor == 2
            scales.append(float(ls.loss_scale))
        s = 2.0**15
        # doubles on every 3rd consecutive finite step, halves on overflow, counter restarts after it
        assert scales == [s, s, 2 * s, 2 * s, 2 * s, 4 * s, 4 * s, 2 * s, 2 * s, 2 * s, 4 * s]
        assert int(ls.counter) == 0

    @chex.variants(with_jit=True, without_jit=True)
    def test_floor_is_min_scale(self):
        adjust = self.variant(lambda ls, finite: ls.adjust(finite))
        for initial, min_scale in [(2.0**15, 1.0), (2.0**12, 2.0**10)]:
            ls = make_loss_scale("dynamic", initial=initial, min_scale=min_scale)
            seen = []
            for _ in range(20):
                ls = adjust(ls, jnp.asarray(False))
                seen.append(float(ls.loss_scale))
                assert float(ls.min_loss_scale) == min_scale  # the floor itself is carried along
            assert min(seen) == min_scale, seen
            assert seen[-1] == min_scale
            assert seen == sorted(seen, reverse=True)

    @chex.variants(with_jit=True, without_jit=True)
    def test_growth_never_overflows_the_scale(self):
        adjust = self.variant(lambda ls, finite: ls.adjust(finite))
        ls = make_loss_scale("dynamic", initial=2.0**127, period=1)
        ls = adjust(ls, jnp.asarray(True))  # 2**128 is inf in float32: keep 2**127
        assert float(ls.loss_scale) == 2.0**127


def test_default_period_is_2000():
    ls = make_loss_scale("dynamic")
    assert ls.period == 2000

    @jax.jit
    def run(ls, n):
        return jax.lax.fori_loop(0, n, lambda i, l: l.adjust(jnp.asarray(True)), ls)

    after_1999 = run(ls, 1999)
    assert float(after_1999.loss_scale) == 2.0**15 and int(after_1999.counter) == 1999
    after_2000 = run(ls, 2000)
    assert float(after_2000.loss_scale) == 2.0**16 and int(after_2000.counter) == 0


# ================================================================ the train step with loss scaling
def _toy_loss(params, x):
    """A float16-compute loss: the backward pass runs in float16, so a large scale times a large input
    overflows it (as a real fp16 model's backward would)."""
    y = params["w"].astype(jnp.float16) * x.astype(jnp.float16)
    return jnp.sum(y.astype(jnp.float32)) + 0.5 * jnp.sum(params["b"] ** 2)


def _toy_params():
    return {"w": jnp.array([0.5, -1.0, 2.0, 0.25], jnp.float32), "b": jnp.array(0.75, jnp.float32)}


X_OK = jnp.array([0.01, -0.02, 0.03, 0.04], jnp.float32)  # 2**15 * 0.04 fits in float16
X_OVERFLOW = jnp.array([4.0, 1.0, -1.0, 0.5], jnp.float32)  # 2**15 * 4 = 131072 > 65504: inf in float16


def _tx():
    return skip_nonfinite(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)))


def _make_step(loss_fn, tx):
    def step(params, opt_state, loss_scale, x):
        loss, grads, finite = scaled_value_and_grad(loss_fn, loss_scale)(params, x)
        loss_scale = loss_scale.adjust(finite)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss_scale, loss, finite

    return step


def test_overflow_skips_update_and_halves_scale():
    tx = _tx()
    step = jax.jit(_make_step(_toy_loss, tx))
    params, ls = _toy_params(), make_loss_scale("dynamic")
    opt_state = tx.init(params)
    # One finite step first, so the Adam moments and count are non-trivial.
    params, opt_state, ls, loss, finite = step(params, opt_state, ls, X_OK)
    assert bool(finite) and int(skipped_steps(opt_state)) == 0
    assert float(ls.loss_scale) == 2.0**15 and int(ls.counter) == 1
    assert int(optax.tree_utils.tree_get(opt_state, "count")) == 1

    # The overflow: the scaled fp16 backward produces inf.
    _, grads, fin = scaled_value_and_grad(_toy_loss, ls)(params, X_OVERFLOW)
    assert not bool(fin) and not np.isfinite(np.asarray(grads["w"])).all()
    new_params, new_opt, new_ls, loss, finite = step(params, opt_state, ls, X_OVERFLOW)
    assert not bool(finite)
    assert np.isfinite(float(loss))  # the unscaled loss itself is fine; only its scaled gradient is not
    chex.assert_trees_all_equal(new_params, params)  # bitwise
    chex.assert_trees_all_equal(new_opt.inner_state, opt_state.inner_state)  # Adam count, mu, nu
    assert int(optax.tree_utils.tree_get(new_opt, "count")) == 1
    assert int(skipped_steps(new_opt)) == 1
    assert float(new_ls.loss_scale) == 2.0**14 and int(new_ls.counter) == 0

    # Still too large at 2**14 (65536 > 65504): skipped again, halved again.
    p2, o2, ls2, _, finite = step(new_params, new_opt, new_ls, X_OVERFLOW)
    assert not bool(finite) and int(skipped_steps(o2)) == 2 and float(ls2.loss_scale) == 2.0**13
    chex.assert_trees_all_equal(p2, params)
    # At 2**13 the same input fits: the step is taken and the optimizer moves on.
    p3, o3, ls3, _, finite = step(p2, o2, ls2, X_OVERFLOW)
    assert bool(finite) and int(skipped_steps(o3)) == 2 and float(ls3.loss_scale) == 2.0**13
    assert int(optax.tree_utils.tree_get(o3, "count")) == 2
    assert not np.array_equal(np.asarray(p3["w"]), np.asarray(params["w"]))


def test_finite_steps_double_scale_once_per_period():
    tx = _tx()
    step = jax.jit(_make_step(_toy_loss, tx))
    params, ls = _toy_params(), make_loss_scale("dynamic", period=3)
    opt_state = tx.init(params)
    scales = []
    for _ in range(3):
        params, opt_state, ls, _, finite = step(params, opt_state, ls, X_OK)
        assert bool(finite)
        scales.append(float(ls.loss_scale))
    assert scales == [2.0**15, 2.0**15, 2.0**16]  # exactly one doubling in 3 finite steps
    assert int(skipped_steps(opt_state)) == 0
    assert int(optax.tree_utils.tree_get(opt_state, "count")) == 3


def test_repeated_overflow_stops_at_min_scale():
    tx = _tx()
    step = jax.jit(_make_step(_toy_loss, tx))
    params0 = _toy_params()
    for min_scale in (1.0, 2.0**9):
        params, ls = params0, make_loss_scale("dynamic", min_scale=min_scale)
        opt_state = tx.init(params)
        x_inf = X_OK.at[0].set(jnp.inf)  # non-finite whatever the scale
        seen = []
        for _ in range(20):
            params, opt_state, ls, _, finite = step(params, opt_state, ls, x_inf)
            assert not bool(finite)
            seen.append(float(ls.loss_scale))
        assert min(seen) == min_scale and seen[-1] == min_scale, seen
        assert int(skipped_steps(opt_state)) == 20
        chex.assert_trees_all_equal(params, params0)


def test_unscale_happens_before_clipping():
    c = jnp.array([3.0, 4.0, 0.0], jnp.float32)  # true gradient, global norm 5 > 1

    def loss_fn(params):
        return jnp.dot(params["w"], c) + jnp.dot(params["v"], params["v"]) * 0.0

    params0 = {"w": jnp.array([0.1, 0.2, 0.3], jnp.float32), "v": jnp.array([1.0, 2.0], jnp.float32)}
    ls = make_loss_scale("dynamic")  # 2**15
    loss, grads, finite = scaled_value_and_grad(loss_fn, ls)(params0)
    assert bool(finite)
    chex.assert_trees_all_close(loss, loss_fn(params0))  # the reported loss is unscaled
    true_grads = jax.grad(loss_fn)(params0)
    chex.assert_trees_all_close(grads, true_grads, rtol=1e-6)

    # The project's chain vs the same chain fed the true gradients directly, over a few steps.
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    tx = skip_nonfinite(inner)
    p_scaled, s_scaled = params0, tx.init(params0)
    p_ref, s_ref = params0, inner.init(params0)
    scaled_update = jax.jit(lambda p, s, ls: tx.update(scaled_value_and_grad(loss_fn, ls)(p)[1], s, p))
    ref_update = jax.jit(lambda p, s: inner.update(jax.grad(loss_fn)(p), s, p))
    for _ in range(3):
        u, s_scaled = scaled_update(p_scaled, s_scaled, ls)
        u_ref, s_ref = ref_update(p_ref, s_ref)
        chex.assert_trees_all_close(u, u_ref, rtol=1e-6, atol=1e-12)
        p_scaled, p_ref = optax.apply_updates(p_scaled, u), optax.apply_updates(p_ref, u_ref)
    chex.assert_trees_all_close(p_scaled, p_ref, rtol=1e-6)

    # Adam hides a constant factor in its input, so check with a scale-sensitive optimizer too: the
    # clip must see the true norm. |g| = 5: clipped to norm 1; |g| = 0.05 (scaled: 1638): left alone.
    sgd = skip_nonfinite(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)))
    for coef, expected_norm in ((1.0, 0.1), (0.01, 0.1 * 0.05)):
        def small(params, coef=coef):
            return coef * jnp.dot(params["w"], c)

        _, g, _ = scaled_value_and_grad(small, make_loss_scale("dynamic"))(params0)
        u, _ = sgd.update(g, sgd.init(params0), params0)
        np.testing.assert_allclose(float(optax.tree.norm(u)), expected_norm, rtol=1e-5)
        direction = -np.asarray(c) / 5.0
        np.testing.assert_allclose(np.asarray(u["w"]), expected_norm * direction, rtol=1e-5, atol=1e-9)


def test_jit_step_carries_loss_scale():
    tx = _tx()
    traces = []

    def counted(params, opt_state, loss_scale, x):
        traces.append(1)
        return _make_step(_toy_loss, tx)(params, opt_state, loss_scale, x)

    jitted = jax.jit(counted)
    eager = _make_step(_toy_loss, tx)
    xs = [X_OK, X_OVERFLOW, X_OK, X_OK]
    params = _toy_params()
    state_j = (params, tx.init(params), make_loss_scale("dynamic", period=2, min_scale=4.0))
    state_e = state_j
    scales = []
    for x in xs:
        *state_j, loss_j, fin_j = jitted(*state_j, x)
        *state_e, loss_e, fin_e = eager(*state_e, x)
        assert bool(fin_j) == bool(fin_e)
        chex.assert_trees_all_close(loss_j, loss_e)
        scales.append(float(state_j[2].loss_scale))
    assert len(traces) == 1  # a new scale value is data, not a new trace
    ls_j, ls_e = state_j[2], state_e[2]
    assert isinstance(ls_j, DynamicLossScale)
    assert (ls_j.period, ls_j.factor, float(ls_j.min_loss_scale)) == (2, 2, 4.0)
    chex.assert_trees_all_equal(ls_j, ls_e)
    assert scales == [2.0**15, 2.0**14, 2.0**14, 2.0**15]
    chex.assert_trees_all_close(state_j[0], state_e[0], rtol=1e-6)
    chex.assert_trees_all_equal(skipped_steps(state_j[1]), skipped_steps(state_e[1]), jnp.int32(1))


# ============================================== fp16 training: scaling rescues underflowing gradients
# The loss is the mean token cross-entropy times LOSS_WEIGHT (think: a small loss weight, or a mean over
# a huge batch). Its largest true gradient entry is ~0.13 * 3e-8 = 4e-9, below float16's smallest
# subnormal (6e-8; anything under 3e-8 rounds to 0), so without scaling every float16 cotangent in the
# backward pass is exactly zero. Times 2**15 they are ~1e-4 and survive.
LOSS_WEIGHT = 3e-8
STEPS = 30
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1)


@pytest.fixture(scope="module")
def fp16_setup():
    config = ModelConfig.preset("tiny3", **TINY)
    params = init_params(config, jax.random.key(0), "fp16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {F32}  # fp16 policy: float32 params
    ids = jax.random.randint(jax.random.key(1), (4, 17), 0, config.vocab_size)
    return config, params, ids


def _train(config, params, ids, policy, loss_scale):
    model = MiniMindLM(config, policy)

    def loss_fn(p, ids):
        out = model.apply({"params": p}, ids[:, :-1], train=True)
        assert out.logits.dtype == F32
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits.astype(jnp.float32), ids[:, 1:]).mean()
        return ce * LOSS_WEIGHT, ce

    # Adam with an eps far below the (tiny) gradients is scale-invariant: it learns iff the gradients
    # are non-zero, and does nothing at all when they are exactly zero.
    tx = skip_nonfinite(optax.adam(1e-2, eps=1e-20))

    # LLVM -O0: about a third of the compile time. The XLA graph (every float16 cast) is the same; only
    # the codegen differs, which may move the last bits of float32 reductions.
    @partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def step(params, opt_state, loss_scale):
        (_, ce), grads, finite = scaled_value_and_grad(loss_fn, loss_scale, has_aux=True)(params, ids)
        loss_scale = loss_scale.adjust(finite)
        updates, opt_state = tx.update(grads, opt_state, params)
        leaves = jax.tree.leaves(grads)
        nonzero = sum(jnp.sum(g != 0) for g in leaves) / sum(g.size for g in leaves)
        return optax.apply_updates(params, updates), opt_state, loss_scale, ce, nonzero, finite

    opt_state = tx.init(params)
    losses, nonzero, finite = [], [], []
    for _ in range(STEPS):
        params, opt_state, loss_scale, ce, nz, fin = step(params, opt_state, loss_scale)
        losses.append(float(ce))
        nonzero.append(float(nz))
        finite.append(bool(fin))
    return np.array(losses), np.array(nonzero), finite, loss_scale


def test_fp16_dynamic_scaling_learns_where_unscaled_underflows(fp16_setup):
    config, params, ids = fp16_setup
    unscaled, nz_unscaled, fin_u, _ = _train(config, params, ids, "fp16", make_loss_scale("none"))
    scaled, nz_scaled, fin_s, ls = _train(config, params, ids, "fp16", make_loss_scale("dynamic"))
    ref, nz_ref, _, _ = _train(config, params, ids, "fp32", make_loss_scale("none"))
    for name, losses in (("fp16 unscaled", unscaled), ("fp16 dynamic", scaled), ("fp32", ref)):
        print(f"{name:14s} loss {losses[0]:.4f} -> {losses[-1]:.4f}  ({np.array2string(losses[::5], precision=3)})")
    print(f"non-zero gradient fraction at step 1: unscaled {nz_unscaled[0]:.4f}, "
          f"scaled {nz_scaled[0]:.4f}, fp32 {nz_ref[0]:.4f}")

    initial = np.log(config.vocab_size)
    assert abs(unscaled[0] - initial) < 0.2 and abs(scaled[0] - initial) < 0.2
    # Unscaled fp16: the gradients underflow to zero and nothing is learned.
    assert nz_unscaled.max() < 0.01
    assert unscaled[-1] > 0.99 * unscaled[0]
    # Dynamic scaling (2**15, never overflowing here): non-zero gradients, the loss falls clearly.
    assert all(fin_s) and float(ls.loss_scale) == 2.0**15
    assert nz_scaled[0] > 0.5
    assert scaled[-1] < 0.8 * scaled[0]
    # Sanity: float32 learns too (and the scaled fp16 run keeps up with it).
    assert nz_ref[0] > 0.99
    assert ref[-1] < 0.8 * ref[0]
    assert scaled[-1] < 0.5 * (unscaled[-1] + ref[-1])


def test_dynamic_loss_scale_survives_placeholder_trees_and_orbax(tmp_path):
    """Orbax maps the saved state to None placeholders (and jax to ShapeDtypeStructs): unflattening must not
    validate the leaves. Regression: an fp16 run crashed at its first checkpoint save."""
    import orbax.checkpoint as ocp

    ls = make_loss_scale("dynamic", initial=2.0 ** 10, period=7, factor=4, min_scale=8.0)
    placeholders = jax.tree.map(lambda x: None, ls)
    assert isinstance(placeholders, type(ls)) and placeholders.loss_scale is None
    abstract = jax.eval_shape(lambda: ls)
    assert abstract.loss_scale.dtype == jnp.float32
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ls", {"loss_scale": ls})
    with ocp.StandardCheckpointer() as ckpt:
        back = ckpt.restore(tmp_path / "ls", {"loss_scale": abstract})["loss_scale"]
    assert (back.period, back.factor) == (7, 4)
    assert float(back.loss_scale) == 2.0 ** 10 and float(back.min_loss_scale) == 8.0
    assert float(back.adjust(jnp.array(False)).loss_scale) == 2.0 ** 8


# ==================================================================== the engine's fused update path
def test_all_finite_matches_jmp():
    import jmp

    from minimind_jax.precision import all_finite

    ok = {"a": jnp.ones((3, 4)), "b": jnp.arange(5, dtype=jnp.bfloat16), "c": jnp.float32(3e38)}
    assert bool(all_finite(ok)) and bool(jmp.all_finite(ok))
    for bad in (jnp.inf, -jnp.inf, jnp.nan):
        tree = {**ok, "a": ok["a"].at[2, 1].set(bad)}
        assert not bool(jax.jit(all_finite)(tree)) and not bool(jmp.all_finite(tree))
        tree = {**ok, "b": ok["b"].at[4].set(bad)}  # a bf16 leaf
        assert not bool(all_finite(tree))
    assert bool(all_finite({}))


@pytest.mark.parametrize("norm", [0.3, 5.0])
def test_clip_by_global_norm_is_torchs(norm):
    """Our clip == ``torch.nn.utils.clip_grad_norm_`` (MiniMind's): scale by min(1, max / (norm + 1e-6)),
    and equals optax's clip up to rounding."""
    from minimind_jax.precision import clip_by_global_norm

    rng = np.random.RandomState(0)
    grads = {"w": rng.randn(7, 5).astype(np.float32), "b": rng.randn(5).astype(np.float32)}
    total = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
    grads = {k: v * np.float32(norm / total) for k, v in grads.items()}
    ours, _ = clip_by_global_norm(1.0).update(jax.tree.map(jnp.asarray, grads), optax.EmptyState())
    coef = min(1.0, 1.0 / (norm + 1e-6))
    for k, g in grads.items():
        np.testing.assert_allclose(np.asarray(ours[k]), g * coef, rtol=1e-6)
    theirs, _ = optax.clip_by_global_norm(1.0).update(jax.tree.map(jnp.asarray, grads), optax.EmptyState())
    chex.assert_trees_all_close(ours, theirs, rtol=2e-6)


def test_guarded_update_equals_apply_if_finite():
    """``guarded_update`` (one cond over update + apply) gives the params and the full optimizer state that
    ``skip_nonfinite``'s own ``update`` + ``apply_updates`` give, on finite and on non-finite gradients
    (skipped: params and moments untouched, counters bumped), over a few steps."""
    from minimind_jax.precision import all_finite, clip_by_global_norm, guarded_update

    tx = skip_nonfinite(optax.chain(clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1)))
    plain = optax.apply_if_finite(tx.inner, 2**31 - 1)
    params = _toy_params()
    a_p, a_s = params, tx.init(params)
    b_p, b_s = params, plain.init(params)

    @jax.jit
    def fused(p, s, g):
        return guarded_update(tx, g, s, p, all_finite(g))

    @jax.jit
    def reference(p, s, g):
        u, s = plain.update(g, s, p)
        return optax.apply_updates(p, u), s

    rng = np.random.RandomState(3)
    for i in range(6):
        g = jax.tree.map(lambda x: jnp.asarray(rng.randn(*x.shape), jnp.float32), params)
        if i in (2, 3):
            g = {**g, "w": g["w"].at[1].set(jnp.nan if i == 2 else jnp.inf)}
        before = a_p
        a_p, a_s = fused(a_p, a_s, g)
        b_p, b_s = reference(b_p, b_s, g)
        chex.assert_trees_all_close((a_p, a_s), (b_p, b_s), rtol=1e-6, atol=1e-7)
        if i in (2, 3):
            chex.assert_trees_all_equal(a_p, before)
    assert int(skipped_steps(a_s)) == 2 and int(a_s.notfinite_count) == 0 and bool(a_s.last_finite)
    assert int(a_s.inner_state[1][0].count) == 4  # adam counted the four finite steps only


# ------------------------------------------------------------------------------ matmul precision on GPUs
@pytest.mark.parametrize("name, highest", [("fp32", True), ("tf32", False), ("bf16", False)])
def test_fp32_policy_pins_highest_matmul_precision_for_cuda(name, highest):
    """NVIDIA GPUs run float32 dots as TF32 by default: the fp32 policy lowers every dot of the model at
    HIGHEST for CUDA (checked in the exported module, no GPU needed); ``tf32`` opts out by name."""
    config = ModelConfig.preset("tiny3", vocab_size=128)
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    fn = jax.jit(lambda p, ids: MiniMindLM(config, name).apply({"params": p}, ids).logits)
    text = jax.export.export(fn, platforms=["cuda"])(params, ids).mlir_module()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert dots and all(("HIGHEST" in line) == highest for line in dots)
    assert get_policy(name).compute_dtype == (jnp.bfloat16 if name == "bf16" else jnp.float32)
