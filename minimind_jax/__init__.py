"""minimind-jax: MiniMind (both generations, Dense and MoE) in JAX / Flax."""

from minimind_jax.config import ConfigError, ModelConfig, param_count
from minimind_jax.model import KVCache, MiniMindLM, ModelOutput, init_params, logical_axes
from minimind_jax.precision import POLICIES, Policy, get_policy

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ModelConfig", "param_count", "KVCache", "MiniMindLM", "ModelOutput", "init_params",
    "logical_axes", "POLICIES", "Policy", "get_policy", "__version__",
]
