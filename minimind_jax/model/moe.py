"""Mixture of experts: a float32 softmax router, top-k routed SwiGLU experts, optional shared experts, and
MiniMind's load-balancing aux losses.

Dispatch (``config.moe_impl``: ``auto`` (default) is ``dense`` on CPU and ``sorted`` on other platforms,
resolved with the kernels, see :mod:`minimind_jax.model.kernels`); both are exact (no token is ever dropped, unlike capacity-based
dispatch, which would change MiniMind's outputs whenever an expert overflows):

* ``dense``: every expert runs on every token and a (tokens, experts) combine matrix that is zero
  outside each token's top-k mixes the results. It costs ``E / k`` times the useful FLOPs, but is
  one batched einsum per projection, shards trivially (experts on a mesh axis) and has no gather/scatter.
  With MiniMind's 4 experts this is the default.
* ``sorted``: the (token, choice) pairs are sorted by expert and each expert multiplies only its
  contiguous block (``jax.lax.ragged_dot``, a grouped matmul), then the rows are weighted and added back
  with a segment sum. Only the useful FLOPs on backends with a real grouped GEMM (GPU), plus a gather and
  a scatter; worth it when E/k is large.

Measured with ``python scripts/bench.py moe`` (2-core CPU, fp32, 1024 tokens, forward / forward+backward):
minimind3-moe layer (4 experts, top-1) dense 446 / 1037 ms, sorted 423 / 1045 ms; minimind2-moe layer
(top-2 + 1 shared) dense 296 / 902 ms, sorted 587 / 1225 ms. XLA:CPU's ragged_dot saves no FLOPs, so
dense stays the CPU choice; on a GPU ``sorted`` computes the active experts only (minimind3-moe: a
quarter of dense's expert FLOPs).

Expert weights are stacked: ``experts/gate_proj`` is (E, hidden, inter), ``experts/down_proj`` is
(E, inter, hidden); the converter maps them to MiniMind's ``experts.{e}.gate_proj.weight``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from minimind_jax.config import ModelConfig
from minimind_jax.model import kernels as kernels_lib
from minimind_jax.model.layers import param_init
from minimind_jax.precision import Policy


class ExpertBank(nn.Module):
    """``num`` SwiGLU experts with stacked weights."""

    num: int
    config: ModelConfig
    policy: Policy
    axis_name: str = "expert"

    def setup(self):
        cfg, pol = self.config, self.policy
        h, inter = cfg.hidden_size, cfg.moe_intermediate_size
        init = param_init(cfg)
        up_axes = (self.axis_name, "embed", "mlp")
        down_axes = (self.axis_name, "mlp", "embed")
        self.gate_proj = self.param("gate_proj", nn.with_logical_partitioning(init, up_axes),
                                    (self.num, h, inter), pol.param_dtype)
        self.up_proj = self.param("up_proj", nn.with_logical_partitioning(init, up_axes),
                                  (self.num, h, inter), pol.param_dtype)
        self.down_proj = self.param("down_proj", nn.with_logical_partitioning(init, down_axes),
                                    (self.num, inter, h), pol.param_dtype)

    def weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(gate_proj, up_proj, down_proj), stacked over the experts."""
        return self.gate_proj, self.up_proj, self.down_proj

    def all_experts(self, x: jax.Array) -> jax.Array:
        """Every expert on every token: x (n, h) -> (E, n, h)."""
        return kernels_lib.all_experts(x, *self.weights(), self.config.kernels, self.policy.compute_dtype)


def route(logits: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router probabilities (n, E), top-k weights (n, k) and indices (n, k), all from float32 logits."""
    scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, idx = jax.lax.top_k(scores, config.num_experts_per_tok)
    # minimind-3 / Qwen3-MoE renormalise whenever norm_topk_prob; minimind2 only when top_k > 1.
    renorm = config.norm_topk_prob and (config.generation == "minimind3" or config.num_experts_per_tok > 1)
    if renorm:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return scores, weights, idx


def aux_loss(scores: jax.Array, idx: jax.Array, config: ModelConfig, batch: int) -> jax.Array:
    """MiniMind's load-balancing loss for one layer (float32 scalar).

    * batch level (minimind-3): ``coef * E * sum_i load_i * mean_prob_i`` over all n tokens, with
      ``load_i`` = (top-k picks of expert i) / n. MiniMind2's batch-level branch (``seq_aux=False``,
      not its default) divides the picks by the n * k choices instead; a minimind2 config follows that.
    * sequence level (minimind2, ``seq_aux``): ``coef * mean_b sum_i ce_bi * mean_t p_bti`` with
      ``ce_bi`` = (picks of expert i in sequence b) / (seq_len * k / E).
    """
    e, k = config.num_experts, config.num_experts_per_tok
    picks = jax.nn.one_hot(idx, e, dtype=jnp.float32).sum(axis=1)  # (n, E): picks per token
    if config.seq_aux:
        seq = scores.shape[0] // batch
        ce = picks.reshape(batch, seq, e).sum(axis=1) / (seq * k / e)
        mean_p = scores.reshape(batch, seq, e).mean(axis=1)
        return config.router_aux_loss_coef * jnp.mean(jnp.sum(ce * mean_p, axis=-1))
    load = picks.mean(axis=0)
    if config.generation == "minimind2":
        load = load / k
    return config.router_aux_loss_coef * e * jnp.sum(load * scores.mean(axis=0))


class MoE(nn.Module):
    config: ModelConfig
    policy: Policy
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg, pol = self.config, self.policy
        b, t, h = x.shape
        xf = x.reshape(b * t, h)
        router = self.param("gate", nn.with_logical_partitioning(param_init(cfg), ("embed", "router")),
                            (h, cfg.num_experts), pol.param_dtype)
        # Router in float32 (autocast's deny list keeps softmax there; routing decisions must not flip), and
        # at full float32 precision on GPUs too (not TF32, whose ~1e-3 rounding flips near-tied top-k).
        logits = jnp.dot(xf.astype(jnp.float32), router.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        scores, weights, idx = route(logits, cfg)
        experts = ExpertBank(cfg.num_experts, cfg, pol, "expert", name="experts")
        y = dispatch(xf, weights, idx, experts, cfg)
        if cfg.n_shared_experts:
            shared = ExpertBank(cfg.n_shared_experts, cfg, pol, "shared_expert", name="shared_experts")
            y = y + shared.all_experts(xf).astype(jnp.float32).sum(axis=0)
        y = y.astype(pol.compute_dtype).reshape(b, t, h)
        if self.train and cfg.router_aux_loss_coef > 0:
            aux = aux_loss(scores, idx, cfg, b)
        else:
            aux = jnp.zeros((), jnp.float32)
        return y, aux


def dispatch(xf, weights, idx, experts: ExpertBank, config: ModelConfig) -> jax.Array:
    """The routed experts' weighted sum per token (float32 (n, h)), by ``config.moe_impl``; ``auto`` is
    ``dense`` where the kernels are XLA:CPU's and ``sorted`` elsewhere (see :mod:`minimind_jax.model.kernels`)."""
    dt = experts.policy.compute_dtype
    dense = functools.partial(_dense_dispatch, kernels=config.kernels, compute_dtype=dt)
    grouped = functools.partial(_sorted_dispatch, compute_dtype=dt)
    args = (xf, weights, idx, *experts.weights())  # params read here, outside any platform branch
    if config.moe_impl == "dense":
        return dense(*args)
    if config.moe_impl == "sorted":
        return grouped(*args)
    return kernels_lib.by_platform(config.kernels, dense, grouped, *args)


def _dense_dispatch(xf, weights, idx, gate_w, up_w, down_w, kernels: str, compute_dtype) -> jax.Array:
    """Every expert on every token, mixed by a (tokens, experts) combine matrix zero outside the top-k."""
    combine = jnp.einsum("nk,nke->ne", weights, jax.nn.one_hot(idx, gate_w.shape[0], dtype=jnp.float32))
    outs = kernels_lib.all_experts(xf, gate_w, up_w, down_w, kernels, compute_dtype)
    return jnp.einsum("ne,enh->nh", combine, outs.astype(jnp.float32))


def _sorted_dispatch(xf, weights, idx, gate_w, up_w, down_w, compute_dtype) -> jax.Array:
    """The (token, choice) rows sorted by expert through a grouped matmul, weighted and summed back."""
    n, k = idx.shape
    flat_expert = idx.reshape(-1)  # (n*k,), row r belongs to token r // k
    order = jnp.argsort(flat_expert, stable=True)
    token_of_row = order // k
    group_sizes = jnp.bincount(flat_expert, length=gate_w.shape[0]).astype(jnp.int32)
    out = kernels_lib.grouped_experts(xf[token_of_row], group_sizes, gate_w, up_w, down_w, compute_dtype)
    out = out.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jax.ops.segment_sum(out, token_of_row, num_segments=n)
