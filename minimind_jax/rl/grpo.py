"""One GRPO / CISPO iteration, self-contained (the stage on the training loop wraps these functions): sample
``G`` completions per prompt from the current params, score them, turn the rewards into group advantages and
take one optimiser step on the policy loss (MiniMind-3's one update per rollout batch, so the old log-probs are
the current ones with the gradient stopped and the ratio is exactly 1 in the forward pass).

The reference is a frozen copy of the starting params (MiniMind's SFT reference); its log-probs go through the
same jitted :func:`~minimind_jax.rl.rollout.completion_log_probs` as the policy's.
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
from minimind_jax.rl import objectives as obj
from minimind_jax.rl import rollout
from minimind_jax.rl.rewards import RewardFn, score


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
