"""The model's compute kernels, per backend: projections, SwiGLU and the expert MLPs.

The model code says what it computes (``linear(x, w)`` is ``x @ w``); this module decides how, from one
switch, ``ModelConfig.kernels``:

* ``generic``: plain ``einsum`` / ``ragged_dot`` and JAX's autodiff. What a GPU (or any accelerator) wants:
  cuBLAS takes transposed operands, XLA fuses the elementwise backward, nothing is forced into HBM.
* ``xla_cpu``: the specialisations measured on XLA:CPU (below).
* ``auto`` (default): ``xla_cpu`` when the function is lowered for the CPU, ``generic`` for any other
  platform, chosen by ``jax.lax.platform_dependent`` at lowering time, not by the host that traces: an
  export for CUDA from a CPU-only machine gets the generic path.

Why the CPU specialisations (2-core XLA:CPU, minimind3 shape, batch 4 x 256, ``python scripts/bench.py
train``; the box is noisy, +-10 %):

* Projections (``_cpu_projection``): a custom VJP writing the two backward dots out, ``dx = g @ w.T`` and
  ``dw = x.T @ g``, with half-precision inputs and float32 accumulation, the latter fed a row-major copy
  of ``x.T`` (transpose + ``optimization_barrier``). Left to autodiff, bf16 backward dots run in float32 or
  with bf16 outputs (~150 GFLOP/s against ~360 for bf16 x bf16 -> f32), and handed a transposed operand,
  XLA:CPU's layout assignment turns the weight-gradient dot into a float32 one; in float32 it writes the
  transposed operand from inside the producing elementwise fusion, a strided write that cost ~10 % of a
  step (the explicit transpose makes the fp32 step ~15 % faster). ``dw`` comes back in the weight's
  dtype straight from the float32 accumulator; the half-precision weight is saved, so each weight is cast
  once per step.
* SwiGLU (``_cpu_silu_product``): a custom VJP saving only ``gate`` and ``up`` (autodiff also keeps the
  sigmoid and the silu, two more (tokens, intermediate) tensors a layer, ~19 MiB at minimind3's 4 x 256
  in float32) and computing the elementwise backward in float32.
* Expert MLPs (``_cpu_all_experts``): one 2-D matmul per expert instead of one batched einsum: XLA:CPU
  rejects some batched bf16 x bf16 -> f32 dots after layout assignment ("Unsupported element type for
  DotThunk"), and plain matmuls are its fastest path anyway.
* MoE dispatch: ``dense`` (every expert on every token, one-hot combine) on CPU, where ``ragged_dot``
  saves no FLOPs (see :mod:`minimind_jax.model.moe`); ``sorted`` (grouped matmul over the active
  experts only) on other platforms.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from minimind_jax.config import KERNELS



def by_platform(kernels: str, cpu: Callable, generic: Callable, *args):
    """``cpu(*args)`` or ``generic(*args)`` as ``kernels`` says (``auto``: by the lowering platform)."""
    if kernels == "xla_cpu":
        return cpu(*args)
    if kernels == "generic":
        return generic(*args)
    if kernels != "auto":
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    return jax.lax.platform_dependent(*args, cpu=cpu, default=generic)


# ------------------------------------------------------------------------------------------------ projections
def linear(x: jax.Array, w: jax.Array, kernels: str, compute_dtype, out_dtype=None,
           w_out_in: bool = False) -> jax.Array:
    """``x @ w`` (``w`` (in, out)) or, with ``w_out_in``, ``x @ w.T`` (``w`` (out, in): the tied embedding as
    the LM head), both operands in ``compute_dtype``, accumulated in float32 and returned in ``out_dtype``
    (default: the compute dtype, as PyTorch autocast returns it)."""
    dt = jnp.dtype(compute_dtype)
    out_dtype = jnp.dtype(out_dtype or dt)
    cpu = functools.partial(_cpu_projection, out_dtype=out_dtype, w_out_in=w_out_in, w_dtype=jnp.dtype(w.dtype))
    generic = functools.partial(_generic_projection, out_dtype=out_dtype, w_out_in=w_out_in)
    return by_platform(kernels, cpu, generic, x.astype(dt), w)


def _generic_projection(x, w, out_dtype, w_out_in):
    spec = "...h,vh->...v" if w_out_in else "...i,io->...o"
    return jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """A 2-D dot accumulated and returned in float32."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               preferred_element_type=jnp.float32)


def _row_major_transpose(a: jax.Array) -> jax.Array:
    # The barrier makes XLA materialise the transpose (see the module docstring).
    return jax.lax.optimization_barrier(a.T)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _cpu_projection_vjp(x, w, out_dtype, w_out_in, w_dtype):
    return _projection_fwd(x, w, out_dtype, w_out_in, w_dtype)[0]


def _cpu_projection(x, w, out_dtype, w_out_in, w_dtype):
    return _cpu_projection_vjp(x, w, out_dtype, w_out_in, w_dtype)


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


_cpu_projection_vjp.defvjp(_projection_fwd, _projection_bwd)


# ------------------------------------------------------------------------------------------------ SwiGLU
def silu_product(gate: jax.Array, up: jax.Array, kernels: str = "generic") -> jax.Array:
    """SwiGLU's ``silu(gate) * up`` (the input of the down projection), in ``gate``'s dtype."""
    return by_platform(kernels, _cpu_silu_product, _generic_silu_product, gate, up)


def _generic_silu_product(gate, up):
    return jax.nn.silu(gate) * up


@jax.custom_vjp
def _cpu_silu_product(gate, up):
    return _generic_silu_product(gate, up)


def _silu_product_fwd(gate, up):
    return _generic_silu_product(gate, up), (gate, up)


def _silu_product_bwd(res, g):
    gate, up = res
    gf, uf, gg = gate.astype(jnp.float32), up.astype(jnp.float32), g.astype(jnp.float32)
    sig = jax.nn.sigmoid(gf)
    d_gate = gg * uf * sig * (1.0 + gf * (1.0 - sig))  # d silu(x) / dx = s (1 + x (1 - s))
    d_up = gg * gf * sig
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


_cpu_silu_product.defvjp(_silu_product_fwd, _silu_product_bwd)


# ------------------------------------------------------------------------------------------------ experts
def all_experts(x: jax.Array, gate_w: jax.Array, up_w: jax.Array, down_w: jax.Array, kernels: str,
                compute_dtype) -> jax.Array:
    """Every SwiGLU expert on every token: x (n, h), stacked weights (E, h, i) / (E, i, h) -> (E, n, h)."""
    dt = jnp.dtype(compute_dtype)

    def cpu(x, gate_w, up_w, down_w):  # one 2-D matmul per expert (see the module docstring)
        outs = []
        for e in range(gate_w.shape[0]):
            gate = linear(x, gate_w[e], "xla_cpu", dt)
            up = linear(x, up_w[e], "xla_cpu", dt)
            outs.append(linear(_cpu_silu_product(gate, up), down_w[e], "xla_cpu", dt))
        return jnp.stack(outs)

    def generic(x, gate_w, up_w, down_w):
        def dot(spec, a, w):
            return jnp.einsum(spec, a, w.astype(dt), preferred_element_type=jnp.float32).astype(dt)

        hidden = _generic_silu_product(dot("nh,ehi->eni", x, gate_w), dot("nh,ehi->eni", x, up_w))
        return dot("eni,eih->enh", hidden, down_w)

    return by_platform(kernels, cpu, generic, x.astype(dt), gate_w, up_w, down_w)


def grouped_experts(x_sorted: jax.Array, group_sizes: jax.Array, gate_w: jax.Array, up_w: jax.Array,
                    down_w: jax.Array, compute_dtype) -> jax.Array:
    """Rows sorted by expert, ``group_sizes[e]`` rows for expert e, through their expert's SwiGLU MLP with
    ``jax.lax.ragged_dot`` (a grouped matmul: only the active experts' FLOPs on a GPU): (m, h) -> (m, h)."""
    dt = jnp.dtype(compute_dtype)

    def gdot(a, w):
        return jax.lax.ragged_dot(a.astype(dt), w.astype(dt), group_sizes,
                                  preferred_element_type=jnp.float32).astype(dt)

    hidden = _generic_silu_product(gdot(x_sorted, gate_w), gdot(x_sorted, up_w))
    return gdot(hidden, down_w)
