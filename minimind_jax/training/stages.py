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
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

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
    losses, mask = token_cross_entropy(out.logits, micro["labels"])
    return jnp.sum(losses), out.aux_loss, {}


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    data_stage: str  # which data pipeline reads its files (pretrain | sft | dpo)
    loss: Callable[..., tuple[jax.Array, jax.Array, dict[str, jax.Array]]]
    normalizer: Callable[[Mapping[str, jax.Array]], jax.Array]
    batch_keys: tuple[str, ...] = ("input_ids", "labels")


STAGES: dict[str, Stage] = {
    "pretrain": Stage("pretrain", "pretrain", lm_loss, count_trained_tokens),
    "sft": Stage("sft", "sft", lm_loss, count_trained_tokens),
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    return STAGES[name]
