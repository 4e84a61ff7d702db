"""Pure Flax linen modules of the MiniMind LM (no training logic, no I/O)."""

from minimind_jax.model.transformer import KVCache, MiniMindLM, ModelOutput, init_params, logical_axes

__all__ = ["KVCache", "MiniMindLM", "ModelOutput", "init_params", "logical_axes"]
