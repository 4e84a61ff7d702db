"""Mixture of experts: both dispatch implementations against a naive per-token numpy reference, MiniMind's
two aux losses (batch level for minimind-3, sequence level for minimind2), the model-level aux sum,
sorted == dense on full models (logits and gradients), gradient flow to chosen / unchosen experts, bf16.

The references below are deliberately written as plain loops over tokens, experts and sequences,
following MiniMind's definitions, not the module's vectorised code.
"""

import functools
from unittest import mock

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import random_ids, tiny

import minimind_jax.model.moe as moe_mod
from minimind_jax import MiniMindLM
from minimind_jax.model.moe import MoE
from minimind_jax.precision import get_policy

IMPLS = ("dense", "sorted")
BATCH, SEQ = 2, 5

# Configs for the module-level checks. initializer_range 0.1 (instead of 0.02) makes the expert outputs
# O(1) and the router logits well spread, so a 1e-5 tolerance is a real check and no top-k is a near tie.
MOE_CONFIGS = {
    "tiny3-moe": ("tiny3-moe", {}),  # minimind-3: top-2 of 4, renormalised, no shared experts
    "tiny2-moe": ("tiny2-moe", {}),  # minimind2: top-2 of 4, renormalised, 1 shared expert
    "tiny2-moe-top1": ("tiny2-moe", {"num_experts_per_tok": 1}),  # minimind2 top-1: raw probability
    "tiny3-moe-top1": ("tiny3-moe", {"num_experts_per_tok": 1}),  # minimind-3 top-1: weight exactly 1
    "tiny3-moe-no-norm": ("tiny3-moe", {"norm_topk_prob": False}),  # raw top-2 probabilities
    "tiny3-moe-2shared": ("tiny3-moe", {"n_shared_experts": 2}),  # shared experts outside minimind2
}


def moe_config(key, impl="dense", **extra):
    preset, overrides = MOE_CONFIGS[key]
    return tiny(preset, initializer_range=0.1, moe_impl=impl, **{**overrides, **extra})


def random_x(seed=0, shape=(BATCH, SEQ, 64)):
    return jnp.asarray(np.random.RandomState(seed).randn(*shape), jnp.float32)


def fill_params(abstract, std, seed):
    """Concrete float32 params for an abstract (``jax.eval_shape`` of ``init``) params tree: RMSNorm
    ``weight``s are ones, every other leaf ~ N(0, std) from numpy. Cheaper than compiling each init."""
    rng = np.random.RandomState(seed)

    def leaf(path, a):
        if getattr(path[-1], "key", None) == "weight":
            return jnp.ones(a.shape, a.dtype)
        return jnp.asarray(rng.randn(*a.shape) * std, a.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


@functools.lru_cache(maxsize=None)
def _moe_params(config, seed):
    module = MoE(config, get_policy("fp32"))
    x = jnp.zeros((1, 2, config.hidden_size), jnp.float32)
    abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(seed), x))["params"]
    h, inter, e = config.hidden_size, config.moe_intermediate_size, config.num_experts
    assert abstract["gate"].shape == (h, e)
    assert abstract["experts"]["gate_proj"].shape == (e, h, inter)
    assert abstract["experts"]["down_proj"].shape == (e, inter, h)
    return fill_params(abstract, config.initializer_range, seed)


def moe_params(config, seed=0):
    """MoE params (float32), shared by every config with the same parameter shapes."""
    shape_key = tiny("tiny3-moe", hidden_size=config.hidden_size, num_experts=config.num_experts,
                     moe_intermediate_size=config.moe_intermediate_size,
                     n_shared_experts=config.n_shared_experts, initializer_range=config.initializer_range)
    return _moe_params(shape_key, seed)


@functools.lru_cache(maxsize=None)
def model_params(name):
    """Full-model params for a tiny preset (MiniMind's init: N(0, 0.02), RMSNorm weights 1)."""
    config = tiny(name)
    model = MiniMindLM(config)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    return fill_params(abstract, config.initializer_range, 0)


def _spy_apply(module, params, x):
    """``module.apply`` that also returns the top-k indices the module routed with, captured by spying on
    ``moe.route`` while the caller is traced."""
    captured = []
    real_route = moe_mod.route

    def spy(logits, cfg):
        out = real_route(logits, cfg)
        captured.append(out[2])
        return out

    with mock.patch.object(moe_mod, "route", spy):
        y, aux = module.apply({"params": params}, x)
    assert len(captured) == 1
    return y, aux, captured[0]


def moe_fns(config, policy="fp32"):
    """jit(params, x) -> {"eval": (y, aux, idx), "train": (y, aux, idx)}: one compile per config/policy."""
    return _moe_fns(config, policy)  # one cache key however the caller spells the arguments


@functools.lru_cache(maxsize=None)
def _moe_fns(config, policy):
    pol = get_policy(policy)

    def fn(params, x):
        return {"eval": _spy_apply(MoE(config, pol, train=False), params, x),
                "train": _spy_apply(MoE(config, pol, train=True), params, x)}

    return jax.jit(fn)


def moe_fn(config, policy="fp32", train=False):
    fns = moe_fns(config, policy)
    return lambda params, x: fns(params, x)["train" if train else "eval"]


# ------------------------------------------------------------------------------------------ reference
def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _silu(v):
    return v / (1.0 + np.exp(-v))


def _expert(bank, e, v):
    """One SwiGLU expert on one token vector: down(silu(gate v) * up v)."""
    return (_silu(v @ bank["gate_proj"][e]) * (v @ bank["up_proj"][e])) @ bank["down_proj"][e]


def reference_route(params, x, config):
    """Per token: softmax probabilities (E,), top-k expert indices and weights, all in float64."""
    p = _np(params)
    xf = np.asarray(x, np.float64).reshape(-1, config.hidden_size)
    k = config.num_experts_per_tok
    probs, chosen, weights = [], [], []
    for v in xf:
        logits = v @ p["gate"]
        s = np.exp(logits - logits.max())
        s = s / s.sum()
        top = list(np.argsort(-s, kind="stable")[:k])
        w = [s[e] for e in top]
        if config.generation == "minimind3":
            renorm = config.norm_topk_prob
        else:  # minimind2 renormalises only when it picks more than one expert
            renorm = config.norm_topk_prob and k > 1
        if renorm:
            total = sum(w)
            w = [wi / (total + 1e-20) for wi in w]
        probs.append(s)
        chosen.append(top)
        weights.append(w)
    return np.stack(probs), np.asarray(chosen), np.asarray(weights)


def reference_moe(params, x, config):
    """Naive MoE forward: loop over tokens, then over each token's chosen experts (+ shared experts)."""
    p = _np(params)
    b, t, h = x.shape
    xf = np.asarray(x, np.float64).reshape(-1, h)
    _, chosen, weights = reference_route(params, x, config)
    y = np.zeros_like(xf)
    for n, v in enumerate(xf):
        for e, w in zip(chosen[n], weights[n]):
            y[n] += w * _expert(p["experts"], e, v)
        for s in range(config.n_shared_experts):
            y[n] += _expert(p["shared_experts"], s, v)
    return y.reshape(b, t, h)


def reference_aux(params, x, config):
    """MiniMind's load-balancing loss for one MoE layer, from the definitions."""
    probs, chosen, _ = reference_route(params, x, config)
    b, t, _ = x.shape
    e_num, k, coef = config.num_experts, config.num_experts_per_tok, config.router_aux_loss_coef
    if config.seq_aux:  # minimind2: coef * mean_b sum_i ce_bi * mean_t p_bti
        per_seq = []
        for bi in range(b):
            rows = range(bi * t, (bi + 1) * t)
            total = 0.0
            for i in range(e_num):
                count = sum(1 for n in rows for e in chosen[n] if e == i)
                ce = count / (t * k / e_num)
                mean_p = sum(probs[n][i] for n in rows) / t
                total += ce * mean_p
            per_seq.append(total)
        return coef * sum(per_seq) / b
    n_tok = b * t  # minimind-3: coef * E * sum_i load_i * mean_prob_i over all tokens
    # MiniMind2's batch-level branch (seq_aux=False) averages the one-hot picks over the n*k choices
    # (F.one_hot(topk_idx.view(-1)).mean(0)), minimind-3 over the n tokens.
    per = n_tok * k if config.generation == "minimind2" else n_tok
    total = 0.0
    for i in range(e_num):
        load = sum(1 for n in range(n_tok) for e in chosen[n] if e == i) / per
        mean_p = sum(probs[n][i] for n in range(n_tok)) / n_tok
        total += load * mean_p
    return coef * e_num * total


# ------------------------------------------------------------------------- 1. dispatch vs the reference
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("key", list(MOE_CONFIGS))
def test_moe_output_equals_naive_reference(key, impl):
    config = moe_config(key, impl)
    params, x = moe_params(config), random_x(1)
    y, aux, idx = moe_fn(config)(params, x)
    chex.assert_shape(y, x.shape)
    chex.assert_type(y, jnp.float32)
    ref = reference_moe(params, x, config)
    assert np.abs(ref).max() > 0.1  # outputs are O(1): the tolerance below is meaningful
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5, rtol=1e-5)
    # The module routed exactly as the reference (compared as sets: top_k's order is not part of the spec).
    _, chosen, _ = reference_route(params, x, config)
    assert [set(r) for r in np.asarray(idx).tolist()] == [set(r) for r in chosen.tolist()]
    assert float(aux) == 0.0  # eval mode


def test_minimind2_top1_uses_the_raw_probability_and_minimind3_top1_weight_one():
    """The weight rule, isolated: with one expert per token, (y - shared experts) / expert(x) is the
    weight; minimind2 keeps the router probability (< 1), minimind-3 renormalises it to exactly 1."""
    x = random_x(1)
    for key, expect_raw in (("tiny2-moe-top1", True), ("tiny3-moe-top1", False)):
        config = moe_config(key)
        params = moe_params(config)
        y = moe_fn(config)(params, x)[0]
        probs, chosen, _ = reference_route(params, x, config)
        p = _np(params)
        xf = np.asarray(x, np.float64).reshape(-1, config.hidden_size)
        yf = np.asarray(y, np.float64).reshape(-1, config.hidden_size)
        for n, v in enumerate(xf):
            routed = yf[n] - sum(_expert(p["shared_experts"], s, v) for s in range(config.n_shared_experts))
            e = chosen[n][0]
            out = _expert(p["experts"], e, v)
            # least-squares weight over all hidden units (and the fit must be exact)
            weight = float(routed @ out / (out @ out))
            np.testing.assert_allclose(routed, weight * out, atol=1e-5)
            expected = probs[n][e] if expect_raw else 1.0
            np.testing.assert_allclose(weight, expected, rtol=1e-5)
            if expect_raw:
                assert weight < 0.99  # really un-normalised (4 experts: the top probability is < 1)


# ------------------------------------------------------------------------------------------ 2. aux loss
# The aux loss is computed from the router alone, so the impl matters only in that both must pass it on;
# the extra configs run once (dense) to keep compile time down.
AUX_CASES = [
    *[(key, {}, impl) for key in ("tiny3-moe", "tiny2-moe", "tiny3-moe-top1", "tiny2-moe-top1")
      for impl in IMPLS],  # batch level (minimind-3) and sequence level (minimind2), k = 2 and 1
    ("tiny2-moe", {"num_experts_per_tok": 3}, "dense"),
    ("tiny3-moe", {"seq_aux": True}, "dense"),  # the switch is honoured whatever the generation
    ("tiny2-moe", {"seq_aux": False}, "sorted"),
]


@pytest.mark.parametrize("key,extra,impl", AUX_CASES)
def test_aux_loss_equals_the_definition(key, extra, impl):
    config = moe_config(key, impl, **extra)
    params, x = moe_params(config), random_x(1)  # batch 2 != seq 5: the two levels cannot be confused
    out = moe_fns(config)(params, x)
    y, aux, idx = out["train"]
    chex.assert_shape(aux, ())
    chex.assert_type(aux, jnp.float32)
    expected = reference_aux(params, x, config)
    assert expected > 0
    np.testing.assert_allclose(float(aux), expected, rtol=1e-5)
    # train mode changes nothing but the aux loss; eval has exactly zero aux
    chex.assert_trees_all_close((y, idx), out["eval"][::2], atol=0, rtol=0)
    np.testing.assert_allclose(np.asarray(y), reference_moe(params, x, config), atol=1e-5, rtol=1e-5)
    assert float(out["eval"][1]) == 0.0


def test_aux_levels_differ_on_the_same_routing():
    """Batch vs sequence level on identical params and input: different numbers (not a silent alias)."""
    x = random_x(1)
    base = moe_config("tiny3-moe")
    params = moe_params(base)
    batch_level = float(moe_fn(base, train=True)(params, x)[1])
    seq_level = float(moe_fn(base.replace(seq_aux=True), train=True)(params, x)[1])
    np.testing.assert_allclose(batch_level, reference_aux(params, x, base), rtol=1e-5)
    np.testing.assert_allclose(seq_level, reference_aux(params, x, base.replace(seq_aux=True)), rtol=1e-5)
    assert abs(batch_level - seq_level) > 1e-4 * batch_level


@pytest.mark.parametrize("key,impl", [("tiny3-moe", "sorted"), ("tiny2-moe", "dense")])
def test_aux_loss_zero_with_zero_coef(key, impl):
    config = moe_config(key, impl)
    params, x = moe_params(config), random_x(1)
    y_eval, aux_eval, _ = moe_fn(config, train=False)(params, x)
    assert float(aux_eval) == 0.0
    y_zero, aux_zero, _ = moe_fn(config.replace(router_aux_loss_coef=0.0), train=True)(params, x)
    assert float(aux_zero) == 0.0
    chex.assert_trees_all_close(y_eval, y_zero, atol=0, rtol=0)


# ------------------------------------------------------------------- full model (tests 3 and 4 share it)
def _is_moe(mdl, _name):
    return isinstance(mdl, MoE)


@functools.lru_cache(maxsize=None)
def model_results(name, impl):
    """Loss = mean(logits^2) + aux_loss in training mode, its gradient, and each MoE layer's own
    ``(y, aux)`` captured with ``capture_intermediates``; one jit per (preset, impl)."""
    config = tiny(name, moe_impl=impl)
    model = MiniMindLM(config)
    ids = random_ids((2, 9), seed=11)

    def loss(p):
        out, state = model.apply({"params": p}, ids, train=True, capture_intermediates=_is_moe,
                                 mutable=["intermediates"])
        return jnp.mean(jnp.square(out.logits)) + out.aux_loss, (out, state["intermediates"])

    (value, (out, inter)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(model_params(name))
    return config, value, out, inter, grads


# --------------------------------------------------------------------------- 3. model aux = sum of layers
@pytest.mark.parametrize("name", ["tiny3-moe", "tiny2-moe"])
def test_model_aux_loss_is_the_sum_over_moe_layers(name):
    config, _, out, inter, _ = model_results(name, "dense")
    per_layer = []
    for i in range(config.num_hidden_layers):
        (y, aux), = inter[f"layers_{i}"]["mlp"]["__call__"]  # one call per layer
        chex.assert_shape(y, (2, 9, config.hidden_size))
        chex.assert_shape(aux, ())
        per_layer.append(float(aux))
    assert set(inter) == {f"layers_{i}" for i in range(config.num_hidden_layers)}
    assert len(per_layer) == config.num_hidden_layers == 2
    assert all(a > 0 for a in per_layer)
    total = float(out.aux_loss)
    chex.assert_type(out.aux_loss, jnp.float32)
    assert total > 0
    np.testing.assert_allclose(total, sum(per_layer), rtol=1e-6)
    for a in per_layer:  # both layers contribute: the total is no single layer's value
        assert abs(total - a) > 0.1 * a


# ------------------------------------------------------------------------ 4. sorted == dense, full model
@pytest.mark.parametrize("name", ["tiny3-moe", "tiny2-moe"])
def test_sorted_and_dense_give_the_same_logits_and_gradients(name):
    _, v_d, out_d, inter_d, g_d = model_results(name, "dense")
    _, v_s, out_s, inter_s, g_s = model_results(name, "sorted")
    assert float(out_d.aux_loss) > 0
    chex.assert_trees_all_close(out_s.logits, out_d.logits, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(out_s.aux_loss, out_d.aux_loss, atol=1e-7, rtol=1e-5)
    chex.assert_trees_all_close(inter_s, inter_d, atol=1e-5, rtol=1e-5)  # every layer's (y, aux)
    chex.assert_trees_all_close(v_s, v_d, atol=1e-6, rtol=1e-5)
    chex.assert_trees_all_equal_structs(g_s, g_d)
    chex.assert_tree_all_finite(g_d)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_d))
    chex.assert_trees_all_close(g_s, g_d, atol=1e-5 * scale, rtol=1e-4)
    # the router and every routed expert of every layer get a gradient
    for i in range(2):
        mlp = g_d[f"layers_{i}"]["mlp"]
        assert float(jnp.max(jnp.abs(mlp["gate"]))) > 0
        assert float(jnp.min(jnp.max(jnp.abs(mlp["experts"]["down_proj"]), axis=(1, 2)))) > 0


# ------------------------------------------------------------------------------------- 5. gradient flow
@pytest.mark.parametrize("key,impl", [("tiny3-moe", "dense"), ("tiny3-moe", "sorted"),
                                      ("tiny2-moe", "dense"), ("tiny2-moe", "sorted"),
                                      ("tiny3-moe-top1", "sorted")])
def test_gradients_reach_chosen_experts_and_skip_unchosen_ones(key, impl):
    config = moe_config(key, impl)
    dead = config.num_experts - 1
    params = dict(moe_params(config))
    x = np.array(random_x(6))
    x[..., 0] = 3.0  # one constant positive feature ...
    gate = np.array(params["gate"])
    gate[0, dead] = -100.0  # ... that pushes expert `dead`'s logit ~300 below the others for every token
    params["gate"] = jnp.asarray(gate)
    x = jnp.asarray(x)
    target = jnp.asarray(np.random.RandomState(8).randn(*x.shape), jnp.float32)

    module = MoE(config, get_policy("fp32"), train=True)

    def loss(q):
        y, aux, idx = _spy_apply(module, q, x)
        return jnp.sum(y * target) + aux, idx

    grads, idx = jax.jit(jax.grad(loss, has_aux=True))(params)
    used = set(np.asarray(idx).ravel().tolist())
    assert dead not in used
    assert used == set(range(config.num_experts)) - {dead}  # the others all serve some token
    chex.assert_tree_all_finite(grads)
    for name in ("gate_proj", "up_proj", "down_proj"):
        g = np.asarray(grads["experts"][name])
        for e in used:
            assert np.abs(g[e]).max() > 0, (name, e)
        assert np.all(g[dead] == 0.0), (name, np.abs(g[dead]).max())  # exactly zero, not merely small
    if config.n_shared_experts:
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert np.abs(np.asarray(grads["shared_experts"][name])).max() > 0
    # the router learns (through the top-k weights when k > 1, and through the aux loss)
    g_gate = np.asarray(grads["gate"])
    assert np.abs(g_gate[:, sorted(used)]).max() > 0


def test_gradients_match_a_finite_difference_of_the_reference():
    """The JAX gradient of one expert weight and one router weight equals a float64 central difference
    of the numpy reference (routing is fixed for a small step)."""
    config = moe_config("tiny2-moe")
    params, x = moe_params(config), random_x(9)
    target = np.random.RandomState(10).randn(*x.shape)
    module = MoE(config, get_policy("fp32"))

    grads = jax.jit(jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x)[0] * target)))(params)
    p64 = _np(params)
    eps = 1e-5
    for path, g in ((("experts", "down_proj", (1, 3, 5)), grads["experts"]["down_proj"][1, 3, 5]),
                    (("gate", (7, 2)), grads["gate"][7, 2])):
        *keys, index = path

        def value(delta):
            q = jax.tree.map(np.copy, p64)
            leaf = q
            for k_ in keys[:-1]:
                leaf = leaf[k_]
            leaf[keys[-1]][index] += delta
            return float(np.sum(reference_moe(q, x, config) * target))

        fd = (value(eps) - value(-eps)) / (2 * eps)
        np.testing.assert_allclose(float(g), fd, rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------------------------- 6. bf16
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("key", ["tiny3-moe", "tiny2-moe"])
def test_bf16_close_to_fp32_with_identical_routing(key, impl):
    config = moe_config(key, impl)
    params = moe_params(config)
    # well-separated routing: the first input whose k-th and (k+1)-th probabilities differ by > 0.02 for
    # every token (bf16 rounding of x moves them by ~1e-3), so no routing decision may flip
    k = config.num_experts_per_tok
    for seed in range(100):
        x32 = random_x(seed)
        probs = reference_route(params, x32, config)[0]
        sorted_p = -np.sort(-probs, axis=-1)
        if (sorted_p[:, k - 1] - sorted_p[:, k]).min() > 0.02:
            break
    else:
        raise AssertionError("no well-separated input found")
    x16 = x32.astype(jnp.bfloat16)  # what the block feeds the MoE under the bf16 policy

    y32, aux32, idx32 = moe_fn(config, "fp32", train=True)(params, x32)
    y16, aux16, idx16 = moe_fn(config, "bf16", train=True)(params, x16)
    chex.assert_type(y16, jnp.bfloat16)
    chex.assert_type(aux16, jnp.float32)  # router and aux stay float32
    np.testing.assert_array_equal(np.sort(np.asarray(idx16), -1), np.sort(np.asarray(idx32), -1))
    scale = float(jnp.max(jnp.abs(y32)))
    err = float(jnp.max(jnp.abs(y16.astype(jnp.float32) - y32)))
    assert err < 2e-2 * scale, (err, scale)
    np.testing.assert_allclose(float(aux16), float(aux32), rtol=1e-2)
