"""The chunked token log-prob (training/losses.py): equal to the plain log-softmax formula in values and
gradients (hidden states and head, both head layouts, a ragged last chunk, bf16 operands), and its compiled
temporary memory far below the plain formula's at a 151k vocabulary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax.training.losses import token_log_probs


def _plain(hidden, head, targets, head_out_in=False):
    w = head.T if head_out_in else head
    logits = jnp.einsum("...h,hv->...v", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]


def _inputs(dtype, head_out_in, shape=(3, 37), h=32, vocab=300, seed=0):
    rng = np.random.RandomState(seed)
    hidden = jnp.asarray(rng.randn(*shape, h), dtype)
    head = jnp.asarray(rng.randn(*((vocab, h) if head_out_in else (h, vocab))) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.randint(0, vocab, shape), jnp.int32)
    weights = jnp.asarray(rng.rand(*shape), jnp.float32)  # per-token weights: masks, reason weights
    return hidden, head, targets, weights


@pytest.mark.parametrize("head_out_in", [False, True])
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_chunked_log_probs_equal_the_plain_formula(head_out_in, dtype, tol):
    hidden, head, targets, weights = _inputs(dtype, head_out_in)

    def loss(fn):
        return lambda hd, w: jnp.sum(weights * fn(hd, w))

    chunked = lambda hd, w: token_log_probs(hd, w, targets, head_out_in=head_out_in, chunk=16)  # noqa: E731
    plain = lambda hd, w: _plain(hd, w, targets, head_out_in)  # noqa: E731
    np.testing.assert_allclose(np.asarray(chunked(hidden, head)), np.asarray(plain(hidden, head)), rtol=tol, atol=tol)
    got = jax.jit(jax.grad(loss(chunked), argnums=(0, 1)))(hidden, head)
    want = jax.grad(loss(plain), argnums=(0, 1))(hidden, head)
    for ours, theirs in zip(got, want):
        assert ours.dtype == theirs.dtype
        ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
        assert np.linalg.norm(ours - theirs) <= tol * np.linalg.norm(theirs)


def test_chunked_log_probs_memory_at_a_151k_vocab(capsys):
    """XLA's memory analysis of value-and-grad over 2 x 1024 tokens at vocab 151,936: the chunked version's
    temporaries are a fraction of the plain formula's (printed)."""
    h, vocab = 64, 151_936
    hidden = jax.ShapeDtypeStruct((2, 1024, h), jnp.bfloat16)
    head = jax.ShapeDtypeStruct((vocab, h), jnp.float32)
    targets = jax.ShapeDtypeStruct((2, 1024), jnp.int32)

    def temp_bytes(fn):
        grad = jax.jit(jax.value_and_grad(lambda hd, w, t: jnp.sum(fn(hd, w, t)), argnums=(0, 1)))
        return grad.lower(hidden, head, targets).compile().memory_analysis().temp_size_in_bytes

    plain = temp_bytes(lambda hd, w, t: _plain(hd, w, t, head_out_in=True))
    chunked = temp_bytes(lambda hd, w, t: token_log_probs(hd, w, t, head_out_in=True, chunk=256))
    with capsys.disabled():
        print(f"\nvocab 151936, 2 x 1024 tokens: temp {plain / 2**20:,.0f} MiB plain, {chunked / 2**20:,.0f} MiB chunked")
    assert chunked < plain / 3
