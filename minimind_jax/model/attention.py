"""Grouped-query self-attention with optional q/k RMSNorm and a preallocated KV cache.

Masks: a query at absolute slot ``p`` sees key slots ``<= p`` (causal) whose ``attention_mask`` is 1
(padding) and, given ``segment_ids`` (packed rows, no cache), whose segment id equals its own (document-aware
attention: a token sees only the earlier tokens of its own document). Without a cache the slots are the input
positions; with a cache the new keys are written at ``cache_index .. cache_index + seq`` of a fixed-size
buffer, and ``attention_mask`` covers the whole buffer, so decoding compiles once per (batch, buffer length)
whatever the prompt length.

The softmax(q k^T / sqrt(d) + mask) v itself is :func:`attend`, chosen by ``ModelConfig.kernels`` like the
other kernels (:mod:`minimind_jax.model.kernels`):

* a CUDA GPU (``auto``, bf16 / fp16, head_dim <= 128 and a multiple of 8, more than one query, even lengths
  with a mask): cuDNN flash attention (``jax.nn.dot_product_attention(implementation="cudnn")``), which never
  stores the (batch, heads, q, kv) scores, forward or backward, and skips the masked blocks of a plain causal
  mask;
* the CPU (``auto``, ``xla_cpu``): the two einsums below with float32 accumulation, the scores in float32;
* elsewhere (``generic``, other platforms, float32 on a GPU, decode steps): ``jax.nn.dot_product_attention``'s
  XLA implementation, the same math (float32 scores), which XLA may fuse but which stores the scores.

The cuDNN branch is traced only on a host whose JAX has a CUDA GPU of compute capability >= 8.0: tracing it
asks JAX's CUDA plugin for the cuDNN version, which a CPU-only install lacks, so an export for CUDA made on a
CPU machine carries the XLA attention. Attention dropout (``dropout > 0`` in training) always takes the einsum
path: the fused kernels have no dropout on the probabilities.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from minimind_jax.config import KERNELS, ModelConfig
from minimind_jax.model.layers import Linear, RMSNorm, apply_rope
from minimind_jax.precision import Policy

_MASKED = -1e30  # large but finite: a fully masked row (left padding) gives a uniform softmax, not NaN


def attention_bias(q_len: int, kv_len: int, start: jax.Array | int, attention_mask: jax.Array | None,
                   segment_ids: jax.Array | None = None) -> jax.Array | None:
    """Additive float32 bias of shape (batch or 1, 1, 1, q_len, kv_len): 0 where allowed, -1e30 elsewhere.

    The two singleton axes broadcast over (kv heads, query groups) of the attention scores. None when the
    mask is plain causal over the input positions (no cache: ``start`` 0 and as many keys as queries, no
    ``attention_mask``, no ``segment_ids``): :func:`attend` then applies it as ``is_causal``, without a mask
    tensor. ``segment_ids`` (batch, q_len) int, no cache: a query sees only the keys of its own segment.
    """
    plain = isinstance(start, int) and start == 0 and kv_len == q_len
    if attention_mask is None and segment_ids is None and plain:
        return None
    q_slot = start + jnp.arange(q_len)[:, None]
    allowed = (jnp.arange(kv_len)[None, :] <= q_slot)[None]
    if attention_mask is not None:
        if attention_mask.shape[-1] != kv_len:
            raise ValueError(f"attention_mask has length {attention_mask.shape[-1]} but the keys have "
                             f"{kv_len} slots (with a KV cache the mask covers the whole cache)")
        allowed = allowed & attention_mask.astype(bool)[:, None, :]
    if segment_ids is not None:
        if not plain:
            raise ValueError("segment_ids apply to a forward pass over whole rows, not with a KV cache")
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
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

        if self.train and cfg.dropout > 0:
            dropout = nn.Dropout(cfg.dropout, name="attn_dropout")
            out = einsum_attention(q, k, v, bias, lambda p: dropout(p, deterministic=False))
        else:
            out = attend(q, k, v, bias, cfg.kernels)
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


# ------------------------------------------------------------------------------------------------ attend
def attend(q, k, v, bias, kernels: str = "auto") -> jax.Array:
    """softmax(q k^T / sqrt(d) + mask) v of q (b, t, heads, d) over k, v (b, s, kv_heads, d) (GQA: query head
    ``i`` reads kv head ``i // (heads / kv_heads)``), returned (b, t, heads, d) in ``q``'s dtype.

    ``bias`` is :func:`attention_bias`'s (b or 1, 1, 1, t, s) additive mask, or None for plain causal.
    ``kernels`` picks the implementation (see the module docstring)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "xla_cpu":
        return einsum_attention(q, k, v, bias)
    if kernels == "generic":
        return _xla_attention(q, k, v, bias)
    cuda = _cudnn_attention if _cudnn_applies(q, k, bias) else _xla_attention
    return jax.lax.platform_dependent(q, k, v, bias, cpu=einsum_attention, cuda=cuda, default=_xla_attention)


def einsum_attention(q, k, v, bias, dropout=None) -> jax.Array:
    """Queries grouped as (kv_head, group) so K / V are never repeated; float32 scores and softmax (like
    autocast); ``dropout`` (a function) on the probabilities; accumulated in float32, returned in ``q``'s dtype."""
    b, t, nh, d = q.shape
    nkv = k.shape[2]
    q = q.reshape(b, t, nkv, nh // nkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(d)) + (_causal_bias(t, k.shape[1]) if bias is None else bias)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(b, t, nh, d)


def _causal_bias(q_len: int, kv_len: int) -> jax.Array:
    return attention_bias(q_len, kv_len, jnp.int32(0), None)


def _xla_attention(q, k, v, bias):
    bias = None if bias is None else bias[:, :, 0]  # (b|1, 1, t, s): broadcast over the heads
    return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=bias is None, implementation="xla")


def _cudnn_attention(q, k, v, bias):
    # A boolean mask: cuDNN adds it as a bias in q's dtype, with a large negative that float16 can hold.
    mask = None if bias is None else bias[:, :, 0] > _MASKED / 2
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=bias is None, implementation="cudnn")


def _cudnn_applies(q, k, bias) -> bool:
    """Whether cuDNN flash attention takes these queries: half precision, head_dim <= 128 and a multiple
    of 8, more than one query (a decode step is memory-bound: the XLA kernel reads the cache once), even
    query and key lengths with a mask (cuDNN's backward with a bias needs them), on a host that can trace it."""
    _, t, _, d = q.shape
    half = jnp.dtype(q.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    even = bias is None or (t % 2 == 0 and k.shape[1] % 2 == 0)
    return half and d <= 128 and d % 8 == 0 and t > 1 and even and cudnn_available()


@functools.cache
def cudnn_available() -> bool:
    """This host's default JAX backend is a CUDA GPU of compute capability >= 8.0 (Ampere or newer), where
    cuDNN flash attention runs and can be traced."""
    if jax.default_backend() != "gpu":
        return False
    capability = getattr(jax.devices()[0], "compute_capability", None)
    return capability is not None and tuple(int(x) for x in capability.split(".")[:2]) >= (8, 0)
