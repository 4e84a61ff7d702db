"""The Flax model: shapes and dtypes per policy, causality, masks, the KV cache, scan / remat, dropout, and the
attention kernels."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import VOCAB, cached_params, random_ids, tiny, to_scanned

from minimind_jax import KVCache, MiniMindLM, ModelConfig, init_params, logical_axes
from minimind_jax.model.attention import attend, attention_bias
from minimind_jax.precision import POLICIES, get_policy


def logits_fn(config, policy="fp32", **kw):
    model = MiniMindLM(config, policy)
    return jax.jit(lambda p, ids: model.apply({"params": p}, ids, **kw).logits)


class PolicyShapesTest(chex.TestCase):
    def check(self, name, policy_name, fn_wrapper):
        config, policy = tiny(name), get_policy(policy_name)
        params = cached_params(config, 0, policy_name)
        for leaf in jax.tree.leaves(params):
            chex.assert_type(leaf, policy.param_dtype)
        model = MiniMindLM(config, policy)
        fn = fn_wrapper(lambda p, ids: model.apply({"params": p}, ids, train=True))
        out = fn(params, random_ids((2, 7)))
        chex.assert_shape(out.logits, (2, 7, VOCAB))
        chex.assert_type(out.logits, policy.output_dtype)
        chex.assert_shape(out.aux_loss, ())
        chex.assert_type(out.aux_loss, jnp.float32)
        chex.assert_tree_all_finite(out.logits)
        assert out.cache is None
        if config.use_moe:
            assert float(out.aux_loss) > 0

    @chex.variants(with_jit=True, without_jit=True)
    def test_moe_under_bf16_with_and_without_jit(self):
        self.check("tiny2-moe", "bf16", self.variant)

    def test_shapes_and_dtypes_under_every_policy(self):
        for name in ("tiny3-moe", "tiny2"):
            for policy_name in POLICIES:
                self.check(name, policy_name, jax.jit)

    def test_training_policies_keep_float32_params(self):
        for policy_name in ("fp32", "bf16", "fp16"):
            params = cached_params(tiny("tiny3-moe"), 0, policy_name)
            assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name", ["tiny3", "tiny3-moe", "tiny2", "tiny2-moe"])
def test_causality(name):
    config = tiny(name)
    params = cached_params(config)
    fn = logits_fn(config)
    apply = lambda ids: fn(params, ids)  # noqa: E731
    ids = random_ids((2, 12))
    base = apply(ids)
    for j in (0, 5, 11):
        changed = apply(ids.at[:, j].set((ids[:, j] + 7) % VOCAB))
        chex.assert_trees_all_close(changed[:, :j], base[:, :j], atol=1e-6, rtol=0)
        assert np.abs(np.asarray(changed[:, j:] - base[:, j:])).max() > 1e-4, "a later position must change"


@pytest.mark.parametrize("name", ["tiny3", "tiny2-moe"])
def test_padding_mask(name):
    config = tiny(name)
    params = cached_params(config)
    model = MiniMindLM(config)
    apply = jax.jit(lambda ids, mask, pos: model.apply({"params": params}, ids, attention_mask=mask,
                                                       position_ids=pos).logits)
    ids = random_ids((1, 10))
    mask = jnp.asarray([[1] * 7 + [0] * 3])
    # Right padding: what sits in the padded slots never changes the real positions.
    a = apply(ids, mask, None)
    b = apply(ids.at[:, 7:].set(5), mask, None)
    chex.assert_trees_all_close(a[:, :7], b[:, :7], atol=1e-6, rtol=0)
    # Left padding with positions counted from the first real token equals the unpadded sequence.
    real = ids[:, :7]
    alone = logits_fn(config)(params, real)
    padded = jnp.concatenate([jnp.full((1, 3), 9, jnp.int32), real], axis=1)
    left_mask = jnp.asarray([[0] * 3 + [1] * 7])
    positions = jnp.maximum(jnp.cumsum(left_mask, axis=1) - 1, 0)
    out = apply(padded, left_mask, positions)
    chex.assert_trees_all_close(out[:, 3:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny3", "tiny3-moe", "tiny2", "tiny2-moe"])
@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decoding_equals_full_forward(name, scan):
    config = tiny(name, scan_layers=scan)
    params = cached_params(config)
    model = MiniMindLM(config)
    b, prompt, total, max_len = 2, 5, 11, 16
    ids = random_ids((b, total), seed=4)
    full = logits_fn(config)(params, ids)

    step = jax.jit(lambda ids, cache: model.apply({"params": params}, ids, cache=cache))
    cache = KVCache.init(config, b, max_len)
    out = step(ids[:, :prompt], cache)  # prefill
    pieces = [out.logits]
    cache = out.cache
    assert int(cache.index) == prompt
    for t in range(prompt, total):  # one token at a time
        out = step(ids[:, t:t + 1], cache)
        pieces.append(out.logits)
        cache = out.cache
    assert int(cache.index) == total
    chex.assert_trees_all_close(jnp.concatenate(pieces, axis=1), full, atol=2e-5, rtol=2e-5)


def test_kv_cache_with_left_padding_mask():
    """Two prompts of different lengths, left padded in one batch, decode like each alone."""
    config = tiny("tiny3-moe")
    params = cached_params(config)
    model = MiniMindLM(config)
    step = jax.jit(lambda ids, mask, pos, cache: model.apply(
        {"params": params}, ids, attention_mask=mask, position_ids=pos, cache=cache))
    max_len = 12
    long, short = random_ids((1, 6), seed=6), random_ids((1, 3), seed=7)
    ids = jnp.concatenate([long, jnp.concatenate([jnp.zeros((1, 3), jnp.int32), short], axis=1)])
    mask = jnp.zeros((2, max_len), jnp.int32).at[0, :6].set(1).at[1, 3:6].set(1)
    positions = jnp.asarray([[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 2]])
    out = step(ids, mask, positions, KVCache.init(config, 2, max_len))
    nxt = jnp.asarray([[11], [12]])
    mask = mask.at[:, 6].set(1)
    out2 = step(nxt, mask, jnp.asarray([[6], [3]]), out.cache)
    for row, prompt in ((0, long), (1, short)):
        seq = jnp.concatenate([prompt, nxt[row:row + 1]], axis=1)
        alone = logits_fn(config)(params, seq)
        chex.assert_trees_all_close(out2.logits[row, -1], alone[0, -1], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["tiny3", "tiny2-moe"])
def test_scan_and_remat_match_the_plain_model(name):
    config = tiny(name)
    params = cached_params(config)
    ids = random_ids((2, 9))

    def loss_fn(cfg, p):
        def f(p):
            out = MiniMindLM(cfg).apply({"params": p}, ids, train=True)
            return jnp.mean(jax.nn.logsumexp(out.logits, -1)) + out.aux_loss
        return jax.jit(jax.value_and_grad(f))(p)

    ref_loss, ref_grads = loss_fn(config, params)
    for kw in (dict(scan_layers=True), dict(remat_policy="full"), dict(remat_policy="dots"),
               dict(scan_layers=True, remat_policy="full")):
        cfg = config.replace(**kw)
        p = to_scanned(params, cfg) if cfg.scan_layers else params
        loss, grads = loss_fn(cfg, p)
        chex.assert_trees_all_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
        want = to_scanned(ref_grads, cfg) if cfg.scan_layers else ref_grads
        chex.assert_trees_all_close(grads, want, atol=1e-6, rtol=1e-5)


def test_scanned_params_have_a_layer_axis():
    config = tiny("tiny3-moe", scan_layers=True)
    params = cached_params(config)
    assert params["layers"]["self_attn"]["q_proj"]["kernel"].shape[0] == config.num_hidden_layers
    axes = logical_axes(config)
    assert tuple(axes["layers"]["mlp"]["experts"]["gate_proj"]) == ("layers", "expert", "embed", "mlp")
    assert tuple(axes["embed_tokens"]) == ("vocab", "embed")


def test_dropout_only_in_training():
    config = tiny("tiny2", dropout=0.2)
    params = cached_params(config)
    model = MiniMindLM(config)
    ids = random_ids((2, 8))
    eval_a = logits_fn(config)(params, ids)
    eval_b = logits_fn(config)(params, ids)
    chex.assert_trees_all_equal(eval_a, eval_b)
    train_fn = jax.jit(lambda key: model.apply({"params": params}, ids, train=True, rngs={"dropout": key}).logits)
    train = [train_fn(jax.random.key(s)) for s in (0, 0, 1)]
    chex.assert_trees_all_equal(train[0], train[1])  # same key, same mask
    assert np.abs(np.asarray(train[0] - train[2])).max() > 1e-4
    assert np.abs(np.asarray(train[0] - eval_a)).max() > 1e-4


def test_untied_head_has_its_own_param():
    config = tiny("tiny2", tie_word_embeddings=False)
    params = cached_params(config)
    assert params["lm_head"].shape == (config.hidden_size, VOCAB)
    out = logits_fn(config)(params, random_ids((1, 4)))
    chex.assert_shape(out, (1, 4, VOCAB))


def test_yarn_changes_only_long_range_frequencies():
    from minimind_jax.model.layers import rope_inv_freq

    base = ModelConfig.preset("minimind3")
    plain, _ = rope_inv_freq(base)
    yarn, factor = rope_inv_freq(base.replace(inference_rope_scaling=True))
    assert factor == 1.0
    np.testing.assert_array_equal(yarn[:4], plain[:4])  # high frequencies untouched
    np.testing.assert_allclose(yarn[-1], plain[-1] / 16, rtol=1e-6)  # low ones divided by the factor
    assert np.all(yarn <= plain)


def test_bf16_vs_fp32_logits_on_minimind3_preset(capsys):
    """The seeds' experiment: the same weights run under bf16 and fp32 give close logits."""
    config = ModelConfig.preset("minimind3")
    params = init_params(config, jax.random.key(0))
    ids = random_ids((1, 32))
    f32 = jax.jit(lambda p: MiniMindLM(config, "fp32").apply({"params": p}, ids).logits)(params)
    b16 = jax.jit(lambda p: MiniMindLM(config, "bf16").apply({"params": p}, ids).logits)(params)
    diff = np.abs(np.asarray(f32) - np.asarray(b16))
    with capsys.disabled():
        print(f"\nminimind3 bf16 vs fp32: mean |logit diff| {diff.mean():.2e}, max {diff.max():.2e}, "
              f"mean |logit| {np.abs(np.asarray(f32)).mean():.2e}")
    assert diff.mean() < 1e-2


# ------------------------------------------------------------- gradients (kernels: tests/test_kernels.py)
def _model_case(name, overrides):
    """(config, params) of a tiny preset with ``overrides``; scanned params when the config scans layers."""
    config = tiny(name, **overrides)
    params = cached_params(tiny(name, **{k: v for k, v in overrides.items() if k == "tie_word_embeddings"}))
    return config, (to_scanned(params, config) if config.scan_layers else params)


def _loss_and_grads(config, params, policy, ids, **jit_kw):
    def loss(p, ids):
        out = MiniMindLM(config, policy).apply({"params": p}, ids[:, :-1], train=True)
        logp = jax.nn.log_softmax(out.logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)) + out.aux_loss
    return jax.jit(jax.value_and_grad(loss), **jit_kw)(params, ids)


def _rel_err(a, b):
    """Per-leaf relative L2 error |a - b| / |b| (a pytree of floats)."""
    return jax.tree.map(lambda a, b: float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel())), a, b)


def test_bf16_params_policy_gets_bf16_grads():
    config = tiny("tiny3")
    params = cached_params(config, 0, "bf16-params")
    _, grads = _loss_and_grads(config, params, "bf16-params", random_ids((2, 9)))
    assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.bfloat16)}
    chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize("scan", [False, True])
def test_bf16_custom_projection_under_sharding(scan):
    """pjit on a (data 4, model 2) mesh of the 8 simulated devices: params split on their last axis,
    the batch on ``data``; loss and grads match one device (bf16: partial sums add in another order)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    config = tiny("tiny3-moe", scan_layers=scan, remat_policy="full" if scan else "none")
    params = cached_params(tiny("tiny3-moe"))
    params = to_scanned(params, config) if scan else params
    ids = random_ids((8, 17), seed=5)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    spec = jax.tree.map(lambda x: NamedSharding(mesh, P(*[None] * (x.ndim - 1), "model")), params)
    batch = NamedSharding(mesh, P("data"))
    loss, grads = _loss_and_grads(config, params, "bf16", ids)
    s_loss, s_grads = _loss_and_grads(config, jax.device_put(params, spec), "bf16", jax.device_put(ids, batch),
                                      in_shardings=(spec, batch), out_shardings=(NamedSharding(mesh, P()), spec))
    assert s_grads["embed_tokens"].sharding.spec == P(None, "model")
    assert abs(float(s_loss) - float(loss)) < 1e-4
    for path, err in jax.tree_util.tree_leaves_with_path(_rel_err(s_grads, grads)):
        assert err < 2e-3, f"{jax.tree_util.keystr(path)}: sharded vs one device rel err {err:.2e}"


@pytest.mark.parametrize("scan", [False, True])
def test_decode_loop_updates_the_kv_cache_in_place(scan):
    """The compiled decode loop never copies or re-stacks the whole KV cache per token: the new keys and
    values go into the loop-carried buffer with in-place dynamic-update-slices."""
    from minimind_jax.generate import SamplingParams, _decode, _make_rows, _prefill

    config, policy = tiny("tiny3", scan_layers=scan), get_policy("fp32")
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0), policy))
    rows = _make_rows([SamplingParams()], [8], [2])
    prompt = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    state = jax.eval_shape(lambda p, ids, m: _prefill(p, ids, m, rows, config=config, policy=policy, max_len=96),
                           params, prompt, prompt)
    hlo = _decode.lower(params, state, rows, jnp.int32(8), config=config, policy=policy).compile().as_text()
    full = f"f32[{config.num_hidden_layers},1,96,{config.num_key_value_heads},{config.head_dim}]"
    whole_cache = [line for line in hlo.splitlines() if f"= {full}" in line
                   and (" copy(" in line or " concatenate(" in line)]
    assert any(f"= {full}" in line and "dynamic-update-slice" in line for line in hlo.splitlines())
    assert not whole_cache, whole_cache[:2]


# ------------------------------------------------------------------------------------------------ attention
def _numpy_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(d)) v in float64 over the allowed (t, s) slots, query head i on kv head i // g."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(allowed[:, None], scores, -1e300)  # finite: a fully masked row is uniform, not NaN
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v)


def _attention_case(kind, dtype):
    """(q, k, v, bias, allowed (b, t, s)) for a plain causal mask, left padding, or a cache slot offset."""
    b, t, nh, nkv, d = 2, 6, 4, 2, 8
    s, start, mask = t, 0, None
    if kind == "padding":
        mask = jnp.asarray([[1] * t, [0] * 2 + [1] * (t - 2)], jnp.int32)
    elif kind == "cache":  # t new queries at slots 3.. of a 12-slot buffer, the last 3 slots unwritten
        s, start, mask = 12, jnp.int32(3), jnp.asarray([[1] * 9 + [0] * 3] * b, jnp.int32)
    gen = np.random.default_rng(0)
    q, k, v = (jnp.asarray(gen.standard_normal(shape), dtype) for shape in
               ((b, t, nh, d), (b, s, nkv, d), (b, s, nkv, d)))
    bias = attention_bias(t, s, start, mask)
    allowed = np.arange(s)[None, None, :] <= int(start) + np.arange(t)[None, :, None]
    if mask is not None:
        allowed = allowed & (np.asarray(mask)[:, None, :] == 1)
    return q, k, v, bias, np.broadcast_to(allowed, (b, t, s))


@pytest.mark.parametrize("kind", ["causal", "padding", "cache"])
def test_attention_implementations_match_numpy_and_each_other(kind):
    """The CPU einsums (``xla_cpu``), ``jax.nn.dot_product_attention``'s XLA kernel (``generic``) and ``auto``:
    fp32 outputs within 1e-6 of each other and 2e-6 of a float64 numpy transcription, gradients within 1e-6;
    bf16 within 2e-2 of the fp32 result (fully masked rows, left padding, are excluded: any output is fine)."""
    q, k, v, bias, allowed = _attention_case(kind, jnp.float32)
    assert (bias is None) == (kind == "causal")
    real = allowed.any(-1)  # (b, t): rows with at least one visible key
    want = _numpy_attention(q, k, v, allowed)

    def loss(kernels):
        return jax.jit(jax.value_and_grad(
            lambda q, k, v: jnp.sum(jnp.where(real[..., None, None], attend(q, k, v, bias, kernels), 0) ** 2),
            argnums=(0, 1, 2)))

    ref_out = attend(q, k, v, bias, "xla_cpu")
    np.testing.assert_allclose(np.asarray(ref_out)[real], want[real], atol=2e-6, rtol=0)
    ref_loss, ref_grads = loss("xla_cpu")(q, k, v)
    for kernels in ("generic", "auto"):
        np.testing.assert_allclose(np.asarray(attend(q, k, v, bias, kernels))[real], np.asarray(ref_out)[real],
                                   atol=1e-6, rtol=0)
        value, grads = loss(kernels)(q, k, v)
        np.testing.assert_allclose(float(value), float(ref_loss), rtol=1e-6)
        chex.assert_trees_all_close(grads, ref_grads, atol=1e-6, rtol=1e-6)
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    for kernels in ("xla_cpu", "generic"):
        out = attend(*half, bias, kernels)
        chex.assert_type(out, jnp.bfloat16)
        np.testing.assert_allclose(np.asarray(out, np.float32)[real], np.asarray(ref_out)[real], atol=2e-2, rtol=0)


def test_attention_kernels_switch_is_validated():
    q, k, v, bias, _ = _attention_case("causal", jnp.float32)
    with pytest.raises(ValueError, match="kernels must be one of"):
        attend(q, k, v, bias, "cudnn")


@pytest.mark.parametrize("kernels", ["generic", "xla_cpu"])
def test_model_attention_kernels_match_in_a_padded_forward(kernels):
    """The whole model with either attention kernel against ``auto`` (the CPU einsums here): left padding
    through the mask, fp32 logits within 1e-5."""
    params = cached_params(tiny("tiny3"))
    ids = random_ids((2, 9), seed=3)
    mask = jnp.asarray([[1] * 9, [0] * 4 + [1] * 5])
    out = {k: MiniMindLM(tiny("tiny3", kernels=k)).apply({"params": params}, ids, attention_mask=mask).logits
           for k in ("auto", kernels)}
    chex.assert_trees_all_close(out[kernels], out["auto"], atol=1e-5, rtol=1e-5)
