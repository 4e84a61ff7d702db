"""The losses of the training stages, as functions of model outputs and batches.

A stage loss ``loss(apply, params, frozen, micro_batch, rng)`` returns ``(loss_sum, aux_loss, metrics)``
(see :mod:`minimind_jax.training.stages` for the contract and the stages that use each loss).

Every stage loss runs the model with ``return_hidden=True`` and applies the LM head chunk by chunk over the
tokens (:func:`token_log_probs`, :func:`distill_log_probs`), so the full-vocab float32 logits of all tokens are
never held, neither by the forward pass nor for the backward (each chunk's logits are recomputed there). The
building blocks on full logits (per-token CE, sequence log-probs, DPO rewards, distillation terms) stay as the
plain formulas, float32 throughout, for evaluation and as the references the chunked losses are tested
against (equal within 1e-6 in float32, gradients too).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import functools

import jax
import jax.numpy as jnp
import optax

from minimind_jax import lora
from minimind_jax.data.packing import packed_kwargs
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


def lm_head_of(params) -> tuple[jax.Array, bool]:
    """The LM head of a model's params tree and whether it is stored (vocab, hidden): the model's own
    ``lm_head`` (hidden, vocab) when it has one, else the tied embedding (as ``model.transformer.lm_head``
    decides from the config; the tree says the same, and a loss sees only the tree)."""
    if "lm_head" in params:
        return params["lm_head"], False
    return params["embed_tokens"], True


def next_token_log_probs(hidden: jax.Array, head_params, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(``labels[:, t+1]``) from ``hidden[:, t]`` through the head of ``head_params``, chunked (float32,
    0 where not trained), and the mask; both (b, t-1). ``-token_cross_entropy`` of the model's logits."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    head, out_in = lm_head_of(head_params)
    logp = token_log_probs(hidden[:, :-1], head, jnp.where(mask, targets, 0), head_out_in=out_in)
    return jnp.where(mask, logp, 0.0), mask


def lm_loss(apply, params, frozen, micro, rng):
    """Pretrain and SFT: the summed next-token CE over the trained labels (SFT data labels only the
    assistant's replies, so a user token can never change the loss). A micro-batch of packed rows with
    ``segment_ids`` / ``positions`` runs the model with document-aware attention (:mod:`~minimind_jax.data.packing`):
    each document's loss is then its loss unpacked."""
    return _lm_loss(apply, params, params, micro, rng)


def _lm_loss(apply, params, head_params, micro, rng):
    out = apply(params, micro["input_ids"], rng, return_hidden=True, **packed_kwargs(micro))
    logp, _mask = next_token_log_probs(out.hidden, head_params, micro["labels"])
    return -jnp.sum(logp), out.aux_loss, {}


# ------------------------------------------------------------------------------------------------ reason
def weighted_lm_loss(apply, params, frozen, micro, rng):
    """Reasoning distillation: next-token CE weighted per label position by ``micro["loss_weights"]`` (aligned
    with the labels; the tag tokens carry ``special_token_weight``)."""
    out = apply(params, micro["input_ids"], rng, return_hidden=True)
    logp, mask = next_token_log_probs(out.hidden, params, micro["labels"])
    losses = -logp
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
    return dpo_terms(sequence_log_probs(policy_logits, labels), sequence_log_probs(ref_logits, labels), beta)


def dpo_terms(pi: jax.Array, ref: jax.Array, beta: float) -> dict[str, jax.Array]:
    """:func:`dpo_rewards` from the sequence log-probs (2b,) of the policy and the reference."""
    b = pi.shape[0] // 2
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
    """``ref_apply(ref_params, input_ids, return_hidden=True)`` runs the reference (eval mode, the run's policy)."""

    def dpo_loss(apply, params, frozen, micro, rng):
        ids, labels = dpo_pairs(micro)
        out = apply(params, ids, rng, return_hidden=True)
        pi = jnp.sum(next_token_log_probs(out.hidden, params, labels)[0], axis=-1)
        ref_hidden = ref_apply(frozen, ids, return_hidden=True).hidden
        ref = jax.lax.stop_gradient(jnp.sum(next_token_log_probs(ref_hidden, frozen, labels)[0], axis=-1))
        r = dpo_terms(pi, ref, beta)
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
    """``teacher_apply(teacher_params, input_ids, return_hidden=True)`` runs the teacher (eval mode, its own
    policy)."""

    def distill_loss(apply, params, frozen, micro, rng):
        out = apply(params, micro["input_ids"], rng, return_hidden=True)
        teacher_hidden = jax.lax.stop_gradient(teacher_apply(frozen, micro["input_ids"], return_hidden=True).hidden)
        ce, kl, mask = next_token_distill_terms(out.hidden, params, teacher_hidden, frozen, micro["labels"],
                                                temperature)
        total = alpha * jnp.sum(ce) + (1.0 - alpha) * temperature**2 * jnp.sum(kl)
        n = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
        return total, out.aux_loss, {"ce": jnp.sum(ce) / n, "kl": jnp.sum(kl) / n}

    return distill_loss


def next_token_distill_terms(hidden, head_params, teacher_hidden, teacher_params, labels, temperature: float):
    """:func:`distill_terms` from the student's and the teacher's final hidden states and params, the heads
    applied chunk by chunk (:func:`distill_log_probs`). (b, t-1) each."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    head, out_in = lm_head_of(head_params)
    t_head, t_out_in = lm_head_of(teacher_params)
    logp, kl = distill_log_probs(hidden[:, :-1], head, teacher_hidden[:, :-1], jax.lax.stop_gradient(t_head),
                                 jnp.where(mask, targets, 0), temperature, head_out_in=out_in,
                                 teacher_head_out_in=t_out_in)
    return jnp.where(mask, -logp, 0.0), jnp.where(mask, kl, 0.0), mask


# ------------------------------------------------------------------------------------------------ LoRA
def make_lora_loss(scale: float):
    """The SFT loss of the adapted model: ``params`` are the adapters, ``frozen`` the base params."""

    def lora_loss(apply, params, frozen, micro, rng):  # the head is the base model's (LoRA adapts projections)
        return _lm_loss(lora.adapted(apply, frozen, scale), params, frozen, micro, rng)

    return lora_loss


# ------------------------------------------------------------------------------------------------ chunked
def token_log_probs(hidden: jax.Array, head: jax.Array, targets: jax.Array, *, head_out_in: bool = False,
                    chunk: int | None = None) -> jax.Array:
    """``log softmax(hidden @ head)[target]`` per token (float32, ``targets``' shape) without ever holding
    the full-vocab logits of all tokens: the tokens go through in chunks of ``chunk``, and the backward
    pass recomputes each chunk's logits (a custom VJP) instead of saving them. ``chunk`` None: as many
    tokens as keep one (chunk, vocab) float32 block near 32 MiB (:func:`default_chunk`: 1,024 at vocab 6,400,
    32 at 151,936).

    ``hidden`` (..., h) are the final (normed) hidden states in the compute dtype; ``head`` the LM head,
    (h, vocab), or with ``head_out_in`` (vocab, h) (the tied embedding). The logits are accumulated in
    float32 from ``hidden.dtype`` operands, as the model's head computes them. Extra memory: a few
    (chunk, vocab) float32 blocks, against (tokens, vocab) float32 logits, log-softmax and their gradient
    for the plain formula. XLA's memory analysis of value-and-grad at vocab 151,936, 2 x 1024 tokens, chunk
    256 (``tests/test_losses.py``): 316 MiB of temporaries against 5,936 MiB.

    A plain function for any stage (RL log-probs included): per-token weights / masks multiply its result.
    """
    (logp,) = map_head_chunks(_target_log_prob, hidden, head, (targets.astype(jnp.int32),),
                              head_out_in=head_out_in, chunk=chunk)
    return logp


def distill_log_probs(hidden, head, teacher_hidden, teacher_head, targets, temperature: float, *,
                      head_out_in: bool = False, teacher_head_out_in: bool = False, chunk: int | None = None):
    """Per token, chunked like :func:`token_log_probs`: the student's ``log p(target)`` and
    ``KL(softmax(teacher / T) || softmax(student / T))`` (float32, ``targets``' shape each). Gradients reach the
    student's hidden states and head only; the teacher's logits are recomputed per chunk, never stored."""
    fn = functools.partial(_distill_chunk, temperature=float(temperature), teacher_out_in=teacher_head_out_in)
    return map_head_chunks(fn, hidden, head, (targets.astype(jnp.int32), teacher_hidden), (teacher_head,),
                           head_out_in=head_out_in, chunk=chunk)


def _target_log_prob(logits, targets):
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return (picked - jax.nn.logsumexp(logits, axis=-1),)


def _distill_chunk(logits, targets, teacher_hidden, teacher_head, *, temperature, teacher_out_in):
    teacher = _chunk_logits(teacher_hidden, teacher_head, teacher_out_in)
    t = jax.nn.log_softmax(teacher / temperature, axis=-1)
    s = jax.nn.log_softmax(logits / temperature, axis=-1)
    return _target_log_prob(logits, targets)[0], jnp.sum(jnp.exp(t) * (t - s), axis=-1)


CHUNK_ELEMENTS = 2**23  # one (chunk, vocab) float32 block: 32 MiB


def default_chunk(vocab: int) -> int:
    """The largest power of two of tokens (16 .. 4,096) whose (tokens, vocab) block has <= CHUNK_ELEMENTS."""
    chunk = 16
    while chunk < 4096 and 2 * chunk * vocab <= CHUNK_ELEMENTS:
        chunk *= 2
    return chunk


def map_head_chunks(fn, hidden, head, per_token=(), consts=(), *, head_out_in: bool = False,
                    chunk: int | None = None):
    """``fn(logits, *per_token_chunks, *consts)`` over chunks of ``chunk`` tokens of ``hidden`` (..., h), where
    ``logits`` (c, vocab) float32 = chunk @ head: a tuple of float32 (c,) values per chunk, returned in
    ``hidden.shape[:-1]``. ``per_token`` arrays share ``hidden``'s leading shape; ``consts`` are not
    differentiated. Gradients flow to ``hidden`` and ``head`` through the logits, recomputed chunk by chunk."""
    lead = hidden.shape[:-1]
    n = 1
    for d in lead:
        n *= d
    chunk = chunk or default_chunk(head.shape[0] if head_out_in else head.shape[1])
    size = min(chunk, n)
    pad = (-n) % size

    def split(x):
        x = x.reshape(n, *x.shape[len(lead):])
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(-1, size, *x.shape[1:])

    outs = _chunk_map(fn, head_out_in, split(hidden), head, tuple(split(x) for x in per_token), tuple(consts))
    return tuple(o.reshape(-1)[:n].reshape(lead) for o in outs)


def _chunk_logits(h_chunk, w, out_in: bool):
    spec = "nh,vh->nv" if out_in else "nh,hv->nv"
    return jnp.einsum(spec, h_chunk, w.astype(h_chunk.dtype), preferred_element_type=jnp.float32,
                      precision=_precision(h_chunk.dtype))


def _precision(dtype):
    """float32 operands: float32 dots (``HIGHEST``: on NVIDIA GPUs the default precision of a float32 dot is
    TF32), unless the caller set one with ``jax.default_matmul_precision`` (as the model does for its policy)."""
    if jnp.dtype(dtype) == jnp.float32 and jax.config.jax_default_matmul_precision is None:
        return jax.lax.Precision.HIGHEST
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunk_map(fn, out_in, h_chunks, w, per_token, consts):
    return _chunk_map_fwd(fn, out_in, h_chunks, w, per_token, consts)[0]


def _chunk_map_fwd(fn, out_in, h_chunks, w, per_token, consts):
    def one(args):
        hc, pc = args
        return fn(_chunk_logits(hc, w, out_in), *pc, *consts)

    return jax.lax.map(one, (h_chunks, per_token)), (h_chunks, w, per_token, consts)


def _chunk_map_bwd(fn, out_in, res, g):
    h_chunks, w, per_token, consts = res

    def one(dw, args):
        hc, pc, gc = args
        _, fn_vjp = jax.vjp(lambda z: fn(z, *pc, *consts), _chunk_logits(hc, w, out_in))
        dh, dw_chunk = _head_vjp(hc, w, fn_vjp(gc)[0].astype(hc.dtype), out_in)
        return dw + dw_chunk, dh.astype(hc.dtype)

    dw, dh = jax.lax.scan(one, jnp.zeros(w.shape, jnp.float32), (h_chunks, per_token, g))
    return dh, dw.astype(w.dtype), _no_gradient(per_token), _no_gradient(consts)


def _head_vjp(hc, w, dz, out_in: bool):
    """(d hidden, d head) float32 of one chunk from d logits, ``hc``'s dtype operands."""
    wc = w.astype(hc.dtype)
    dot = functools.partial(jnp.einsum, preferred_element_type=jnp.float32, precision=_precision(hc.dtype))
    if out_in:  # logits = hc @ w.T, w (vocab, h)
        return dot("nv,vh->nh", dz, wc), dot("nv,nh->vh", dz, hc)
    return dot("nv,hv->nh", dz, wc), dot("nh,nv->hv", hc, dz)


def _no_gradient(tree):
    return jax.tree.map(lambda _: None, tree)


_chunk_map.defvjp(_chunk_map_fwd, _chunk_map_bwd)
