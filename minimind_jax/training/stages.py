"""Training stages: each is a loss, the data it reads and its defaults, plugged into the one train step.

A stage's ``loss(apply, params, frozen, micro_batch, rng)`` returns ``(loss_sum, aux_loss, metrics)``:

* ``loss_sum`` — the float32 sum of the per-token (or per-example) losses of the micro-batch. The train step
  divides it by the stage's ``normalizer(batch)`` taken over the *whole* optimizer step (all micro-batches
  of gradient accumulation, all devices), so that accumulating k micro-batches gives exactly the gradient of
  one k-times larger batch, whatever the number of trained tokens in each micro-batch.
* ``aux_loss`` — added as is (MoE load balancing), averaged over the micro-batches as MiniMind does.
* ``metrics`` — float32 scalars, averaged over the micro-batches.

``apply(params, input_ids, rng)`` runs the model in training mode under the run's precision policy and returns
its ``ModelOutput``; ``frozen`` carries params that are not trained (a DPO reference, a distillation teacher,
a LoRA base model), ``None`` for pretrain and SFT.

The stages (``build_stage(cfg, ...)`` makes one from a ``TrainConfig``):

* ``pretrain``, ``sft``: token-mean next-token CE over the trained labels.
* ``reason``: SFT on ``<think>...</think><answer>...</answer>`` replies; the data carries ``loss_weights``
  (``special_token_weight`` on the trained tag tokens, 1 on the other trained tokens, 0 elsewhere) and the loss
  is ``sum(w * CE) / sum(w)`` over the step.
* ``dpo``: ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` per pair, with masked sequence log-prob
  sums over the assistant tokens; the reference (``frozen``: the initial weights) runs without gradients;
  mean over the pairs of the step; metrics: reward accuracy, margin, chosen / rejected rewards.
* ``distill``: ``alpha * CE + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per trained
  token, token mean (MiniMind's ``batchmean`` over the masked tokens); the teacher (``frozen``) runs in its own
  policy (bf16 by default) without gradients.
* ``lora``: the SFT loss of the adapted model (``params`` = adapters, ``frozen`` = base; see
  :mod:`minimind_jax.lora`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

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
    from minimind_jax import lora

    def lora_loss(apply, params, frozen, micro, rng):
        return lm_loss(lora.adapted(apply, frozen, scale), params, None, micro, rng)

    return lora_loss


# ------------------------------------------------------------------------------------------------ stages
@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    data_stage: str  # which data pipeline reads its files (pretrain | sft | dpo)
    loss: Callable[..., tuple[jax.Array, jax.Array, dict[str, jax.Array]]]
    normalizer: Callable[[Mapping[str, jax.Array]], jax.Array]
    batch_keys: tuple[str, ...] = ("input_ids", "labels")
    sequences_per_example: int = 1  # DPO: a chosen and a rejected sequence (tokens/s counts both)


STAGES: dict[str, Stage] = {
    "pretrain": Stage("pretrain", "pretrain", lm_loss, count_trained_tokens),
    "sft": Stage("sft", "sft", lm_loss, count_trained_tokens),
    "reason": Stage("reason", "sft", weighted_lm_loss, sum_of_weights, ("input_ids", "labels", "loss_weights")),
}
DPO_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def get_stage(name: str) -> Stage:
    """A stage that needs no settings (pretrain, sft, reason); :func:`build_stage` makes any stage."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)} (or use build_stage)")
    return STAGES[name]


def eval_apply(config, policy) -> Callable:
    """``apply(params, input_ids)`` in evaluation mode (no dropout, no aux loss) under ``policy``."""
    from minimind_jax.model.transformer import MiniMindLM

    model = MiniMindLM(config, policy)
    return lambda params, input_ids: model.apply({"params": params}, input_ids)


def build_stage(cfg, model_config=None, policy=None, teacher_config=None) -> Stage:
    """The stage ``cfg.stage`` with ``cfg``'s hyperparameters (DPO beta, distillation alpha / T / teacher model,
    LoRA scale)."""
    name = cfg.stage
    if name in STAGES:
        return STAGES[name]
    if name == "dpo":
        return Stage("dpo", "dpo", make_dpo_loss(cfg.dpo_beta, eval_apply(model_config, policy)), count_pairs,
                     DPO_KEYS, sequences_per_example=2)
    if name == "distill":
        if teacher_config is None:
            raise ValueError("the distill stage needs the teacher's model config")
        loss = make_distill_loss(cfg.distill_alpha, cfg.distill_temperature,
                                 eval_apply(teacher_config, cfg.teacher_policy))
        return Stage("distill", "sft", loss, count_trained_tokens)
    if name == "lora":
        from minimind_jax.lora import LoraConfig

        scale = LoraConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets).scale
        return Stage("lora", "sft", make_lora_loss(scale), count_trained_tokens)
    raise ValueError(f"unknown stage {name!r}")
