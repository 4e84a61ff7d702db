"""The next-token cross-entropy of the stage losses against a float64 numpy transcription: values and gradients
for float32 and bfloat16 logits (also logits of 1e4, where exp overflows without the max shift), masked labels
and the per-row sequence log-probs of DPO."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax.data import IGNORE_INDEX
from minimind_jax.training.losses import sequence_log_probs, token_cross_entropy


def _np_token_ce(logits: np.ndarray, labels: np.ndarray):
    """float64: (losses, d(sum losses)/d logits) of logits[:, t] predicting labels[:, t+1]; -100 not trained."""
    x = logits.astype(np.float64)[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    x = x - x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    t = np.where(mask, targets, 0)
    losses = np.where(mask, -np.take_along_axis(logp, t[..., None], axis=-1)[..., 0], 0.0)
    grad = np.zeros(logits.shape)
    grad[:, :-1] = mask[..., None] * (np.exp(logp) - np.eye(x.shape[-1])[t])
    return losses, grad


def _case(dtype, scale, b=3, t=9, v=50):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(b, t, v)) * scale, dtype)
    labels = rng.integers(0, v, size=(b, t))
    labels[0, 2:5] = IGNORE_INDEX
    labels[1, :] = IGNORE_INDEX  # a row with nothing trained
    return logits, labels


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("scale", [3.0, 1e4])
def test_token_cross_entropy_matches_numpy(dtype, tol, scale):
    logits, labels = _case(dtype, scale)
    losses, mask = token_cross_entropy(logits, jnp.asarray(labels))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(token_cross_entropy(x, jnp.asarray(labels))[0])))(logits)
    want, want_grad = _np_token_ce(np.asarray(logits.astype(jnp.float32)), labels)
    assert losses.dtype == jnp.float32 and grad.dtype == dtype
    np.testing.assert_array_equal(np.asarray(mask), labels[:, 1:] != IGNORE_INDEX)
    np.testing.assert_allclose(np.asarray(losses), want, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), want_grad, rtol=tol, atol=tol)
    assert np.all(np.asarray(grad)[1] == 0) and np.all(np.asarray(grad)[:, -1] == 0)


def test_sequence_log_probs_sum_the_trained_positions():
    logits, labels = _case(jnp.float32, 3.0)
    want, _ = _np_token_ce(np.asarray(logits), labels)
    np.testing.assert_allclose(np.asarray(sequence_log_probs(logits, jnp.asarray(labels))), -want.sum(axis=1),
                               rtol=1e-5)
    assert float(sequence_log_probs(logits, jnp.asarray(labels))[1]) == 0.0
