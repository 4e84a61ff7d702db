"""The MiniMind causal LM: embedding -> N pre-norm blocks -> RMSNorm -> (tied) head.

Parameter names follow MiniMind's checkpoints (``embed_tokens``, ``layers_{i}/self_attn/q_proj``,
``input_layernorm`` ...). With ``config.scan_layers`` the blocks are one ``nn.scan`` named ``layers``
whose params carry a leading layer axis (logical axis ``layers``); ``config.remat_policy`` wraps each
block in ``nn.remat`` (``full``: save nothing; ``dots``: save matmul outputs without batch dims).
"""

from __future__ import annotations

import zlib
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np

from minimind_jax.config import ModelConfig
from minimind_jax.model.attention import Attention, attention_bias
from minimind_jax.model.layers import RMSNorm, matmul, param_init, rope_cos_sin
from minimind_jax.model.mlp import MLP
from minimind_jax.model.moe import MoE
from minimind_jax.precision import Policy, get_policy


@flax.struct.dataclass
class KVCache:
    """A preallocated cache for all layers: ``k`` and ``v`` are (layers, batch, max_len, kv_heads, head_dim);
    ``index`` (int32 scalar) is the number of slots already written (the next write position)."""

    k: jax.Array
    v: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> "KVCache":
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


@flax.struct.dataclass
class ModelOutput:
    logits: jax.Array | None  # (batch, seq, vocab) in the policy's output dtype (None with return_hidden)
    aux_loss: jax.Array  # float32 scalar: sum over MoE layers (0 for Dense and in evaluation)
    cache: KVCache | None = None
    hidden: jax.Array | None = None  # with return_hidden: the final normed hidden states, before the head


class Block(nn.Module):
    """One pre-norm decoder layer. Signature fits ``nn.scan``: (carry, scanned, *broadcast)."""

    config: ModelConfig
    policy: Policy
    train: bool = False
    layer: int | None = None  # unscanned: the index of this layer in the all-layer KV cache

    @nn.compact
    def __call__(self, carry, layer_cache, cos, sin, bias, cache_index):
        cfg, pol = self.config, self.policy
        h, aux = carry
        attn_out, new_cache = Attention(cfg, pol, self.train, self.layer, name="self_attn")(
            RMSNorm(cfg.rms_norm_eps, pol, name="input_layernorm")(h), cos, sin, bias, layer_cache, cache_index)
        h = h + attn_out
        x = RMSNorm(cfg.rms_norm_eps, pol, name="post_attention_layernorm")(h)
        if cfg.use_moe:
            mlp_out, layer_aux = MoE(cfg, pol, self.train, name="mlp")(x)
            aux = aux + layer_aux
        else:
            mlp_out = MLP(cfg, pol, name="mlp")(x)
            if cfg.generation == "minimind2":  # MiniMind2's FeedForward ends in dropout
                mlp_out = nn.Dropout(cfg.dropout, name="mlp_dropout")(mlp_out, deterministic=not self.train)
        return (h + mlp_out, aux), new_cache


def _remat(block_cls, config: ModelConfig):
    if config.remat_policy == "none":
        return block_cls
    policy = None if config.remat_policy == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    # prevent_cse is only needed outside scan (scan already stops XLA from merging the recomputation).
    return nn.remat(block_cls, policy=policy, prevent_cse=not config.scan_layers)


class MiniMindLM(nn.Module):
    """MiniMind causal LM (both generations, Dense and MoE).

    ``apply({"params": p}, input_ids, attention_mask=None, position_ids=None, cache=None, train=False,
    segment_ids=None)``:

    * ``input_ids`` (batch, seq) int; ``attention_mask`` (batch, kv_len), 1 = attend, where kv_len is
      seq without a cache and ``cache.max_len`` with one; ``position_ids`` (the RoPE positions) default to
      ``cache.index + arange(seq)``.
    * ``segment_ids`` (batch, seq) int, packed rows (no cache): a token attends only to the earlier tokens of
      its own segment (document); pass the positions restarting at 0 per segment as ``position_ids`` and each
      segment's logits equal those of the segment run alone. None: plain causal attention (the compiled graph
      has no mask tensor).
    * ``cache``: a ``KVCache``; the new keys/values are written at ``cache.index`` and the returned
      ``ModelOutput.cache`` has ``index`` advanced by seq.
    * ``train=True`` enables dropout (needs an ``rngs={"dropout": key}``) and the MoE aux loss.
    * ``return_hidden=True`` skips the LM head: ``ModelOutput.hidden`` holds the final normed hidden states
      (compute dtype) and ``logits`` is None, for losses that apply the head chunk by chunk
      (``training.losses.token_log_probs`` with ``lm_head(params, config)``).
    """

    config: ModelConfig
    policy: Policy | str = "fp32"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                 train: bool = False, return_hidden: bool = False, segment_ids=None) -> ModelOutput:
        pol = get_policy(self.policy)
        with jax.default_matmul_precision(pol.matmul_precision):  # None: the backend's default
            return self._forward(pol, input_ids, attention_mask, position_ids, cache, train, return_hidden,
                                 segment_ids)

    def _forward(self, pol, input_ids, attention_mask, position_ids, cache, train, return_hidden,
                 segment_ids) -> ModelOutput:
        cfg = self.config
        b, t = input_ids.shape
        start = cache.index if cache is not None else 0
        if position_ids is None:
            position_ids = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_cos_sin(position_ids, cfg)
        kv_len = cache.max_len if cache is not None else t
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) apply to the forward pass without a KV cache")
        bias = attention_bias(t, kv_len, start, attention_mask, segment_ids)

        embed = self.param("embed_tokens",
                           nn.with_logical_partitioning(param_init(cfg), ("vocab", "embed")),
                           (cfg.vocab_size, cfg.hidden_size), pol.param_dtype)
        h = jnp.take(embed, input_ids, axis=0).astype(pol.compute_dtype)
        h = nn.Dropout(cfg.dropout, name="dropout")(h, deterministic=not train)
        aux = jnp.zeros((), jnp.float32)

        block = _remat(Block, cfg)
        if cfg.scan_layers:
            layer_cache = (cache.k, cache.v) if cache is not None else None
            scanned = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})
            (h, aux), entries = scanned(cfg, pol, train, name="layers")((h, aux), layer_cache, cos, sin, bias, start)
            if cache is not None:  # the new entries of every layer (layers, b, t, kv, d), in one in-place update
                new_kv = tuple(jax.lax.dynamic_update_slice(buf, new, (0, 0, start, 0, 0))
                               for buf, new in zip((cache.k, cache.v), entries))
        else:
            new_kv = (cache.k, cache.v) if cache is not None else None  # updated in place, layer by layer
            for i in range(cfg.num_hidden_layers):
                (h, aux), new_kv = block(cfg, pol, train, layer=i, name=f"layers_{i}")(
                    (h, aux), new_kv, cos, sin, bias, start)

        h = RMSNorm(cfg.rms_norm_eps, pol, name="norm")(h)
        new_cache = KVCache(new_kv[0], new_kv[1], start + t) if cache is not None else None
        if not cfg.tie_word_embeddings:
            head = self.param("lm_head", nn.with_logical_partitioning(param_init(cfg), ("embed", "vocab")),
                              (cfg.hidden_size, cfg.vocab_size), pol.param_dtype)
        if return_hidden:
            return ModelOutput(None, aux, new_cache, hidden=h)
        if cfg.tie_word_embeddings:
            logits = matmul(h, embed, pol, "...h,vh->...v", out_dtype=jnp.float32, kernels=cfg.kernels)
        else:
            logits = matmul(h, head, pol, out_dtype=jnp.float32, kernels=cfg.kernels)
        return ModelOutput(logits.astype(pol.output_dtype), aux, new_cache)


def lm_head(params, config: ModelConfig) -> tuple[jax.Array, bool]:
    """The LM head's weight and whether it is stored (vocab, hidden) (the tied embedding) rather than
    (hidden, vocab): ``logits = hidden @ w`` or ``hidden @ w.T``."""
    if config.tie_word_embeddings:
        return params["embed_tokens"], True
    return params["lm_head"], False


def init_params(config: ModelConfig, rng: jax.Array, policy: Policy | str = "fp32", seq_len: int = 8):
    """Freshly initialised params (jax arrays, in the policy's param dtype): MiniMind's init, RMSNorm
    weights 1 and every other weight ~ N(0, initializer_range).

    The tree comes from ``jax.eval_shape`` of the module's own ``init`` (nothing compiled); the values
    are drawn on the host with numpy, one generator per leaf seeded by (``rng``, the leaf's path), so
    they do not depend on the layout of the rest of the tree. Compiling ``model.init`` instead spends
    5-15 s in XLA generating one threefry kernel per parameter; this takes well under a second.
    """
    pol = get_policy(policy)
    model = MiniMindLM(config, pol)
    dummy = jnp.zeros((1, seq_len), jnp.int32)
    if isinstance(rng, jax.core.Tracer):  # traced (jax.eval_shape, jit): the module's own init traces fine
        return nn.unbox(model.init(rng, dummy)["params"])
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), dummy)["params"])
    key_words = [int(w) for w in np.asarray(jax.random.key_data(rng)).ravel()]

    def draw(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if name.endswith("weight") and "norm" in name:  # RMSNorm scales (input/post/final, q/k norms)
            values = np.ones(leaf.shape, np.float32)
        else:
            gen = np.random.default_rng(key_words + [zlib.crc32(name.encode())])
            values = gen.standard_normal(leaf.shape, dtype=np.float32) * np.float32(config.initializer_range)
        return jnp.asarray(values.astype(leaf.dtype))

    return jax.tree_util.tree_map_with_path(draw, abstract)


def logical_axes(config: ModelConfig, policy: Policy | str = "fp32"):
    """The params pytree with each leaf replaced by its tuple of logical axis names (no compute)."""
    model = MiniMindLM(config, policy)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    return nn.get_partition_spec(abstract)["params"]
