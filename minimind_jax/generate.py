"""Generation over the preallocated KV cache: one jitted prefill, then a ``lax.while_loop`` decode.

This module starts with greedy decoding of one prompt (the training run's closing sample); sampling,
batching and streaming build on the same two functions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.config import ModelConfig
from minimind_jax.model.transformer import KVCache, MiniMindLM
from minimind_jax.precision import Policy, get_policy


def _bucket(n: int, minimum: int = 16) -> int:
    """Round up to a power of two so prompts of similar length share one compiled program."""
    return max(minimum, 1 << (int(n) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("config", "policy", "max_len", "max_new_tokens"))
def _greedy(params, prompt, prompt_len, eos_id, *, config: ModelConfig, policy: Policy, max_len: int,
            max_new_tokens: int):
    model = MiniMindLM(config, policy)
    b, p = prompt.shape
    cache = KVCache.init(config, b, max_len, policy.compute_dtype)
    # prefill: the prompt is right-padded to a bucket; only the first prompt_len slots are attended to later
    mask = (jnp.arange(max_len) < prompt_len)[None, :].astype(jnp.int32)
    out = model.apply({"params": params}, prompt, attention_mask=mask, cache=cache)
    first = jnp.argmax(out.logits[0, prompt_len - 1]).astype(jnp.int32)
    cache = out.cache.replace(index=prompt_len.astype(jnp.int32))
    tokens = jnp.zeros((max_new_tokens,), jnp.int32).at[0].set(first)

    def cond(carry):
        i, tokens, cache, done = carry
        return (i < max_new_tokens) & ~done

    def body(carry):
        i, tokens, cache, done = carry
        last = tokens[i - 1]
        kv_mask = (jnp.arange(max_len) < cache.index + 1)[None, :].astype(jnp.int32)
        out = model.apply({"params": params}, last[None, None], attention_mask=kv_mask, cache=cache)
        nxt = jnp.argmax(out.logits[0, -1]).astype(jnp.int32)
        return i + 1, tokens.at[i].set(nxt), out.cache, nxt == eos_id

    n, tokens, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, cache, first == eos_id))
    return tokens, n


def greedy_generate(params, config: ModelConfig, prompt_ids, max_new_tokens: int = 32, *,
                    policy: Policy | str = "fp32", eos_id: int | None = None) -> list[int]:
    """Greedy continuation of one prompt (a list of ids): the new ids, stopping after ``eos_id``."""
    policy = get_policy(policy)
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    p = _bucket(len(prompt_ids))
    max_len = _bucket(p + max_new_tokens)
    prompt = np.zeros((1, p), np.int32)
    prompt[0, : len(prompt_ids)] = prompt_ids
    eos = config.eos_token_id if eos_id is None else eos_id
    tokens, n = _greedy(params, jnp.asarray(prompt), jnp.int32(len(prompt_ids)), jnp.int32(eos), config=config,
                        policy=policy, max_len=max_len, max_new_tokens=int(max_new_tokens))
    return [int(t) for t in np.asarray(tokens)[: int(n)]]
