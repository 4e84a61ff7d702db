"""The stage losses' building blocks against references: the chunked token log-prob (training/losses.py)
equal to the plain log-softmax formula in values and gradients (hidden states and head, both head layouts, a
ragged last chunk, bf16 operands), through the model's own head, and its compiled temporary memory far below
the plain formula's at a 151k vocabulary; the next-token cross-entropy and DPO's sequence log-probs against a
float64 numpy transcription (float32 / bfloat16 logits, logits of 1e4, masked labels)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import cached_params, random_ids, tiny

from minimind_jax import MiniMindLM
from minimind_jax.data import IGNORE_INDEX
from minimind_jax.model.transformer import lm_head
from minimind_jax.training.losses import sequence_log_probs, token_cross_entropy, token_log_probs


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


@pytest.mark.parametrize("name", ["tiny3", "tiny2"])  # tied and untied heads
def test_chunked_log_probs_through_the_model_head_equal_its_logits(name):
    config = tiny(name, tie_word_embeddings=name == "tiny3")
    params = cached_params(config)
    ids = random_ids((2, 11))
    model = MiniMindLM(config)

    def plain(p):
        logits = model.apply({"params": p}, ids).logits.astype(jnp.float32)
        return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), ids[..., None], axis=-1)[..., 0]

    def chunked(p):
        hidden = model.apply({"params": p}, ids, return_hidden=True).hidden
        head, out_in = lm_head(p, config)
        return token_log_probs(hidden, head, ids, head_out_in=out_in, chunk=8)

    np.testing.assert_allclose(np.asarray(chunked(params)), np.asarray(plain(params)), rtol=1e-5, atol=1e-5)
    got = jax.grad(lambda p: jnp.sum(chunked(p)))(params)
    want = jax.grad(lambda p: jnp.sum(plain(p)))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


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
