"""The cross-entropy kernel of the stage losses against a float64 numpy transcription: values and gradients for
float32 and bfloat16 logits, masked labels, large logits; and equality with optax's autodiff gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from minimind_jax.data import IGNORE_INDEX
from minimind_jax.training.losses import integer_label_cross_entropy, token_cross_entropy


def _np_ce_and_grad(logits: np.ndarray, targets: np.ndarray, g: np.ndarray):
    """float64: -log softmax(x)[t] per row and d(sum(g * ce))/dx = g * (softmax(x) - one_hot(t))."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    ce = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    onehot = np.eye(x.shape[-1])[targets]
    return ce, g[..., None] * (np.exp(logp) - onehot)


def _case(dtype, scale=3.0, shape=(3, 7, 50)):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=shape) * scale, dtype)
    targets = jnp.asarray(rng.integers(0, shape[-1], size=shape[:-1]))
    g = jnp.asarray(rng.normal(size=shape[:-1]), jnp.float32)
    return logits, targets, g


def _value_and_grad(fn, logits, targets, g):
    return jax.jit(jax.value_and_grad(lambda x: jnp.sum(fn(x, targets) * g)))(logits), fn(logits, targets)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("scale", [3.0, 1e4])  # 1e4: exp overflows without the max shift
def test_cross_entropy_matches_numpy(dtype, tol, scale):
    logits, targets, g = _case(dtype, scale)
    (_, grad), ce = _value_and_grad(integer_label_cross_entropy, logits, targets, g)
    want_ce, want_grad = _np_ce_and_grad(np.asarray(logits.astype(jnp.float32)), np.asarray(targets), np.asarray(g))
    assert ce.dtype == jnp.float32 and grad.dtype == dtype
    np.testing.assert_allclose(np.asarray(ce), want_ce, rtol=1e-5, atol=1e-5 * max(scale, 1.0))
    np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), want_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradient_equals_optax_autodiff(dtype):
    logits, targets, g = _case(dtype)
    ref = lambda x, t: optax.softmax_cross_entropy_with_integer_labels(x.astype(jnp.float32), t)  # noqa: E731
    (v, grad), _ = _value_and_grad(integer_label_cross_entropy, logits, targets, g)
    (v_ref, grad_ref), _ = _value_and_grad(ref, logits, targets, g)
    np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-6)
    # bf16: both round the same float32 gradient; one bf16 ulp at most
    tol = 1e-6 if dtype == jnp.float32 else 8e-3
    np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), np.asarray(grad_ref.astype(jnp.float32)),
                               rtol=tol, atol=tol)


def test_masked_labels_give_no_loss_and_no_gradient():
    logits, _, _ = _case(jnp.float32, shape=(2, 6, 11))
    labels = np.array([[1, 2, IGNORE_INDEX, 4, IGNORE_INDEX, 6], [IGNORE_INDEX] * 3 + [3, 3, 3]])
    (losses, mask) = token_cross_entropy(logits, jnp.asarray(labels))
    np.testing.assert_array_equal(np.asarray(mask), labels[:, 1:] != IGNORE_INDEX)
    want, _ = _np_ce_and_grad(np.asarray(logits[:, :-1]), np.where(labels[:, 1:] < 0, 0, labels[:, 1:]),
                              np.ones((2, 5)))
    np.testing.assert_allclose(np.asarray(losses), np.where(labels[:, 1:] < 0, 0.0, want), rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(token_cross_entropy(x, jnp.asarray(labels))[0]))(logits)
    rows = np.asarray(grad)
    assert np.all(rows[:, -1] == 0)  # the last position predicts nothing
    trained = np.zeros((2, 6), bool)
    trained[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert np.all(rows[~trained] == 0) and np.all(np.abs(rows[trained]).sum(-1) > 0)
