"""PPO (MiniMind-3's ``train_ppo.py``) on the training loop: an actor (the policy), a critic (the backbone + a
``Linear(hidden, 1)`` value head, both starting from the same weights as the policy) and a frozen reference.

* :class:`PPORolloutStep` is the stage's ``prepare`` (host side): one rollout per prompt on the current policy
  (grpo's sampling and scoring), then ONE forward pass of the policy, the reference and the critic on the
  rollouts (:func:`rollout_forward`) for the old log-probs, the reference log-probs and the old values; the
  reward sits on the last counted token (through the first eos), GAE (gamma, lambda) over the masked values,
  advantages whitened over the counted tokens of the batch, returns = raw advantages + values
  (:func:`ppo_targets`).
* :func:`make_stage_loss` is the loss inside the jitted step, which runs ``update_passes`` passes over the batch
  (``training/step.py``): the clipped surrogate plus ``kl_coef`` times the k3 KL to the reference, plus
  ``vf_coef`` times the clipped value loss ``0.5 max((v - R)^2, (clip(v, v_old +- c) - R)^2)``, each a mean over
  the counted tokens of the step. On the first pass the old log-probs are the current ones with the gradient
  stopped, so the ratio is exactly 1 by construction (the rollout-time ones serve the later passes).
  :func:`early_stop` stops the passes once ``mean(0.5 log_ratio^2)`` exceeds ``early_stop_kl``.

Params: ``{"policy": <LM params>, "critic": {"model": <LM params>, "head": {"kernel": (hidden,), "bias": ()}}}``.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.config import ModelConfig
from minimind_jax.model.transformer import MiniMindLM
from minimind_jax.precision import get_policy
from minimind_jax.rl import grpo
from minimind_jax.rl import objectives as obj
from minimind_jax.rl import rollout

# the step's batch (leading dims: accumulation, prompts): grpo's rollout arrays, then what the rollout-time
# forward pass and GAE give (all (B, R) float32)
BATCH_KEYS = ("input_ids", "attention_mask", "completion_ids", "completion_pad", "old_log_probs",
              "ref_log_probs", "old_values", "advantages", "returns")


@dataclasses.dataclass(frozen=True)
class PPOSettings:
    """MiniMind-3's train_ppo.py defaults."""
    clip: float = 0.2  # the policy ratio's clip
    value_clip: float = 0.2  # cliprange_value
    vf_coef: float = 0.5
    kl_coef: float = 0.02
    gamma: float = 1.0
    lam: float = 0.95


def init_value_head(hidden_size: int, seed: int) -> dict:
    """torch ``nn.Linear(hidden, 1)``'s init (uniform in +-1/sqrt(hidden) for weight and bias), seeded."""
    bound = 1.0 / np.sqrt(hidden_size)
    rng = np.random.default_rng(seed)
    return {"kernel": rng.uniform(-bound, bound, (hidden_size,)).astype(np.float32),
            "bias": np.asarray(rng.uniform(-bound, bound), np.float32)}


def critic_values(apply, critic, micro, rng) -> jax.Array:
    """The critic's value (B, R) float32 at each completion token's position: the value head on the final normed
    hidden state of the token before it (the state that predicts it), as MiniMind gathers ``logp_pos``."""
    ids, mask = micro["input_ids"], micro["attention_mask"]
    prompt_len = ids.shape[1] - micro["completion_ids"].shape[1]
    out = apply(critic["model"], ids, rng, attention_mask=mask, position_ids=rollout.positions(mask),
                return_hidden=True)
    hidden = out.hidden[:, prompt_len - 1:-1].astype(jnp.float32)
    return hidden @ critic["head"]["kernel"].astype(jnp.float32) + critic["head"]["bias"].astype(jnp.float32)


def token_losses(logp, old_logp, ref_logp, advantages, values, old_values, returns, s: PPOSettings):
    """Per-token (B, R) policy loss (clipped surrogate + kl_coef k3 KL) and value loss (0.5 max of the plain
    and clipped squared errors), before masking."""
    ratio = jnp.exp(logp - old_logp)
    surrogate = jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, 1.0 - s.clip, 1.0 + s.clip))
    clipped = jnp.clip(values, old_values - s.value_clip, old_values + s.value_clip)
    value = 0.5 * jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return surrogate + s.kl_coef * obj.k3_kl(ref_logp, logp), value


def make_stage_loss(settings: PPOSettings, config: ModelConfig, policy, eos_id: int):
    """The loop's ``loss(apply, params, frozen, micro, rng) -> (sum over counted tokens of policy + vf_coef value
    loss, the policy's MoE aux loss, metrics)``; divided by the counted tokens of the step (:func:`make_normalizer`)."""

    def loss(apply, params, frozen, micro, rng):
        logp, aux = grpo.batch_log_probs(apply, params["policy"], micro, rng, config=config, policy=policy)
        values = critic_values(apply, params["critic"], micro, rng)
        first = micro.get("update_pass", 0) == 0
        old_logp = jnp.where(first, jax.lax.stop_gradient(logp), micro["old_log_probs"])
        mask = obj.completion_mask(micro["completion_ids"], micro["completion_pad"], eos_id)
        policy_tok, value_tok = token_losses(logp, old_logp, micro["ref_log_probs"], micro["advantages"], values,
                                             micro["old_values"], micro["returns"], settings)
        total = jnp.sum(policy_tok * mask) + settings.vf_coef * jnp.sum(value_tok * mask)
        ratio = jnp.exp(logp - old_logp)
        metrics = {"policy_loss": obj.token_mean(policy_tok, mask), "value_loss": obj.token_mean(value_tok, mask),
                   "approx_kl": obj.approx_kl(logp, old_logp, mask),
                   "clip_fraction": obj.token_mean((jnp.abs(ratio - 1.0) > settings.clip).astype(jnp.float32), mask),
                   "kl": obj.token_mean(obj.k3_kl(micro["ref_log_probs"], logp), mask),
                   "max_abs_log_ratio": jnp.max(jnp.abs(logp - old_logp) * mask)}
        return total, aux, metrics

    return loss


def make_normalizer(eos_id: int):
    """The counted completion tokens of a step's batch (every micro-batch): MiniMind's token means."""

    def normalizer(batch) -> jax.Array:
        ids, pad = batch["completion_ids"], batch["completion_pad"]
        return jnp.sum(obj.completion_mask(ids.reshape(-1, ids.shape[-1]), pad.reshape(-1, pad.shape[-1]), eos_id))

    return normalizer


def early_stop(threshold: float):
    """``stop_passes``: MiniMind's ``approx_kl > early_stop_kl``."""
    return lambda metrics: metrics["approx_kl"] > threshold


def ppo_targets(rewards, values, completion_ids, completion_pad, eos_id: int, gamma: float, lam: float):
    """(whitened advantages, returns, counted-token mask, raw advantages), each (B, R) float32, from the
    rewards (B,) and the critic's values (B, R) at rollout time."""
    mask = obj.completion_mask(completion_ids, completion_pad, eos_id)
    values = jnp.asarray(values, jnp.float32) * mask
    lengths = obj.response_lengths(completion_ids, completion_pad, eos_id)
    token_rewards = obj.last_token_rewards(jnp.asarray(rewards, jnp.float32), lengths, completion_pad)
    advantages, returns = obj.gae(token_rewards, values, gamma, lam)
    return obj.whiten(advantages, mask), returns, mask, advantages


def make_rollout_forward(config: ModelConfig, policy: str):
    """Jitted ``(params, reference, batch) -> (old log-probs, reference log-probs, old values)`` of a rollout
    batch: the policy and the reference through grpo's ``batch_log_probs``, the critic through
    :func:`critic_values` (evaluation mode: no dropout)."""
    model = MiniMindLM(config, get_policy(policy))

    def apply(params, ids, rng, **kwargs):
        return model.apply({"params": params}, ids, **kwargs)

    @jax.jit
    def forward(params, reference, batch):
        old = grpo.batch_log_probs(apply, params["policy"], batch, None, config=config, policy=policy)[0]
        ref = grpo.batch_log_probs(apply, reference, batch, None, config=config, policy=policy)[0]
        return old, ref, critic_values(apply, params["critic"], batch, None)

    return forward


@dataclasses.dataclass
class PPORolloutStep(grpo.RolloutStep):
    """The ppo stage's ``prepare(data_batch, state, step) -> (batch, metrics)``: grpo's rollouts (``settings`` with
    one generation per prompt) and rewards, then the rollout-time forward pass and :func:`ppo_targets`; arrays
    (accumulation, prompts, ...) of :data:`BATCH_KEYS`."""

    ppo: PPOSettings = PPOSettings()

    def __post_init__(self):
        self._forward = make_rollout_forward(self.config, self.policy)

    def __call__(self, data_batch, state, step: int):
        accum, b, _ = data_batch["prompt_ids"].shape
        prompts, records = grpo.unpack_prompts(data_batch, self.prompts)
        t0 = time.perf_counter()
        r = self._sample(state.params["policy"], prompts, step)
        rollout_s = time.perf_counter() - t0
        total, parts = grpo.score_rollouts(r, records, self.tokenizer, self.reward_weights, self.extra_rewards)
        rewards = np.asarray(total, np.float32)
        arrays = {k: jnp.asarray(v) for k, v in r.batch.items()}
        old_logp, ref_logp, values = self._forward(state.params, state.frozen, arrays)
        adv, returns, mask, raw = ppo_targets(rewards, values, r.completion_ids, r.completion_pad, self.eos_id,
                                              self.ppo.gamma, self.ppo.lam)
        batch = {**r.batch, "old_log_probs": old_logp, "ref_log_probs": ref_logp, "old_values": values * mask,
                 "advantages": adv, "returns": returns}
        batch = {k: np.asarray(v).reshape(accum, b, *np.shape(v)[1:]) for k, v in batch.items()}
        metrics = self._metrics(r, rewards, parts, np.asarray(raw)[np.asarray(mask) > 0], data_batch, rollout_s)
        metrics["value_mean"] = float(obj.token_mean(values, mask))
        return batch, metrics
