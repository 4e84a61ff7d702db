"""The RL objectives of MiniMind-3's ``train_grpo.py`` and ``train_ppo.py`` as pure jax functions.

Shapes: ``B`` rollouts (prompts x generations, grouped consecutively: rollout ``i * G + j`` is generation ``j``
of prompt ``i``), ``R`` completion positions. Per-token log-probs (``logp``, ``old_logp``, ``ref_logp``) are
``(B, R)`` float32 log p(completion token) under the policy being trained, the policy that sampled the rollout
and the frozen reference. Masks are ``(B, R)`` and 1 where a token counts.

GRPO / CISPO (``train_grpo.py``):

* advantage per rollout ``(r - mean_group(r)) / (std_group(r) + 1e-4)`` with the biased std, no clipping and
  no batch renormalisation;
* a completion counts up to and including its first eos (:func:`completion_mask`);
* per-token KL to the reference by the k3 estimator ``exp(ref - logp) - (ref - logp) - 1``;
* ``grpo``: ``-(min(rho A, clip(rho, 1 - eps, 1 + eps) A) - beta KL)``; ``cispo``:
  ``-(stop_gradient(min(rho, eps_high)) A logp - beta KL)``, with ``rho = exp(logp - old_logp)``;
* the loss is the mean over a sequence's counted tokens, then the mean over sequences (:func:`sequence_mean`).

PPO (``train_ppo.py``): the reward sits on the last counted token; GAE over the critic's (masked) values;
advantages whitened over every counted token of the batch; the clipped policy loss plus ``kl_coef`` times the
k3 KL to the reference; the clipped value loss ``0.5 max((v - R)^2, (clip(v, v_old +- c) - R)^2)``; each a
token mean over the batch; ``approx_kl = mean(0.5 (logp - old_logp)^2)`` stops the update passes early.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("grpo", "cispo")


# ------------------------------------------------------------------------------------------------ shared
def completion_mask(completion_ids: jax.Array, pad_mask: jax.Array, eos_id: int) -> jax.Array:
    """1 on the completion tokens up to and including the first eos (all of them when there is none), and
    only where ``pad_mask`` is set. (B, R) float32."""
    pad_mask = pad_mask.astype(bool)
    is_eos = (completion_ids == eos_id) & pad_mask
    last = completion_ids.shape[1] - 1
    eos_idx = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), last)
    positions = jnp.arange(completion_ids.shape[1])[None, :]
    return ((positions <= eos_idx[:, None]) & pad_mask).astype(jnp.float32)


def k3_kl(ref_logp: jax.Array, logp: jax.Array) -> jax.Array:
    """Per-token KL(policy || reference) estimate ``exp(ref - logp) - (ref - logp) - 1`` (>= 0, 0 when equal)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def sequence_mean(per_token: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over each sequence's counted tokens (an empty one counts 0), then over the sequences."""
    return jnp.mean(jnp.sum(per_token * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0))


def token_mean(per_token: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over every counted token of the batch."""
    return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ------------------------------------------------------------------------------------------------ GRPO / CISPO
def group_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """``(r - mean) / (std + 1e-4)`` within each group of ``group_size`` consecutive rollouts (biased std)."""
    grouped = rewards.reshape(-1, group_size)
    mean = jnp.mean(grouped, axis=1, keepdims=True)
    std = jnp.std(grouped, axis=1, keepdims=True)  # ddof=0: torch's unbiased=False
    return ((grouped - mean) / (std + 1e-4)).reshape(-1)


def policy_token_loss(logp, old_logp, ref_logp, advantages, *, loss_type: str = "cispo", beta: float = 0.1,
                      epsilon: float = 0.2, epsilon_high: float = 5.0) -> jax.Array:
    """GRPO's or CISPO's per-token loss (B, R); ``advantages`` is per rollout (B,). ``old_logp=None``: the
    first update on these rollouts, whose sampling policy is the current one (ratio exactly 1)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    old_logp = jax.lax.stop_gradient(logp) if old_logp is None else old_logp
    kl = k3_kl(ref_logp, logp)
    ratio = jnp.exp(logp - old_logp)
    adv = advantages[:, None]
    if loss_type == "cispo":
        weight = jax.lax.stop_gradient(jnp.minimum(ratio, epsilon_high))
        return -(weight * adv * logp - beta * kl)
    clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon)
    return -(jnp.minimum(ratio * adv, clipped * adv) - beta * kl)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, **kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The policy loss (a scalar) and its :func:`grpo_metrics`."""
    old_logp = jax.lax.stop_gradient(logp) if old_logp is None else old_logp
    loss = sequence_mean(policy_token_loss(logp, old_logp, ref_logp, advantages, **kwargs), mask)
    return loss, grpo_metrics(logp, old_logp, ref_logp, mask, kwargs.get("epsilon", 0.2))


def grpo_metrics(logp, old_logp, ref_logp, mask, epsilon: float = 0.2) -> dict[str, jax.Array]:
    """KL to the reference (k3, token mean), the fraction of tokens whose ratio left ``[1 - eps, 1 + eps]``
    and the largest ``|log ratio|``."""
    old_logp = jax.lax.stop_gradient(logp) if old_logp is None else old_logp
    log_ratio = logp - old_logp
    return {"kl": token_mean(k3_kl(ref_logp, logp), mask),
            "clip_fraction": token_mean((jnp.abs(jnp.exp(log_ratio) - 1.0) > epsilon).astype(jnp.float32), mask),
            "max_abs_log_ratio": jnp.max(jnp.abs(log_ratio) * mask)}


# ------------------------------------------------------------------------------------------------ PPO
def response_lengths(completion_ids: jax.Array, pad_mask: jax.Array, eos_id: int) -> jax.Array:
    """Tokens that count per response: through the first eos, else every unpadded one; at least 1. (B,) int32."""
    pad_mask = pad_mask.astype(bool)
    is_eos = (completion_ids == eos_id) & pad_mask
    lengths = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, jnp.sum(pad_mask, axis=1))
    return jnp.maximum(lengths, 1).astype(jnp.int32)


def last_token_rewards(rewards: jax.Array, lengths: jax.Array, pad_mask: jax.Array) -> jax.Array:
    """(B, R) zeros with each response's reward on its last counted token (none for an empty response)."""
    valid = jnp.any(pad_mask.astype(bool), axis=1)
    positions = jnp.arange(pad_mask.shape[1])[None, :]
    at_end = (positions == (lengths - 1)[:, None]) & valid[:, None]
    return jnp.where(at_end, rewards[:, None], 0.0)


def gae(token_rewards: jax.Array, values: jax.Array, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over (B, R) rewards and (masked) values, the value after the last
    position being 0. Returns (advantages, returns = advantages + values)."""
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = token_rewards + gamma * next_values - values

    def back(carry, delta):
        carry = delta + gamma * lam * carry
        return carry, carry

    _, advantages = jax.lax.scan(back, jnp.zeros_like(values[:, 0]), deltas.T, reverse=True)
    advantages = advantages.T
    return advantages, advantages + values


def whiten(advantages: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Zero mean, unit variance over the counted tokens of the batch; 0 elsewhere."""
    mean = token_mean(advantages, mask)
    var = token_mean((advantages - mean) ** 2, mask)
    return (advantages - mean) * jax.lax.rsqrt(var + eps) * mask


def ppo_policy_loss(logp, old_logp, ref_logp, advantages, mask, *, clip: float = 0.2, kl_coef: float = 0.02):
    """PPO's clipped surrogate (token mean) plus ``kl_coef`` times the k3 KL to the reference; and its metrics.
    ``old_logp=None``: the first pass over these rollouts (ratio exactly 1)."""
    old_logp = jax.lax.stop_gradient(logp) if old_logp is None else old_logp
    ratio = jnp.exp(logp - old_logp)
    surrogate = jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip))
    kl_ref = token_mean(k3_kl(ref_logp, logp), mask)
    loss = token_mean(surrogate, mask) + kl_coef * kl_ref
    metrics = {"kl": kl_ref, "approx_kl": approx_kl(logp, old_logp, mask),
               "clip_fraction": token_mean((jnp.abs(ratio - 1.0) > clip).astype(jnp.float32), mask)}
    return loss, metrics


def ppo_value_loss(values, old_values, returns, mask, *, clip: float = 0.2) -> jax.Array:
    """``0.5 max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)``, token mean."""
    clipped = jnp.clip(values, old_values - clip, old_values + clip)
    return 0.5 * token_mean(jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def approx_kl(logp, old_logp, mask) -> jax.Array:
    """``mean(0.5 (logp - old_logp)^2)`` over counted tokens: MiniMind stops the PPO passes when it passes 0.25."""
    return token_mean(0.5 * (logp - old_logp) ** 2, mask)
