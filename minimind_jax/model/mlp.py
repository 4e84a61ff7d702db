"""SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

from __future__ import annotations

import flax.linen as nn
import jax

from minimind_jax.config import ModelConfig
from minimind_jax.model.kernels import silu_product
from minimind_jax.model.layers import Linear
from minimind_jax.precision import Policy


class MLP(nn.Module):
    config: ModelConfig
    policy: Policy
    intermediate_size: int = 0  # 0: config.intermediate_size

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, pol = self.config, self.policy
        inter = self.intermediate_size or cfg.intermediate_size
        gate = Linear(inter, cfg, pol, ("embed", "mlp"), name="gate_proj")(x)
        up = Linear(inter, cfg, pol, ("embed", "mlp"), name="up_proj")(x)
        return Linear(cfg.hidden_size, cfg, pol, ("mlp", "embed"), name="down_proj")(silu_product(gate, up, cfg.kernels))
