"""Building blocks: the policy-aware matmul, Linear, RMSNorm and rotary position embeddings.

Every parameter is created with logical axis names (``nn.with_logical_partitioning``) so that
``minimind_jax.sharding`` can place it on a device mesh from one rules table, without touching this code.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax.config import ModelConfig
from minimind_jax.precision import Policy


# The two projection layouts the model uses: spec -> whether the weight is stored (out, in) (the tied
# embedding used as the LM head) rather than (in, out) (Linear kernels, expert weights).
_PROJECTIONS = {"...i,io->...o": False, "...h,vh->...v": True}


def matmul(x: jax.Array, w: jax.Array, policy: Policy, spec: str = "...i,io->...o",
           out_dtype=None) -> jax.Array:
    """``einsum(spec, x, w)`` with both operands in the compute dtype and float32 accumulation.

    Asking for a float32 result (``preferred_element_type``) keeps bf16/fp16 dots accurate and is also
    the fast path on XLA:CPU (bf16-output dots are slower than fp32 ones there). The result is cast
    back to the compute dtype (as PyTorch autocast returns it) unless ``out_dtype`` asks otherwise
    (the logits stay float32).

    The two projection layouts go through ``projection``, whose backward pass is written out (see
    there), in every compute dtype; other specs keep the plain einsum and its autodiff.
    """
    dt = jnp.dtype(policy.compute_dtype)
    out_dtype = jnp.dtype(out_dtype or dt)
    if spec in _PROJECTIONS:
        return projection(x.astype(dt), w, out_dtype, _PROJECTIONS[spec])
    out = jnp.einsum(spec, x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """A 2-D dot of two half-precision operands accumulated and returned in float32."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               preferred_element_type=jnp.float32)


def _row_major_transpose(a: jax.Array) -> jax.Array:
    # The barrier makes XLA materialise the transpose: handed a transposed operand, XLA:CPU's
    # layout assignment turns the weight-gradient dot into a float32 one (about half the speed).
    return jax.lax.optimization_barrier(a.T)


def projection(x: jax.Array, w: jax.Array, out_dtype, w_out_in: bool) -> jax.Array:
    """``x @ w`` (``w`` (in, out)) or ``x @ w.T`` (``w_out_in``: ``w`` (out, in)) for ``x`` (..., in) in the
    compute dtype; ``w`` in any dtype is cast to ``x.dtype`` once.

    Why a custom VJP: the two backward dots are written out with float32 accumulation, ``dx = g @ w.T``
    and ``dw = x.T @ g``, the latter fed a row-major copy of ``x.T``.

    * bf16/fp16: autodiff of a half -> float32 dot runs most backward dots in float32 or with bf16
      outputs, both slow on XLA:CPU. Here they take half-precision inputs. ``dw`` comes back in ``w``'s
      own dtype straight from the float32 accumulator (float32 params get float32 gradients, never
      rounded through bf16); ``dx`` in ``x``'s dtype. The half-precision weight is saved for the
      backward pass, so each weight is cast once per step, not once per use.
    * float32: the same dots as autodiff's, but XLA:CPU, left to itself, writes the transposed operand
      of each weight-gradient dot from inside the elementwise fusion that produces it (SwiGLU's
      backward, for one), a strided write that cost ~10 % of a minimind3 step; with the explicit
      transpose of the layer input the step is ~15 % faster (``python scripts/bench.py train``).
    """
    return _projection(x, w, jnp.dtype(out_dtype), w_out_in, jnp.dtype(w.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _projection(x, w, out_dtype, w_out_in, w_dtype):
    return _projection_fwd(x, w, out_dtype, w_out_in, w_dtype)[0]


def _projection_fwd(x, w, out_dtype, w_out_in, w_dtype):
    x2 = x.reshape(-1, x.shape[-1])
    wc = w.astype(x.dtype)
    y = _dot(x2, wc, (1, 1) if w_out_in else (1, 0))
    y = y.astype(out_dtype).reshape(*x.shape[:-1], y.shape[-1])
    return y, (x2, wc)


def _projection_bwd(out_dtype, w_out_in, w_dtype, res, g):
    x2, wc = res
    g2 = g.reshape(-1, g.shape[-1]).astype(x2.dtype)
    if w_out_in:  # y = x @ w.T, w (out, in)
        dx = _dot(g2, wc, (1, 0))
        dw = _dot(_row_major_transpose(g2), x2, (1, 0))
    else:  # y = x @ w, w (in, out)
        dx = _dot(g2, wc, (1, 1))
        dw = _dot(_row_major_transpose(x2), g2, (1, 0))
    dx = dx.astype(x2.dtype).reshape(*g.shape[:-1], x2.shape[-1])
    return dx, dw.astype(w_dtype)


_projection.defvjp(_projection_fwd, _projection_bwd)


def swiglu_projection(gate: jax.Array, up: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """``(silu(gate) * up) @ w`` (SwiGLU's down projection, ``w`` (in, out)) with the product recomputed in
    the backward pass instead of saved.

    Why: autodiff keeps the sigmoid, the silu and their product for the backward pass, three (tokens,
    intermediate) tensors a layer (~28 MiB at minimind3's 4 x 256 in float32) on top of ``gate`` and ``up``;
    here only ``gate``, ``up`` and the (cast) weight are saved. The backward dots are ``projection``'s: half
    or float32 inputs, float32 accumulation, ``dw`` in ``w``'s dtype, a row-major copy of the product's
    transpose (whose recomputation XLA fuses into that copy).
    """
    return _swiglu_projection(gate, up, w, jnp.dtype(out_dtype), jnp.dtype(w.dtype))


def silu_product(gate, up):
    """SwiGLU's ``silu(gate) * up``: the input of the down projection."""
    return jax.nn.silu(gate) * up


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _swiglu_projection(gate, up, w, out_dtype, w_dtype):
    return _swiglu_projection_fwd(gate, up, w, out_dtype, w_dtype)[0]


def _swiglu_projection_fwd(gate, up, w, out_dtype, w_dtype):
    wc = w.astype(gate.dtype)
    h = silu_product(gate, up).reshape(-1, gate.shape[-1])
    y = _dot(h, wc, (1, 0)).astype(out_dtype).reshape(*gate.shape[:-1], wc.shape[-1])
    return y, (gate, up, wc)


def _swiglu_projection_bwd(out_dtype, w_dtype, res, g):
    gate, up, wc = res
    dt = gate.dtype
    g2 = g.reshape(-1, g.shape[-1]).astype(dt)
    h2 = silu_product(gate, up).reshape(-1, gate.shape[-1])
    dw = _dot(_row_major_transpose(h2), g2, (1, 0))
    dh = _dot(g2, wc, (1, 1)).reshape(gate.shape)  # float32
    gf, uf = gate.astype(jnp.float32), up.astype(jnp.float32)
    sig = jax.nn.sigmoid(gf)
    d_gate = dh * uf * sig * (1.0 + gf * (1.0 - sig))  # d silu(x) / dx = s (1 + x (1 - s))
    d_up = dh * gf * sig
    return d_gate.astype(dt), d_up.astype(up.dtype), dw.astype(w_dtype)


_swiglu_projection.defvjp(_swiglu_projection_fwd, _swiglu_projection_bwd)


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
    def __call__(self, x: jax.Array, up: jax.Array | None = None) -> jax.Array:
        """``x @ kernel``; with ``up``, SwiGLU's down projection ``(silu(x) * up) @ kernel`` through
        :func:`swiglu_projection` (``x`` is then the gate)."""
        kernel = self.param("kernel", nn.with_logical_partitioning(param_init(self.config), tuple(self.axes)),
                            (x.shape[-1], self.features), self.policy.param_dtype)
        if up is not None:
            dt = jnp.dtype(self.policy.compute_dtype)
            return swiglu_projection(x.astype(dt), up.astype(dt), kernel, dt)
        return matmul(x, kernel, self.policy)


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
