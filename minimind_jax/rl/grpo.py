"""GRPO / CISPO: sample ``G`` completions per prompt from the current params, score them, turn the rewards into
group advantages and take one optimiser step on the policy loss (MiniMind-3's one update per rollout batch, so
the old log-probs are the current ones with the gradient stopped and the ratio is exactly 1 in the forward pass).
The reference is a frozen copy of the starting params (MiniMind's SFT reference).

Two ways to run it:

* on the training loop (``--stage grpo``): :class:`RolloutStep` is the stage's ``prepare`` (host side: rollouts
  on ``state.params``, rewards, advantages -> the step's batch) and :func:`make_stage_loss` its loss (inside the
  jitted step: policy and reference log-probs through the one same ``apply``, so before the first update the
  ratio is exactly 1 and the KL to an identical reference exactly 0, under any precision policy);
* self-contained, :func:`iteration` (rollouts + rewards + one update), for experiments and tests.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from minimind_jax.config import ModelConfig
from minimind_jax.data.rl_prompts import RLPromptSource
from minimind_jax.rl import objectives as obj
from minimind_jax.rl import rollout
from minimind_jax.rl.rewards import RewardFn, score, score_components

# the step's batch (leading dims: accumulation, prompts x generations) and what the data pipeline gives
BATCH_KEYS = ("input_ids", "attention_mask", "completion_ids", "completion_pad", "advantages")
PROMPT_KEYS = ("prompt_ids", "prompt_length", "prompt_truncated", "record_index")


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """MiniMind-3's train_grpo.py defaults."""
    num_generations: int = 6
    max_new_tokens: int = 1024
    max_prompt_len: int = 768
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.85
    loss_type: str = "cispo"
    beta: float = 0.1
    epsilon: float = 0.2
    epsilon_high: float = 5.0


def policy_loss(params, ref_logp, batch, advantages, *, config: ModelConfig, policy: str, prompt_len: int,
                eos_id: int, settings: GRPOSettings):
    """The GRPO / CISPO loss of the current params on one rollout batch, and its metrics."""
    logp = rollout.completion_log_probs(params, batch["input_ids"], batch["attention_mask"],
                                        prompt_len=prompt_len, config=config, policy=policy)
    mask = obj.completion_mask(batch["completion_ids"], batch["completion_pad"], eos_id)
    return obj.grpo_loss(logp, None, ref_logp, advantages, mask, loss_type=settings.loss_type,
                         beta=settings.beta, epsilon=settings.epsilon, epsilon_high=settings.epsilon_high)


@functools.partial(jax.jit, static_argnames=("tx", "config", "policy", "prompt_len", "eos_id", "settings"))
def update(params, opt_state, ref_logp, batch, advantages, *, tx: optax.GradientTransformation,
           config: ModelConfig, policy: str, prompt_len: int, eos_id: int, settings: GRPOSettings):
    """One optimiser step on :func:`policy_loss`; returns new params, optimiser state, loss and metrics."""
    (loss, metrics), grads = jax.value_and_grad(policy_loss, has_aux=True)(
        params, ref_logp, batch, advantages, config=config, policy=policy, prompt_len=prompt_len,
        eos_id=eos_id, settings=settings)
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
    return optax.apply_updates(params, updates), opt_state, loss, metrics


def iteration(params, opt_state, ref_params, prompts: Sequence[Sequence[int]], records: Sequence[Mapping], *,
              tx: optax.GradientTransformation, config: ModelConfig, decode: Callable[[list[int]], str],
              reward_fn: RewardFn, eos_id: int, pad_id: int, seed: int, policy: str = "fp32",
              settings: GRPOSettings = GRPOSettings(), where: Sequence[str] | None = None):
    """Rollouts, rewards, advantages and one update; returns (params, opt_state, metrics as floats)."""
    g = settings.num_generations
    t0 = time.perf_counter()
    r = rollout.sample(params, config, prompts, num_generations=g, max_new_tokens=settings.max_new_tokens,
                       pad_id=pad_id, eos_ids=[eos_id], seed=seed, policy=policy,
                       temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                       max_prompt_len=settings.max_prompt_len)
    t_rollout = time.perf_counter() - t0
    texts = [decode([int(t) for t in row[pad].tolist() if t != eos_id]) for row, pad in
             zip(r.completion_ids, r.completion_pad)]
    rows = [rec for rec in records for _ in range(g)]
    row_where = None if where is None else [w for w in where for _ in range(g)]
    rewards = jnp.asarray(score(reward_fn, texts, rows, row_where), jnp.float32)
    adv = obj.group_advantages(rewards, g)
    batch = {k: jnp.asarray(v) for k, v in r.batch.items()}
    ref_logp = rollout.jit_completion_log_probs(ref_params, batch["input_ids"], batch["attention_mask"],
                                                prompt_len=r.prompt_len, config=config, policy=policy)
    t1 = time.perf_counter()
    params, opt_state, loss, m = update(params, opt_state, ref_logp, batch, adv, tx=tx, config=config,
                                        policy=policy, prompt_len=r.prompt_len, eos_id=eos_id, settings=settings)
    loss = float(loss)
    t_train = time.perf_counter() - t1
    new_tokens = int(r.completion_pad.sum())
    lengths = r.completion_pad.sum(1)
    metrics = {"loss": loss, **{k: float(v) for k, v in m.items()},
               "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
               "advantage_std": float(adv.std()), "response_length": float(lengths.mean()),
               "fraction_truncated": float(np.mean([f == "length" for f in r.finish_reasons])),
               "truncated_prompts": r.truncated_prompts, "rollout_tok_s": new_tokens / max(t_rollout, 1e-9),
               "train_tok_s": float(r.attention_mask.sum()) / max(t_train, 1e-9)}
    return params, opt_state, metrics


# ------------------------------------------------------------------------------------------------ on the loop
def make_stage_loss(settings: GRPOSettings, config: ModelConfig, policy, eos_id: int) -> Callable:
    """The training loop's ``loss(apply, params, frozen, micro, rng) -> (sum of per-sequence losses, aux, metrics)``
    on a rollout micro-batch (:data:`BATCH_KEYS`); ``frozen`` is the reference. Divided by the number of
    sequences of the step (``count_sequences``): MiniMind's mean over a sequence's tokens, then over sequences."""

    def loss(apply, params, frozen, micro, rng):
        logp, aux = batch_log_probs(apply, params, micro, rng, config=config, policy=policy)
        ref_logp = jax.lax.stop_gradient(batch_log_probs(apply, frozen, micro, rng, config=config, policy=policy)[0])
        if "loss_mask" in micro:  # multi-turn (agent) rollouts: the generated tokens only, tool turns excluded
            cmask = micro["loss_mask"]
        else:
            cmask = obj.completion_mask(micro["completion_ids"], micro["completion_pad"], eos_id)
        per_token = obj.policy_token_loss(logp, None, ref_logp, micro["advantages"], loss_type=settings.loss_type,
                                          beta=settings.beta, epsilon=settings.epsilon,
                                          epsilon_high=settings.epsilon_high)
        per_sequence = jnp.sum(per_token * cmask, axis=1) / jnp.maximum(jnp.sum(cmask, axis=1), 1.0)
        return jnp.sum(per_sequence), aux, obj.grpo_metrics(logp, None, ref_logp, cmask, settings.epsilon)

    return loss


def batch_log_probs(apply, params, micro, rng, *, config: ModelConfig, policy) -> tuple[jax.Array, jax.Array]:
    """(log p of every completion token (B, R), the MoE aux loss) of ``params`` on a rollout micro-batch, through
    the loop's ``apply``: the policy and the reference both go through this one function."""
    ids, mask = micro["input_ids"], micro["attention_mask"]
    prompt_len = ids.shape[1] - micro["completion_ids"].shape[1]
    out = apply(params, ids, rng, attention_mask=mask, position_ids=rollout.positions(mask), return_hidden=True)
    logp = rollout.log_probs_from_hidden(out.hidden, params, ids, prompt_len=prompt_len, config=config, policy=policy)
    return logp, out.aux_loss


def count_sequences(batch) -> jax.Array:
    return jnp.float32(batch["advantages"].size)


def count_tokens(batch) -> int:
    """The real (prompt + completion) tokens of a rollout batch, for the loop's tokens/s."""
    return int(np.sum(batch["attention_mask"]))


def rollout_seed(seed: int, step: int) -> int:
    """The rollouts' seed at optimizer step ``step``: a function of (seed, step) only, so a resumed run draws
    exactly what the uninterrupted one would."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def unpack_prompts(data_batch, source: RLPromptSource) -> tuple[list[list[int]], list]:
    """The prompts of a batch of :data:`PROMPT_KEYS` arrays (any leading dims), flattened: their token ids
    (left padding removed) and their records read back from ``source``."""
    width = data_batch["prompt_ids"].shape[-1]
    rows = data_batch["prompt_ids"].reshape(-1, width)
    prompts = [row[width - n:].tolist() for row, n in zip(rows, data_batch["prompt_length"].reshape(-1))]
    return prompts, [source[int(i)] for i in data_batch["record_index"].reshape(-1)]


def score_rollouts(r: rollout.Rollouts, records: Sequence, tokenizer, reward_weights: Mapping[str, float],
                   extra: Mapping[str, RewardFn] | None = None) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted reward of each rollout (rows ``i * G + j`` answer ``records[i]``) and each component's values:
    the completion decoded without special tokens, scored against the record's gt / messages / tools."""
    g = len(r.completion_ids) // len(records)
    texts = [tokenizer.decode([int(t) for t in row[pad]], skip_special_tokens=True)
             for row, pad in zip(r.completion_ids, r.completion_pad)]
    rows = [{"gt": p.gt, "messages": p.messages, "tools": p.tools} for p in records for _ in range(g)]
    return score_components(reward_weights, texts, rows, [p.where for p in records for _ in range(g)], extra=extra)


@dataclasses.dataclass
class RolloutStep:
    """The stage's ``prepare(data_batch, state, step) -> (batch, metrics)``: the prompts of ``data_batch``
    (:data:`PROMPT_KEYS`, leading dims (accumulation, prompts)) x ``num_generations`` rollouts on
    ``state.params``, their rewards (``reward_weights`` over :data:`~minimind_jax.rl.rewards.REWARDS`, against the
    record read back from ``prompts``) and group advantages, as arrays (accumulation, prompts x G, ...)."""

    settings: GRPOSettings
    config: ModelConfig
    policy: str
    tokenizer: object
    prompts: RLPromptSource
    reward_weights: Mapping[str, float]
    seed: int
    eos_id: int
    pad_id: int
    extra_rewards: Mapping[str, RewardFn] = dataclasses.field(default_factory=dict)  # e.g. a reward model

    def __call__(self, data_batch, state, step: int):
        accum, b, _ = data_batch["prompt_ids"].shape
        g = self.settings.num_generations
        prompts, records = unpack_prompts(data_batch, self.prompts)
        t0 = time.perf_counter()
        r = self._sample(state.params, prompts, step)
        rollout_s = time.perf_counter() - t0
        total, parts = score_rollouts(r, records, self.tokenizer, self.reward_weights, self.extra_rewards)
        rewards = np.asarray(total, np.float32)
        adv = np.asarray(obj.group_advantages(jnp.asarray(rewards), g))
        batch = {**r.batch, "advantages": adv}
        batch = {k: v.reshape(accum, b * g, *v.shape[1:]) for k, v in batch.items()}
        return batch, self._metrics(r, rewards, parts, adv, data_batch, rollout_s)

    def _sample(self, params, prompts, step: int) -> rollout.Rollouts:
        s = self.settings
        return rollout.sample(params, self.config, prompts, num_generations=s.num_generations,
                              max_new_tokens=s.max_new_tokens, pad_id=self.pad_id, eos_ids=[self.eos_id],
                              seed=rollout_seed(self.seed, step), policy=self.policy, temperature=s.temperature,
                              top_k=s.top_k, top_p=s.top_p, max_prompt_len=s.max_prompt_len, bucket_prompts=True)

    @staticmethod
    def _metrics(r: rollout.Rollouts, rewards, parts, adv, data_batch, rollout_s: float) -> dict[str, float]:
        new_tokens = int(r.completion_pad.sum())
        out = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
               "advantage_std": float(adv.std()), "response_length": float(r.completion_pad.sum(1).mean()),
               "fraction_truncated": float(np.mean([f == "length" for f in r.finish_reasons])),
               "truncated_prompts": float(data_batch["prompt_truncated"].sum()),
               "rollout_s": rollout_s, "rollout_tok_s": new_tokens / max(rollout_s, 1e-9)}
        if len(parts) > 1:
            out.update({f"reward_{name}": float(np.mean(v)) for name, v in parts.items()})
        return out
