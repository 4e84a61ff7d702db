"""The stage losses' building blocks against references: the chunked token log-prob (training/losses.py)
equal to the plain log-softmax formula in values and gradients (hidden states and head, both head layouts, a
ragged last chunk, bf16 operands), through the model's own head, and its compiled temporary memory far below
the plain formula's at a 151k vocabulary; the chunked distillation terms likewise; every stage loss (which
runs the model with ``return_hidden``) equal to the same loss written on the model's full logits, values,
metrics and gradients; the temporary memory of one SFT train step both ways (printed); the next-token
cross-entropy and DPO's sequence log-probs against a float64 numpy transcription (float32 / bfloat16 logits,
logits of 1e4, masked labels)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import cached_params, random_ids, tiny

from minimind_jax import MiniMindLM, init_params, lora
from minimind_jax.data import IGNORE_INDEX
from minimind_jax.model.transformer import lm_head
from minimind_jax.training import losses
from minimind_jax.training.losses import sequence_log_probs, token_cross_entropy, token_log_probs
from minimind_jax.training.stages import Stage, count_trained_tokens, eval_apply
from minimind_jax.training.step import init_train_state, make_apply, make_optimizer, make_train_step


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


# ------------------------------------------------------------------------------------------------ distillation
@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_chunked_distill_terms_equal_the_plain_formula(dtype, tol):
    """log p(target) and KL(teacher / T || student / T) per token, student head (h, vocab), teacher tied
    (vocab, h) with another hidden size; gradients reach the student's hidden states and head."""
    hidden, head, targets, weights = _inputs(dtype, False)
    t_hidden, t_head, _, _ = _inputs(dtype, True, h=24, seed=1)

    def plain(hd, w):
        s = jnp.einsum("...h,hv->...v", hd, w.astype(hd.dtype), preferred_element_type=jnp.float32)
        t = jnp.einsum("...h,vh->...v", t_hidden, t_head.astype(dtype), preferred_element_type=jnp.float32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(s, -1), targets[..., None], -1)[..., 0]
        lt, ls = jax.nn.log_softmax(t / 1.5, -1), jax.nn.log_softmax(s / 1.5, -1)
        return logp, jnp.sum(jnp.exp(lt) * (lt - ls), -1)

    def chunked(hd, w):
        return losses.distill_log_probs(hd, w, t_hidden, t_head, targets, 1.5, teacher_head_out_in=True, chunk=16)

    for ours, theirs in zip(chunked(hidden, head), plain(hidden, head)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=tol, atol=tol)
    total = lambda fn: lambda hd, w: jnp.sum(weights * (fn(hd, w)[0] + 0.7 * fn(hd, w)[1]))  # noqa: E731
    got = jax.jit(jax.grad(total(chunked), argnums=(0, 1)))(hidden, head)
    want = jax.grad(total(plain), argnums=(0, 1))(hidden, head)
    for ours, theirs in zip(got, want):
        ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
        assert np.linalg.norm(ours - theirs) <= tol * np.linalg.norm(theirs)


# ------------------------------------------------------------------------------------------------ stage losses
def _on_logits(kind, beta=0.2, alpha=0.4, temperature=1.5):
    """The stage loss ``kind`` written on the model's full logits: the formulas the chunked losses replace."""
    ce = token_cross_entropy

    def lm(apply, params, frozen, micro, rng):
        out = apply(params, micro["input_ids"], rng)
        return jnp.sum(ce(out.logits, micro["labels"])[0]), out.aux_loss, {}

    def reason(apply, params, frozen, micro, rng):
        out = apply(params, micro["input_ids"], rng)
        l, mask = ce(out.logits, micro["labels"])
        return jnp.sum(l * micro["loss_weights"][:, 1:]), out.aux_loss, {"ce": jnp.sum(l) / jnp.maximum(mask.sum(), 1)}

    def dpo(apply, params, frozen, micro, rng, ref_apply=None):
        ids, labels = losses.dpo_pairs(micro)
        out = apply(params, ids, rng)
        r = losses.dpo_rewards(out.logits, ref_apply(frozen, ids).logits, labels, beta)
        return jnp.sum(r["loss"]), out.aux_loss, {"reward_margin": jnp.mean(r["margin"])}

    def distill(apply, params, frozen, micro, rng, teacher_apply=None):
        out = apply(params, micro["input_ids"], rng)
        c, kl, mask = losses.distill_terms(out.logits, teacher_apply(frozen, micro["input_ids"]).logits,
                                           micro["labels"], temperature)
        n = jnp.maximum(mask.sum(), 1)
        return alpha * c.sum() + (1 - alpha) * temperature**2 * kl.sum(), out.aux_loss, {"ce": c.sum() / n,
                                                                                          "kl": kl.sum() / n}

    return {"lm": lm, "reason": reason, "dpo": dpo, "distill": distill}[kind]


def _micro(kind, seed=0, b=2, t=13):
    rng = np.random.default_rng(seed)
    ids = lambda: jnp.asarray(rng.integers(0, 128, (b, t)), jnp.int32)  # noqa: E731
    labels = lambda x: x.at[:, :4].set(IGNORE_INDEX).at[1, 9:].set(IGNORE_INDEX)  # noqa: E731
    if kind == "dpo":
        c, r = ids(), ids()
        return {"chosen_input_ids": c, "chosen_labels": labels(c), "rejected_input_ids": r, "rejected_labels": labels(r)}
    x = ids()
    return {"input_ids": x, "labels": labels(x), "loss_weights": jnp.asarray(rng.uniform(0, 3, (b, t)), jnp.float32)}


@pytest.mark.parametrize("kind, name", [("lm", "tiny3"), ("lm", "tiny2"), ("reason", "tiny3"), ("dpo", "tiny2"),
                                        ("distill", "tiny3"), ("lora", "tiny3")])
def test_stage_losses_equal_the_loss_on_full_logits(kind, name):
    """Each stage loss against the same loss computed from the model's full float32 logits (the plain
    formulas): loss sum, metrics and gradients within 1e-6 (relative, fp32); tied (tiny3) and untied (tiny2)
    heads, a DPO reference and a distillation teacher with their own heads (the teacher untied, another size)."""
    config = tiny(name, tie_word_embeddings=name == "tiny3")
    params = cached_params(config)
    apply = make_apply(config, "fp32")
    micro, rng = _micro(kind), jax.random.key(0)
    frozen, ours, ref = None, None, None
    if kind in ("lm", "reason"):
        ours = {"lm": losses.lm_loss, "reason": losses.weighted_lm_loss}[kind]
        ref = _on_logits(kind)
    elif kind == "dpo":
        frozen = cached_params(config, 1)
        ours = losses.make_dpo_loss(0.2, eval_apply(config, "fp32"))
        ref = lambda *a: _on_logits("dpo")(*a, ref_apply=eval_apply(config, "fp32"))  # noqa: E731
    elif kind == "distill":
        teacher = tiny("tiny2", tie_word_embeddings=False, hidden_size=48)
        frozen = cached_params(teacher, 2)
        ours = losses.make_distill_loss(0.4, 1.5, eval_apply(teacher, "fp32"))
        ref = lambda *a: _on_logits("distill")(*a, teacher_apply=eval_apply(teacher, "fp32"))  # noqa: E731
    else:  # LoRA: params are the adapters (B random so every adapter has a gradient), frozen the base model
        frozen = params
        adapters = lora.init_adapters(config, lora.LoraConfig(4, 8, "attention"))
        params = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(3).normal(0, 0.02, x.shape), x.dtype),
                              adapters)
        ours = losses.make_lora_loss(2.0)
        ref = lambda a, p, f, m, r: _on_logits("lm")(lora.adapted(a, f, 2.0), p, None, m, r)  # noqa: E731

    def value_and_grad(loss):
        fn = lambda p: (lambda out: (out[0], out[2]))(loss(apply, p, frozen, micro, rng))  # noqa: E731
        return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

    (got, got_metrics), got_grads = value_and_grad(ours)
    (want, want_metrics), want_grads = value_and_grad(ref)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for key, value in want_metrics.items():
        np.testing.assert_allclose(float(got_metrics[key]), float(value), rtol=1e-6, atol=1e-7)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(b) + 1e-9, jax.tree_util.keystr(path)


def test_sft_step_memory_chunked_against_full_logits(capsys):
    """XLA's temporary bytes of one compiled SFT train step (value-and-grad and AdamW), the loss on the chunked
    head against the same loss on full logits: at vocab 6,400 and 151,936 (a tiny model, 4 x 512 tokens)
    both are printed; at 151k the chunked step needs under a quarter (measured: 268 against 3,736 MiB)."""
    results = {}
    for vocab in (6400, 151_936):
        config = tiny("tiny3", vocab_size=vocab)
        tx, schedule = make_optimizer(1e-4, 10)
        params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
        state = jax.eval_shape(lambda p: init_train_state(config, tx, seed=0, policy="fp32", params=p)[0], params)
        batch = {k: jax.ShapeDtypeStruct((1, 4, 512), jnp.int32) for k in ("input_ids", "labels")}
        for how, loss in (("full logits", _on_logits("lm")), ("chunked", losses.lm_loss)):
            step = make_train_step(Stage("sft", "sft", loss, count_trained_tokens), config, "fp32", tx, schedule)
            compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
            results[vocab, how] = compiled.memory_analysis().temp_size_in_bytes
    with capsys.disabled():
        for vocab in (6400, 151_936):
            print(f"\nSFT step, tiny3 at vocab {vocab:,}, 4 x 512 tokens: temp {results[vocab, 'full logits'] / 2**20:,.0f}"
                  f" MiB on full logits, {results[vocab, 'chunked'] / 2**20:,.0f} MiB chunked")
    assert results[151_936, "chunked"] < results[151_936, "full logits"] / 4


def test_chunked_head_is_float32_on_a_gpu_unless_told_otherwise():
    """Lowered for CUDA (where a float32 dot defaults to TF32), the chunked head's float32 dots, forward and
    backward, ask for HIGHEST precision; under ``jax.default_matmul_precision("tensorfloat32")`` (a policy
    that opts into TF32) they leave the choice to it; bf16 operands take no precision."""
    def dots(dtype, context=None):
        hidden, head, targets, _ = _inputs(dtype, True)
        fn = jax.jit(jax.grad(lambda hd, w: jnp.sum(token_log_probs(hd, w, targets, head_out_in=True, chunk=16)),
                              argnums=(0, 1)))
        with jax.default_matmul_precision(context):
            text = fn.trace(hidden, head).lower(lowering_platforms=("cuda",)).as_text()
        return [line for line in text.splitlines() if "dot_general" in line]

    assert len(dots(jnp.float32)) == 3 and all("HIGHEST" in d for d in dots(jnp.float32))
    assert not any("HIGHEST" in d for d in dots(jnp.float32, "tensorfloat32"))
    assert not any("HIGHEST" in d for d in dots(jnp.bfloat16))
