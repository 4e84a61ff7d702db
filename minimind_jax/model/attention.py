"""Grouped-query self-attention with optional q/k RMSNorm and a preallocated KV cache.

Masks: a query at absolute slot ``p`` sees key slots ``<= p`` (causal) whose ``attention_mask`` is 1
(padding). Without a cache the slots are the input positions; with a cache the new keys are written at
``cache_index .. cache_index + seq`` of a fixed-size buffer, and ``attention_mask`` covers the whole
buffer, so decoding compiles once per (batch, buffer length) whatever the prompt length.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from minimind_jax.config import ModelConfig
from minimind_jax.model.layers import Linear, RMSNorm, apply_rope
from minimind_jax.precision import Policy

_MASKED = -1e30  # large but finite: a fully masked row (left padding) gives a uniform softmax, not NaN


def attention_bias(q_len: int, kv_len: int, start: jax.Array | int,
                   attention_mask: jax.Array | None) -> jax.Array:
    """Additive float32 bias of shape (batch or 1, 1, 1, q_len, kv_len): 0 where allowed, -1e30 elsewhere.

    The two singleton axes broadcast over (kv heads, query groups) of the attention scores.
    """
    q_slot = start + jnp.arange(q_len)[:, None]
    allowed = (jnp.arange(kv_len)[None, :] <= q_slot)[None]
    if attention_mask is not None:
        if attention_mask.shape[-1] != kv_len:
            raise ValueError(f"attention_mask has length {attention_mask.shape[-1]} but the keys have "
                             f"{kv_len} slots (with a KV cache the mask covers the whole cache)")
        allowed = allowed & attention_mask.astype(bool)[:, None, :]
    return jnp.where(allowed, 0.0, _MASKED).astype(jnp.float32)[:, None, None]


class Attention(nn.Module):
    config: ModelConfig
    policy: Policy
    train: bool = False
    layer: int | None = None  # the cache holds every layer (unscanned model): this layer's index in it

    @nn.compact
    def __call__(self, x, cos, sin, bias, layer_cache=None, cache_index=None):
        cfg, pol = self.config, self.policy
        b, t, _ = x.shape
        nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = Linear(nh * d, cfg, pol, ("embed", "heads"), name="q_proj")(x).reshape(b, t, nh, d)
        k = Linear(nkv * d, cfg, pol, ("embed", "kv_heads"), name="k_proj")(x).reshape(b, t, nkv, d)
        v = Linear(nkv * d, cfg, pol, ("embed", "kv_heads"), name="v_proj")(x).reshape(b, t, nkv, d)
        if cfg.qk_norm:  # minimind-3 / Qwen3: RMSNorm over head_dim before RoPE
            q = RMSNorm(cfg.rms_norm_eps, pol, ("head_dim",), name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, pol, ("head_dim",), name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        new_cache = None
        if layer_cache is not None:
            k, v, new_cache = _write_and_read(layer_cache, k, v, cache_index, self.layer)
            k, v = k.astype(q.dtype), v.astype(q.dtype)

        # GQA without repeating K/V: queries grouped as (kv_head, group).
        g = nh // nkv
        q = q.reshape(b, t, nkv, g, d)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores * (1.0 / math.sqrt(d)) + bias
        probs = jax.nn.softmax(scores, axis=-1)  # float32, like autocast
        probs = nn.Dropout(cfg.dropout, name="attn_dropout")(probs, deterministic=not self.train)
        out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        out = out.astype(pol.compute_dtype).reshape(b, t, nh * d)
        out = Linear(cfg.hidden_size, cfg, pol, ("heads", "embed"), name="o_proj")(out)
        out = nn.Dropout(cfg.dropout, name="resid_dropout")(out, deterministic=not self.train)
        return out, new_cache



def _write_and_read(layer_cache, k, v, slot, layer: int | None):
    """Write the new keys / values (b, t, kv, d) at ``slot`` of the cache and return (keys, values, new cache).

    ``layer`` None: ``layer_cache`` is this layer's (b, L, kv, d) pair (scanned model: ``nn.scan`` slices it)
    and the "new cache" only the new entries, which the model writes into the all-layer cache in one update
    after the scan (re-stacking whole per-layer caches as the scan's output copied the cache). ``layer`` i: it is the all-layer (layers, b, L, kv, d) pair,
    updated in place at layer i and read back; the new cache is the updated pair. Writing before reading
    lets XLA update the loop-carried buffer in place (re-stacking per-layer caches copied the whole cache
    every decoded token).
    """
    ck, cv = layer_cache
    k, v = k.astype(ck.dtype), v.astype(cv.dtype)
    if layer is None:
        ck = jax.lax.dynamic_update_slice(ck, k, (0, slot, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v, (0, slot, 0, 0))
        return ck, cv, (k, v)
    ck = jax.lax.dynamic_update_slice(ck, k[None], (layer, 0, slot, 0, 0))
    cv = jax.lax.dynamic_update_slice(cv, v[None], (layer, 0, slot, 0, 0))
    return ck[layer], cv[layer], (ck, cv)
