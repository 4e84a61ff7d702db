"""Rollouts for the RL stages: prompts x generations sampled by the project's :class:`Generator` on the current
params, packed into fixed-shape arrays, and the per-token log-probs every RL loss reads.

Layout of a rollout batch (``B`` = prompts x ``G`` generations, generation ``j`` of prompt ``i`` at row
``i * G + j``): ``input_ids`` (B, P + R) holds each prompt left-padded to ``P`` tokens, then its completion
right-padded to ``R`` (the longest completion of the batch, rounded up to a bucket so few shapes compile);
``attention_mask`` is 1 on real tokens; ``completion_ids`` / ``completion_pad`` (B, R) are the completion part.

Log-probs: :func:`completion_log_probs` gives log p(completion token) for every completion position in one
forward pass through the chunked log-prob path (never the full-vocab logits of all tokens); the policy, the old policy and the reference all go through this one function, so that before
the first update the ratio is exactly 1 and the KL to an identical reference exactly 0 (different precision
for old and new log-probs is a classic bug of RL trainers). With one update per rollout batch (MiniMind's
GRPO) the old log-probs are the current ones with the gradient stopped: pass ``old_logp=None`` to the loss.

Prompts longer than ``max_prompt_len`` keep their last ``max_prompt_len`` tokens, as MiniMind's
``prompt_inputs["input_ids"][:, -max_seq_len:]`` does, and are counted.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.config import ModelConfig
from minimind_jax.generate import Generator, SamplingParams, bucket_length
from minimind_jax.model.transformer import MiniMindLM, lm_head
from minimind_jax.precision import Policy, get_policy
from minimind_jax.training.losses import token_log_probs


@dataclasses.dataclass
class Rollouts:
    input_ids: np.ndarray  # (B, P + R) int32
    attention_mask: np.ndarray  # (B, P + R) int32
    prompt_len: int  # P
    completion_ids: np.ndarray  # (B, R) int32
    completion_pad: np.ndarray  # (B, R) bool: a generated token (the stopping eos included)
    finish_reasons: list[str]
    truncated_prompts: int = 0

    @property
    def batch(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "completion_ids": self.completion_ids, "completion_pad": self.completion_pad}


def left_truncate(prompts: Sequence[Sequence[int]], max_len: int) -> tuple[list[list[int]], int]:
    """Each prompt's last ``max_len`` tokens, and how many were cut."""
    cut = sum(len(p) > max_len for p in prompts)
    return [list(p[-max_len:]) for p in prompts], cut


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
         finish_reasons: Sequence[str] | None = None, truncated: int = 0, bucket_prompts: bool = False) -> Rollouts:
    """Prompts (left-padded) and completions (right-padded) into the fixed-shape layout above; with
    ``bucket_prompts`` the prompt part is padded to a bucket too (few shapes for a jitted train step)."""
    b = len(prompts)
    p = max(map(len, prompts))
    p = bucket_length(p) if bucket_prompts else p
    r = bucket_length(max(map(len, completions), default=1))
    ids = np.full((b, p + r), pad_id, np.int32)
    mask = np.zeros((b, p + r), np.int32)
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, p - len(prompt):p] = prompt
        ids[i, p:p + len(completion)] = completion
        mask[i, p - len(prompt):p + len(completion)] = 1
    return Rollouts(ids, mask, p, ids[:, p:].copy(), mask[:, p:].astype(bool),
                    list(finish_reasons or ["stop"] * b), truncated)


def sample(params, config: ModelConfig, prompts: Sequence[Sequence[int]], *, num_generations: int,
           max_new_tokens: int, pad_id: int, eos_ids: Sequence[int], seed: int, policy: Policy | str = "fp32",
           temperature: float = 0.8, top_k: int = 50, top_p: float = 0.85, max_prompt_len: int = 768,
           bucket_prompts: bool = False) -> Rollouts:
    """``num_generations`` completions of every prompt from the current ``params`` (row seeds ``seed + row``)."""
    prompts, cut = left_truncate(prompts, max_prompt_len)
    rows = [p for p in prompts for _ in range(num_generations)]
    settings = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=(seed + i) % 2 ** 32)
                for i in range(len(rows))]
    results = Generator(params, config, policy, eos_ids=eos_ids).generate(rows, max_new_tokens, settings)
    return pack(rows, [r.tokens for r in results], pad_id, [r.finish_reason for r in results], cut,
                bucket_prompts=bucket_prompts)


def positions(attention_mask) -> jax.Array:
    """Position ids counted from each row's first real token (left padding), as the Generator counts them."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def log_probs_from_hidden(hidden, params, input_ids, *, prompt_len: int, config: ModelConfig,
                          policy: Policy | str = "fp32") -> jax.Array:
    """log p(completion token) (B, R) float32 from the model's final hidden states (``return_hidden=True``)."""
    head, out_in = lm_head(params, config)
    return token_log_probs(hidden[:, prompt_len - 1:-1], get_policy(policy).cast_to_compute(head),
                           input_ids[:, prompt_len:], head_out_in=out_in)


def completion_log_probs(params, input_ids, attention_mask, *, prompt_len: int, config: ModelConfig,
                         policy: Policy | str = "fp32") -> jax.Array:
    """log p(token) of every completion position ``prompt_len ..`` (B, R) float32, padding handled by the
    attention mask and positions counted from each row's first real token (as the Generator does)."""
    out = MiniMindLM(config, get_policy(policy)).apply({"params": params}, input_ids, attention_mask=attention_mask,
                                                       position_ids=positions(attention_mask), return_hidden=True)
    return log_probs_from_hidden(out.hidden, params, input_ids, prompt_len=prompt_len, config=config, policy=policy)


@functools.partial(jax.jit, static_argnames=("prompt_len", "config", "policy"))
def jit_completion_log_probs(params, input_ids, attention_mask, *, prompt_len: int, config: ModelConfig,
                             policy: str = "fp32") -> jax.Array:
    return completion_log_probs(params, input_ids, attention_mask, prompt_len=prompt_len, config=config,
                                policy=policy)
