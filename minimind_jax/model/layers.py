"""Building blocks: the policy-aware matmul (``x @ w``; its kernels live in :mod:`minimind_jax.model.kernels`), Linear, RMSNorm and rotary position embeddings.

Every parameter is created with logical axis names (``nn.with_logical_partitioning``) so that
``minimind_jax.sharding`` can place it on a device mesh from one rules table, without touching this code.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.config import ModelConfig
from minimind_jax.model import kernels as kernels_lib
from minimind_jax.precision import Policy


_LAYOUTS = {"...i,io->...o": False, "...h,vh->...v": True}  # spec -> w stored (out, in)


def matmul(x: jax.Array, w: jax.Array, policy: Policy, spec: str = "...i,io->...o", out_dtype=None,
           kernels: str = "auto") -> jax.Array:
    """``x @ w`` (``spec`` ``...i,io->...o``) or ``x @ w.T`` (``...h,vh->...v``, the tied LM head) with both
    operands in the policy's compute dtype and float32 accumulation, returned in the compute dtype unless
    ``out_dtype`` asks otherwise (the logits stay float32). ``kernels`` picks the implementation
    (:mod:`minimind_jax.model.kernels`); the value is the same whichever it is."""
    if spec not in _LAYOUTS:
        raise ValueError(f"matmul computes {' or '.join(_LAYOUTS)}, not {spec!r}")
    return kernels_lib.linear(x, w, kernels, policy.compute_dtype, out_dtype, _LAYOUTS[spec])


def param_init(config: ModelConfig) -> nn.initializers.Initializer:
    # MiniMind (PreTrainedModel._init_weights): Linear and Embedding weights ~ N(0, 0.02).
    return nn.initializers.normal(stddev=config.initializer_range)


class Linear(nn.Module):
    """A bias-free projection ``x @ kernel``; ``kernel`` is (in, out), the transpose of torch's weight."""

    features: int
    config: ModelConfig
    policy: Policy
    axes: Sequence[str | None] = ("embed", "mlp")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(param_init(self.config), tuple(self.axes)),
                            (x.shape[-1], self.features), self.policy.param_dtype)
        return matmul(x, kernel, self.policy, kernels=self.config.kernels)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, computed in float32 and cast back to the input dtype.

    Why float32: a bf16 mean of squares loses precision (MiniMind and autocast do the same).
    """

    eps: float
    policy: Policy
    axes: Sequence[str | None] = ("norm",)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, tuple(self.axes)),
                            (x.shape[-1],), self.policy.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (weight.astype(jnp.float32) * y).astype(x.dtype)


# ------------------------------------------------------------------------------------------------ RoPE
def rope_inv_freq(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies (head_dim // 2,) as float32, and the attention factor.

    With ``inference_rope_scaling`` this applies MiniMind's YaRN: ``f'(i) = f(i) * ((1 - g) + g / s)``
    with ``g`` a linear ramp between the dims whose wavelength fits ``beta_fast`` / ``beta_slow`` times
    into the original context (MiniMind applies it when max_position_embeddings exceeds that context).
    """
    dim, base = config.head_dim, config.rope_theta
    inv_freq = (1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    inv_freq = inv_freq.astype(np.float32)
    attn_factor = 1.0
    if config.inference_rope_scaling:
        orig_max = config.rope_scaling_original_max
        factor = config.rope_scaling_factor
        attn_factor = config.rope_scaling_attention_factor
        if config.max_position_embeddings / orig_max > 1.0:
            def inv_dim(b):
                return (dim * math.log(orig_max / (b * 2 * math.pi))) / (2 * math.log(base))

            low = max(math.floor(inv_dim(config.rope_scaling_beta_fast)), 0)
            high = min(math.ceil(inv_dim(config.rope_scaling_beta_slow)), dim // 2 - 1)
            ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / max(high - low, 0.001), 0, 1)
            inv_freq = (inv_freq * (1 - ramp + ramp / factor)).astype(np.float32)
    return inv_freq, attn_factor


def rope_cos_sin(position_ids: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape (batch, seq, head_dim), float32, in the ``rotate_half`` layout (the half-dim
    table repeated over both halves), for integer positions of shape (batch, seq)."""
    inv_freq, attn_factor = rope_inv_freq(config)
    angles = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * attn_factor, jnp.sin(angles) * attn_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` (batch, seq, heads, head_dim) in float32 and cast back (as MiniMind does)."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
