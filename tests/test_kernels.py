"""The two kernel implementations (minimind_jax.model.kernels): XLA:CPU's custom VJPs against plain einsums and
autodiff, op by op (against float64 numpy) and on every tiny preset (loss and gradients, dense and MoE, with
scan / remat, float32 and bf16); ``auto`` picks the CPU path when lowered for the CPU."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import cached_params, random_ids, tiny, to_scanned

from minimind_jax import MiniMindLM
from minimind_jax.model import kernels


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cpu_projection_backward_is_exact_float32_accumulation(layout, dtype):
    """Both backward dots take the half-precision operands and accumulate in float32: against a float64
    product of the same (rounded) operands, dx is off by one final rounding to ``dtype`` and dw (returned
    float32, the weight's dtype) by float32 summation only."""
    rng = np.random.RandomState(0)
    w_out_in = layout == "out_in"
    x = jnp.asarray(rng.randn(3, 5, 48), dtype)
    w = jnp.asarray(rng.randn(*((32, 48) if w_out_in else (48, 32))) * 0.1, jnp.float32)
    g = jnp.asarray(rng.randn(3, 5, 32), jnp.float32)
    y, vjp = jax.vjp(lambda x, w: kernels.linear(x, w, "xla_cpu", dtype, jnp.float32, w_out_in), x, w)
    dx, dw = jax.jit(vjp)(g)
    chex.assert_type([y, dx, dw], [jnp.float32, dtype, jnp.float32])
    x64 = np.asarray(x, np.float64).reshape(-1, 48)
    w64 = np.asarray(w.astype(dtype), np.float64)
    w64 = w64.T if w_out_in else w64
    g64 = np.asarray(g.astype(dtype), np.float64).reshape(-1, 32)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), x64 @ w64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx, np.float64).reshape(-1, 48), g64 @ w64.T, rtol=1e-2, atol=1e-2)
    want_dw = x64.T @ g64
    np.testing.assert_allclose(np.asarray(dw), want_dw.T if w_out_in else want_dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cpu_silu_product_matches_autodiff(dtype):
    """SwiGLU's product with its float32 elementwise backward: output and both gradients equal autodiff of
    ``silu(gate) * up`` (float32: to rounding; bf16: to bf16 rounding, which autodiff applies to its
    intermediates and ours only to the result)."""
    rng = np.random.RandomState(2)
    gate = jnp.asarray(rng.randn(2, 5, 24) * 2, dtype)
    up = jnp.asarray(rng.randn(2, 5, 24), dtype)
    g = jnp.asarray(rng.randn(2, 5, 24), dtype)
    y, vjp = jax.vjp(lambda a, b: kernels.silu_product(a, b, "xla_cpu"), gate, up)
    ref_y, ref_vjp = jax.vjp(lambda a, b: kernels.silu_product(a, b, "generic"), gate, up)
    grads, ref = jax.jit(vjp)(g), ref_vjp(g)
    chex.assert_type(grads, [dtype, dtype])
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref_y, np.float32), rtol=tol, atol=tol)
    for ours, theirs in zip(grads, ref):
        ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
        assert np.linalg.norm(ours - theirs) <= tol * np.linalg.norm(theirs)


def _case(name, overrides, kernel_impl):
    config = tiny(name, kernels=kernel_impl, **overrides)
    params = cached_params(tiny(name, **{k: v for k, v in overrides.items() if k == "tie_word_embeddings"}))
    return config, (to_scanned(params, config) if config.scan_layers else params)


def _loss_and_grads(config, params, policy, ids):
    def loss(p, ids):
        out = MiniMindLM(config, policy).apply({"params": p}, ids[:, :-1], train=True)
        logp = jax.nn.log_softmax(out.logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)) + out.aux_loss
    return jax.jit(jax.value_and_grad(loss))(params, ids)


def _rel_err(a, b):
    return jax.tree.map(lambda a, b: float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel())), a, b)


# Every tiny preset, dense and MoE (with the kernels' default moe_impl=auto the MoE cases also compare the
# CPU's dense dispatch with the generic grouped matmul), with scan and both remat policies.
CASES = [("tiny3", {}), ("tiny3-moe", {}), ("tiny2", {"tie_word_embeddings": False}),
         ("tiny2-moe", {"scan_layers": True, "remat_policy": "full"}),
         ("tiny3-moe", {"scan_layers": True, "remat_policy": "dots"})]
# bf16: the two backward passes round different intermediates to bf16 (relative rounding 2^-9 ~ 2e-3,
# compounded over a few layers): a relative L2 error of 2e-2 per leaf.
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}


@pytest.mark.parametrize("policy", ["fp32", "bf16"])
@pytest.mark.parametrize("name, overrides", CASES)
def test_xla_cpu_and_generic_kernels_give_the_same_loss_and_grads(name, overrides, policy):
    ids = random_ids((3, 13), seed=4)
    cpu_loss, cpu_grads = _loss_and_grads(*_case(name, overrides, "xla_cpu"), policy, ids)
    gen_loss, gen_grads = _loss_and_grads(*_case(name, overrides, "generic"), policy, ids)
    tol = TOLERANCE[policy]
    assert {leaf.dtype for leaf in jax.tree.leaves(cpu_grads)} == {jnp.dtype(jnp.float32)}  # the params' dtype
    assert abs(float(cpu_loss) - float(gen_loss)) <= tol * abs(float(gen_loss))
    for path, err in jax.tree_util.tree_leaves_with_path(_rel_err(cpu_grads, gen_grads)):
        assert err < tol, f"{jax.tree_util.keystr(path)}: xla_cpu vs generic rel err {err:.2e}"


def test_auto_lowers_the_cpu_kernels_on_cpu_and_generic_ones_elsewhere():
    """The same jitted gradient carries the CPU transposes (optimization_barrier) when lowered for the CPU
    and not when exported for CUDA."""
    x = jnp.ones((4, 8), jnp.bfloat16)
    w = jnp.ones((8, 16), jnp.float32)
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(kernels.linear(x, w, "auto", jnp.bfloat16, jnp.float32)), 1))
    assert "optimization_barrier" in grad.lower(x, w).as_text()
    exported = jax.export.export(grad, platforms=["cuda"])(x, w)
    assert "optimization_barrier" not in exported.mlir_module()
    np.testing.assert_allclose(np.asarray(grad(x, w)), np.full((8, 16), 4.0))
