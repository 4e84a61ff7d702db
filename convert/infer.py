"""Infer a ``ModelConfig`` from a state dict's tensor names and shapes (when no config.json is at hand).

Shapes fix most fields. Two cannot be read from shapes and take MiniMind's defaults, which the caller
reports: the number of attention heads of a minimind2 / Llama model (no q_norm gives head_dim away; we
assume MiniMind's 8 heads) and the router's top-k (minimind-3: 1, minimind2: 2).
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from minimind_jax.config import ModelConfig

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^model\.layers\.0\.mlp\.experts\.(\d+)\.")
_SHARED = re.compile(r"^model\.layers\.0\.mlp\.shared_experts\.(\d+)\.")
MINIMIND_DEFAULT_HEADS = 8


class InferenceError(ValueError):
    """The tensors do not look like a MiniMind / Qwen3 / Llama causal LM."""


def infer_config(tensors: Mapping[str, np.ndarray]) -> tuple[ModelConfig, list[str]]:
    """(config, assumptions) from tensor names and shapes; ``assumptions`` lists what was guessed."""
    def shape(name):
        if name not in tensors:
            raise InferenceError(f"cannot infer a config: tensor {name!r} is missing")
        return tuple(tensors[name].shape)

    vocab, hidden = shape("model.embed_tokens.weight")
    layers = sorted({int(m.group(1)) for k in tensors if (m := _LAYER.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise InferenceError("cannot infer a config: no consecutive model.layers.{i}.* tensors")
    assumptions: list[str] = []
    q_rows = shape("model.layers.0.self_attn.q_proj.weight")[0]
    kv_rows = shape("model.layers.0.self_attn.k_proj.weight")[0]
    qk_norm = "model.layers.0.self_attn.q_norm.weight" in tensors
    generation = "minimind3" if qk_norm else "minimind2"
    if qk_norm:
        head_dim = shape("model.layers.0.self_attn.q_norm.weight")[0]
        heads = q_rows // head_dim
    else:
        heads = MINIMIND_DEFAULT_HEADS
        head_dim = q_rows // heads
        assumptions.append(f"num_attention_heads={heads} (MiniMind's default; shapes cannot tell it "
                           "without q_norm): pass --config if the model differs")
    kv_heads = kv_rows // head_dim
    fields = dict(generation=generation, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=len(layers),
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    if "model.layers.0.mlp.gate.weight" in tensors:
        experts = sorted({int(m.group(1)) for k in tensors if (m := _EXPERT.match(k))})
        shared = sorted({int(m.group(1)) for k in tensors if (m := _SHARED.match(k))})
        inter = shape("model.layers.0.mlp.experts.0.gate_proj.weight")[0]
        fields.update(use_moe=True, num_experts=len(experts), n_shared_experts=len(shared),
                      intermediate_size=inter, moe_intermediate_size=inter)
        default_k = ModelConfig(generation=generation).num_experts_per_tok
        assumptions.append(f"num_experts_per_tok={default_k} (the {generation} default; shapes cannot tell "
                           "the router's top-k): pass --config if the model differs")
    else:
        fields["intermediate_size"] = shape("model.layers.0.mlp.gate_proj.weight")[0]
    head = tensors.get("lm_head.weight")
    fields["tie_word_embeddings"] = head is None or np.array_equal(head, tensors["model.embed_tokens.weight"])
    return ModelConfig(**fields), assumptions
