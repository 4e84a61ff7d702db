"""The losses of the training stages, as functions of model outputs and batches.

A stage loss ``loss(apply, params, frozen, micro_batch, rng)`` returns ``(loss_sum, aux_loss, metrics)``
(see :mod:`minimind_jax.training.stages` for the contract and the stages that use each loss). The building
blocks (per-token CE, sequence log-probs, DPO rewards, distillation terms) are plain functions of logits and
labels, float32 throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from minimind_jax import lora
from minimind_jax.data.samples import IGNORE_INDEX


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token next-token cross-entropy (float32) and its mask: ``logits[:, t]`` predicts ``labels[:, t+1]``;
    labels equal to -100 are not trained. Returns (losses (b, t-1), mask (b, t-1))."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32),
                                                             jnp.where(mask, targets, 0))
    return jnp.where(mask, losses, 0.0), mask


def count_trained_tokens(batch: Mapping[str, jax.Array]) -> jax.Array:
    """Number of trained (shifted) label positions in a batch of any leading shape."""
    return jnp.sum(batch["labels"][..., 1:] != IGNORE_INDEX).astype(jnp.float32)


def lm_loss(apply, params, frozen, micro, rng):
    """Pretrain and SFT: the summed next-token CE over the trained labels (SFT data labels only the
    assistant's replies, so a user token can never change the loss)."""
    out = apply(params, micro["input_ids"], rng)
    losses, _mask = token_cross_entropy(out.logits, micro["labels"])
    return jnp.sum(losses), out.aux_loss, {}


# ------------------------------------------------------------------------------------------------ reason
def weighted_lm_loss(apply, params, frozen, micro, rng):
    """Reasoning distillation: next-token CE weighted per label position by ``micro["loss_weights"]`` (aligned
    with the labels; the tag tokens carry ``special_token_weight``)."""
    out = apply(params, micro["input_ids"], rng)
    losses, mask = token_cross_entropy(out.logits, micro["labels"])
    weights = micro["loss_weights"][:, 1:].astype(jnp.float32)
    return jnp.sum(losses * weights), out.aux_loss, {"ce": jnp.sum(losses) / jnp.maximum(jnp.sum(mask), 1)}


def sum_of_weights(batch: Mapping[str, jax.Array]) -> jax.Array:
    return jnp.sum(batch["loss_weights"][..., 1:].astype(jnp.float32))


# ------------------------------------------------------------------------------------------------ DPO
def sequence_log_probs(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Sum over the trained label positions of log p(label) (float32), per row: (b,)."""
    losses, _ = token_cross_entropy(logits, labels)
    return -jnp.sum(losses, axis=-1)


def dpo_rewards(policy_logits, ref_logits, labels, beta: float) -> dict[str, jax.Array]:
    """Per-pair DPO quantities for rows ``[chosen..., rejected...]``: the implicit rewards
    ``beta * (log pi - log ref)`` of each side, their margin and the loss ``-log sigmoid(margin)``."""
    pi = sequence_log_probs(policy_logits, labels)
    ref = sequence_log_probs(ref_logits, labels)
    b = labels.shape[0] // 2
    chosen = beta * (pi[:b] - ref[:b])
    rejected = beta * (pi[b:] - ref[b:])
    margin = chosen - rejected
    return {"chosen": chosen, "rejected": rejected, "margin": margin, "loss": -jax.nn.log_sigmoid(margin)}


def dpo_pairs(micro: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """One forward batch ``[chosen; rejected]`` of a DPO micro-batch: (input_ids, labels), each (2b, t)."""
    ids = jnp.concatenate([micro["chosen_input_ids"], micro["rejected_input_ids"]])
    labels = jnp.concatenate([micro["chosen_labels"], micro["rejected_labels"]])
    return ids, labels


def make_dpo_loss(beta: float, ref_apply: Callable):
    """``ref_apply(ref_params, input_ids)`` runs the reference (eval mode, the run's policy)."""

    def dpo_loss(apply, params, frozen, micro, rng):
        ids, labels = dpo_pairs(micro)
        out = apply(params, ids, rng)
        ref_logits = jax.lax.stop_gradient(ref_apply(frozen, ids).logits)
        r = dpo_rewards(out.logits, ref_logits, labels, beta)
        metrics = {"reward_accuracy": jnp.mean((r["chosen"] > r["rejected"]).astype(jnp.float32)),
                   "reward_margin": jnp.mean(r["margin"]), "chosen_reward": jnp.mean(r["chosen"]),
                   "rejected_reward": jnp.mean(r["rejected"])}
        return jnp.sum(r["loss"]), out.aux_loss, metrics

    return dpo_loss


def count_pairs(batch: Mapping[str, jax.Array]) -> jax.Array:
    shape = batch["chosen_input_ids"].shape
    return jnp.asarray(shape[0] * shape[1], jnp.float32)


# ------------------------------------------------------------------------------------------------ distillation
def distill_terms(student_logits, teacher_logits, labels, temperature: float):
    """Per trained position: CE of the student and ``KL(softmax(teacher/T) || softmax(student/T))`` (float32,
    zero where not trained), and the mask. All (b, t-1)."""
    ce, mask = token_cross_entropy(student_logits, labels)
    t = jax.nn.log_softmax(teacher_logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return ce, jnp.where(mask, kl, 0.0), mask


def make_distill_loss(alpha: float, temperature: float, teacher_apply: Callable):
    """``teacher_apply(teacher_params, input_ids)`` runs the teacher (eval mode, its own policy)."""

    def distill_loss(apply, params, frozen, micro, rng):
        out = apply(params, micro["input_ids"], rng)
        teacher_logits = jax.lax.stop_gradient(teacher_apply(frozen, micro["input_ids"]).logits)
        ce, kl, mask = distill_terms(out.logits, teacher_logits, micro["labels"], temperature)
        total = alpha * jnp.sum(ce) + (1.0 - alpha) * temperature**2 * jnp.sum(kl)
        n = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
        return total, out.aux_loss, {"ce": jnp.sum(ce) / n, "kl": jnp.sum(kl) / n}

    return distill_loss


# ------------------------------------------------------------------------------------------------ LoRA
def make_lora_loss(scale: float):
    """The SFT loss of the adapted model: ``params`` are the adapters, ``frozen`` the base params."""

    def lora_loss(apply, params, frozen, micro, rng):
        return lm_loss(lora.adapted(apply, frozen, scale), params, None, micro, rng)

    return lora_loss


# ------------------------------------------------------------------------------------------------ chunked
def token_log_probs(hidden: jax.Array, head: jax.Array, targets: jax.Array, *, head_out_in: bool = False,
                    chunk: int = 1024) -> jax.Array:
    """``log softmax(hidden @ head)[target]`` per token (float32, ``targets``' shape) without ever holding
    the full-vocab logits of all tokens: the tokens go through in chunks of ``chunk``, and the backward
    pass recomputes each chunk's logits (a custom VJP) instead of saving them.

    ``hidden`` (..., h) are the final (normed) hidden states in the compute dtype; ``head`` the LM head,
    (h, vocab), or with ``head_out_in`` (vocab, h) (the tied embedding). The logits are accumulated in
    float32 from ``hidden.dtype`` operands, as the model's head computes them. Extra memory: a few
    (chunk, vocab) float32 blocks, against (tokens, vocab) float32 logits, log-softmax and their gradient
    for the plain formula. XLA's memory analysis of value-and-grad at vocab 151,936, 2 x 1024 tokens, chunk
    256 (``tests/test_losses.py``): 353 MiB of temporaries against 5,936 MiB.

    A plain function for any stage (RL log-probs included): per-token weights / masks multiply its result.
    """
    h = hidden.shape[-1]
    flat_h = hidden.reshape(-1, h)
    flat_t = targets.reshape(-1).astype(jnp.int32)
    n = flat_h.shape[0]
    pad = (-n) % chunk if n > chunk else 0
    size = chunk if n > chunk else n
    flat_h = jnp.pad(flat_h, ((0, pad), (0, 0)))
    flat_t = jnp.pad(flat_t, (0, pad))
    w = head.T if head_out_in else head
    out = _chunked_log_probs(flat_h.reshape(-1, size, h), w, flat_t.reshape(-1, size))
    return out.reshape(-1)[:n].reshape(targets.shape)


def _chunk_logits(h_chunk, w):
    return jnp.einsum("nh,hv->nv", h_chunk, w.astype(h_chunk.dtype), preferred_element_type=jnp.float32)


@jax.custom_vjp
def _chunked_log_probs(h_chunks, w, t_chunks):
    return _chunked_fwd(h_chunks, w, t_chunks)[0]


def _chunked_fwd(h_chunks, w, t_chunks):
    def one(args):
        hc, tc = args
        logits = _chunk_logits(hc, w)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        return picked - lse, lse

    logp, lse = jax.lax.map(one, (h_chunks, t_chunks))
    return logp, (h_chunks, w, t_chunks, lse)


def _chunked_bwd(res, g):
    h_chunks, w, t_chunks, lse = res

    def one(dw, args):
        hc, tc, lc, gc = args
        logits = _chunk_logits(hc, w)
        # d logp / d logits = onehot(target) - softmax
        dlogits = -jnp.exp(logits - lc[:, None]) * gc[:, None]
        dlogits = dlogits.at[jnp.arange(tc.shape[0]), tc].add(gc)
        dh = jnp.einsum("nv,hv->nh", dlogits.astype(hc.dtype), w.astype(hc.dtype), preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum("nh,nv->hv", hc, dlogits.astype(hc.dtype), preferred_element_type=jnp.float32)
        return dw, dh.astype(hc.dtype)

    dw, dh = jax.lax.scan(one, jnp.zeros(w.shape, jnp.float32), (h_chunks, t_chunks, lse, g))
    return dh, dw.astype(w.dtype), None


_chunked_log_probs.defvjp(_chunked_fwd, _chunked_bwd)
