"""Helpers shared by the model tests: tiny configs, cached params, random ids, layout conversion."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from minimind_jax import ModelConfig, init_params

VOCAB = 256  # smaller vocab keeps the tests quick; the presets use 6400


def tiny(name: str, **overrides) -> ModelConfig:
    return ModelConfig.preset(name, **{"vocab_size": VOCAB, **overrides})


@functools.lru_cache(maxsize=None)
def cached_params(config: ModelConfig, seed: int = 0, policy: str = "fp32"):
    """init_params, memoised per (config, seed, policy): each distinct init compiles once per session."""
    return init_params(config, jax.random.key(seed), policy)


def random_ids(shape, seed: int = 0, vocab: int = VOCAB):
    return jnp.asarray(np.random.RandomState(seed).randint(3, vocab, shape), jnp.int32)


def to_scanned(params, config: ModelConfig):
    """Stack ``layers_{i}`` params into the ``nn.scan`` layout (leading layer axis)."""
    layers = [params[f"layers_{i}"] for i in range(config.num_hidden_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out
