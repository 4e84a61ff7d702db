"""Mixture of experts: a float32 softmax router, top-k routed SwiGLU experts, optional shared experts, and
MiniMind's load-balancing aux losses.

Dispatch (``config.moe_impl``); both are exact (no token is ever dropped, unlike capacity-based
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
dense stays the default; re-measure on GPU before switching.

Expert weights are stacked: ``experts/gate_proj`` is (E, hidden, inter), ``experts/down_proj`` is
(E, inter, hidden); the converter maps them to MiniMind's ``experts.{e}.gate_proj.weight``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from minimind_jax.config import ModelConfig
from minimind_jax.model.layers import matmul, param_init
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

    def all_experts(self, x: jax.Array) -> jax.Array:
        """Every expert on every token: x (n, h) -> (E, n, h).

        One 2-D matmul per expert (E is small and static) rather than one batched einsum: XLA:CPU
        rejects some batched bf16 x bf16 -> f32 dots after layout assignment ("Unsupported element
        type for DotThunk"), and plain matmuls are its fastest path anyway.
        """
        pol = self.policy
        outs = []
        for e in range(self.num):
            gate = matmul(x, self.gate_proj[e], pol)
            up = matmul(x, self.up_proj[e], pol)
            outs.append(matmul(nn.silu(gate) * up, self.down_proj[e], pol))
        return jnp.stack(outs)

    def grouped(self, x_sorted: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """Rows sorted by expert, ``group_sizes[e]`` rows for expert e: (m, h) -> (m, h)."""
        dt = self.policy.compute_dtype

        def gdot(a, w):
            return jax.lax.ragged_dot(a.astype(dt), w.astype(dt), group_sizes,
                                      preferred_element_type=jnp.float32).astype(dt)

        hidden = nn.silu(gdot(x_sorted, self.gate_proj)) * gdot(x_sorted, self.up_proj)
        return gdot(hidden, self.down_proj)


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
        # Router in float32 (autocast's deny list keeps softmax there; routing decisions must not flip).
        logits = jnp.dot(xf.astype(jnp.float32), router.astype(jnp.float32))
        scores, weights, idx = route(logits, cfg)
        experts = ExpertBank(cfg.num_experts, cfg, pol, "expert", name="experts")
        if cfg.moe_impl == "dense":
            combine = jnp.einsum("nk,nke->ne", weights, jax.nn.one_hot(idx, cfg.num_experts, dtype=jnp.float32))
            y = jnp.einsum("ne,enh->nh", combine, experts.all_experts(xf).astype(jnp.float32))
        else:
            y = _sorted_dispatch(xf, weights, idx, experts, cfg.num_experts)
        if cfg.n_shared_experts:
            shared = ExpertBank(cfg.n_shared_experts, cfg, pol, "shared_expert", name="shared_experts")
            y = y + shared.all_experts(xf).astype(jnp.float32).sum(axis=0)
        y = y.astype(pol.compute_dtype).reshape(b, t, h)
        if self.train and cfg.router_aux_loss_coef > 0:
            aux = aux_loss(scores, idx, cfg, b)
        else:
            aux = jnp.zeros((), jnp.float32)
        return y, aux


def _sorted_dispatch(xf, weights, idx, experts: ExpertBank, num_experts: int) -> jax.Array:
    n, k = idx.shape
    flat_expert = idx.reshape(-1)  # (n*k,), row r belongs to token r // k
    order = jnp.argsort(flat_expert, stable=True)
    token_of_row = order // k
    group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
    out = experts.grouped(xf[token_of_row], group_sizes).astype(jnp.float32)
    out = out * weights.reshape(-1)[order][:, None]
    return jax.ops.segment_sum(out, token_of_row, num_segments=n)
