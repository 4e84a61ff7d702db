"""The tensor-name mapping between MiniMind / Hugging Face PyTorch state dicts and this project's params.

One declarative table (``LAYER_TABLE``) lists, for a decoder layer, each torch tensor name, the param
path it lands in and the transform between them (torch ``nn.Linear`` weights are (out, in); our kernels
are (in, out), so Linear weights are transposed). Experts are stacked on a leading axis in our params
(``mlp/experts/gate_proj`` is (E, hidden, inter)) and one tensor per expert in torch
(``mlp.experts.{e}.gate_proj.weight``). Scanned layouts (``config.scan_layers``) stack layers the same way.

Numpy arrays in, numpy arrays out; dtypes are left exactly as they come (the converter decides casts,
explicitly). The functions here only rename, transpose and stack, and they check every key and shape.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from minimind_jax.checkpoint import CheckpointError, check_params, flatten_params, shape_problems
from minimind_jax.config import ModelConfig


class MappingError(ValueError):
    """A state dict that does not match the expected config (missing / unexpected keys, bad shapes)."""


# (torch name suffix inside "model.layers.{i}.", param path inside the layer, transpose?)
_ATTN = [
    ("input_layernorm.weight", ("input_layernorm", "weight"), False),
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), True),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), True),
    ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), True),
    ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), True),
    ("post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), False),
]
_QK_NORM = [
    ("self_attn.q_norm.weight", ("self_attn", "q_norm", "weight"), False),
    ("self_attn.k_norm.weight", ("self_attn", "k_norm", "weight"), False),
]
_DENSE_MLP = [
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), True),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), True),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), True),
]
_ROUTER = [("mlp.gate.weight", ("mlp", "gate"), True)]
_EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")


def layer_table(config: ModelConfig) -> Iterator[tuple[str, tuple[str, ...], bool, int | None]]:
    """(torch suffix, param path, transpose, expert index or None) for one decoder layer."""
    for suffix, path, t in _ATTN + (_QK_NORM if config.qk_norm else []):
        yield suffix, path, t, None
    if not config.use_moe:
        for suffix, path, t in _DENSE_MLP:
            yield suffix, path, t, None
        return
    for suffix, path, t in _ROUTER:
        yield suffix, path, t, None
    for bank, count in (("experts", config.num_experts), ("shared_experts", config.n_shared_experts)):
        for e in range(count):
            for proj in _EXPERT_PROJ:
                yield f"mlp.{bank}.{e}.{proj}.weight", ("mlp", bank, proj), True, e


def expected_torch_shapes(config: ModelConfig, include_lm_head: bool = False) -> dict[str, tuple[int, ...]]:
    """Every torch tensor name of ``config``'s state dict and its (torch-layout) shape."""
    h, d, inter = config.hidden_size, config.head_dim, config.intermediate_size
    nh, nkv, moe_inter = config.num_attention_heads, config.num_key_value_heads, config.moe_intermediate_size
    shapes = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (nh * d, h), "self_attn.k_proj.weight": (nkv * d, h),
        "self_attn.v_proj.weight": (nkv * d, h), "self_attn.o_proj.weight": (h, nh * d),
        "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
        "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter),
        "mlp.gate.weight": (config.num_experts, h),
    }
    expert = {"gate_proj": (moe_inter, h), "up_proj": (moe_inter, h), "down_proj": (h, moe_inter)}
    out = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(config.num_hidden_layers):
        for suffix, _, _, e in layer_table(config):
            shape = expert[suffix.rsplit(".", 2)[-2]] if e is not None else shapes[suffix]
            out[f"model.layers.{i}.{suffix}"] = shape
    if include_lm_head or not config.tie_word_embeddings:
        out["lm_head.weight"] = (config.vocab_size, h)
    return out


def expected_param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every leaf path of ``config``'s params pytree (the layout ``torch_to_params`` builds) and its shape."""
    torch_shapes = expected_torch_shapes(config)
    layer: dict[tuple[str, ...], tuple[int, ...]] = {}
    for suffix, path, transpose, e in layer_table(config):
        shape = torch_shapes[f"model.layers.0.{suffix}"]
        shape = shape[::-1] if transpose else shape
        if e is not None:
            shape = (config.num_experts if path[1] == "experts" else config.n_shared_experts,) + shape
        layer[path] = shape
    h, v, n = config.hidden_size, config.vocab_size, config.num_hidden_layers
    out = {("embed_tokens",): (v, h), ("norm", "weight"): (h,)}
    if not config.tie_word_embeddings:
        out[("lm_head",)] = (h, v)
    for path, shape in layer.items():
        if config.scan_layers:
            out[("layers",) + path] = (n,) + shape
        else:
            out.update({(f"layers_{i}",) + path: shape for i in range(n)})
    return out


def _check_params(params: Mapping, config: ModelConfig) -> None:
    """Refuse params that are not exactly ``config``'s tree: exporting them would silently drop layers,
    experts or an untied head (only the paths the config names are read) or write wrongly shaped tensors.
    The check itself is the checkpoint module's (one definition of "params match a config")."""
    try:
        flat = flatten_params(params)
        check_params({p: tuple(np.shape(x)) for p, x in flat}, {p: np.asarray(x).dtype for p, x in flat},
                     config, "params")
    except CheckpointError as e:
        raise MappingError(str(e)) from None


def _check_keys(state_dict: Mapping[str, np.ndarray], config: ModelConfig) -> None:
    expected = expected_torch_shapes(config, include_lm_head=True)
    optional = frozenset({"lm_head.weight"} if config.tie_word_embeddings else ())
    names = set(state_dict)
    missing = set(expected) - names - optional
    unexpected = names - set(expected)
    problems = []
    if any(".q_norm." in k for k in unexpected) and not config.qk_norm:
        problems.append("the checkpoint has q_norm/k_norm tensors (a minimind-3 / Qwen3 model) but the "
                        "config has qk_norm=False (minimind2)")
    if any(".q_norm." in k for k in missing) and config.qk_norm:
        problems.append("the config has qk_norm=True (minimind-3) but the checkpoint has no q_norm/k_norm "
                        "tensors (a minimind2 / Llama model)")
    problems += shape_problems(expected, {k: tuple(v.shape) for k, v in state_dict.items()}, "tensor",
                               optional=optional, limit=12)
    if problems:
        raise MappingError(f"state dict does not match the config ({_describe(config)}):\n  - "
                           + "\n  - ".join(problems))


def _describe(config: ModelConfig) -> str:
    kind = f"MoE {config.num_experts}x top-{config.num_experts_per_tok}" if config.use_moe else "Dense"
    return (f"{config.generation} {kind}, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
            f"heads {config.num_attention_heads}/{config.num_key_value_heads}, vocab {config.vocab_size}")


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def torch_to_params(state_dict: Mapping[str, np.ndarray], config: ModelConfig, *, consume: bool = False) -> dict:
    """A MiniMind / HF state dict (name -> numpy array) -> this project's params pytree (numpy).

    ``lm_head.weight`` may be absent when embeddings are tied; when present it must equal the embedding.
    Raises ``MappingError`` listing every missing / unexpected key and shape mismatch. Every leaf is a
    C-contiguous array: transposed weights are copied, stacked ones (experts, scanned layers) are filled
    into one preallocated array (the tensors stacked into one leaf must share a dtype: nothing is cast
    here). ``consume=True`` removes each tensor from ``state_dict`` (a mutable dict) as soon as it is
    placed, so converting a large checkpoint never holds two full copies.
    """
    _check_keys(state_dict, config)
    take = state_dict.pop if consume else state_dict.__getitem__
    embed = np.ascontiguousarray(take("model.embed_tokens.weight"))
    if config.tie_word_embeddings and "lm_head.weight" in state_dict:
        if not np.array_equal(np.asarray(take("lm_head.weight")), embed):
            raise MappingError("tie_word_embeddings is set but lm_head.weight differs from "
                               "model.embed_tokens.weight; load with tie_word_embeddings=False")
    params: dict = {"embed_tokens": embed, "norm": {"weight": np.ascontiguousarray(take("model.norm.weight"))}}
    if not config.tie_word_embeddings:
        params["lm_head"] = np.ascontiguousarray(np.asarray(take("lm_head.weight")).T)

    shapes = expected_param_shapes(config)
    stacked: dict[tuple[str, ...], str] = {}  # leaf path -> first torch name placed in it (for dtype errors)
    for i in range(config.num_hidden_layers):
        for suffix, path, transpose, e in layer_table(config):
            name = f"model.layers.{i}.{suffix}"
            arr = np.asarray(take(name))
            arr = arr.T if transpose else arr
            leaf = ("layers",) + path if config.scan_layers else (f"layers_{i}",) + path
            index = ((i,) if config.scan_layers else ()) + ((e,) if e is not None else ())
            if not index:
                _set(params, leaf, np.ascontiguousarray(arr))
                continue
            if leaf not in stacked:
                stacked[leaf] = name
                _set(params, leaf, np.empty(shapes[leaf], arr.dtype))
            target = _get(params, leaf)
            if arr.dtype != target.dtype:
                raise MappingError(f"{name} is {arr.dtype.name} but {stacked[leaf]}, stacked into the same "
                                   f"param {'/'.join(leaf)}, is {target.dtype.name}; cast the state dict to one "
                                   "dtype first (convert.load_torch does)")
            target[index] = arr
    return params


def params_to_torch(params: Mapping, config: ModelConfig, include_lm_head: bool = False,
                    contiguous: bool = True) -> dict[str, np.ndarray]:
    """This project's params pytree -> a MiniMind / HF state dict (name -> numpy array, torch layout).

    ``include_lm_head`` writes ``lm_head.weight`` even when tied (MiniMind's ``.pth`` files carry it;
    Hugging Face safetensors files drop tied copies). Arrays keep their dtype. ``contiguous=False`` returns
    transposed views instead of copies (a writer that copies one tensor at a time then needs no second
    copy of the checkpoint). Raises ``MappingError`` when
    ``params`` is not exactly ``config``'s tree (missing / extra leaves, wrong shapes, the other layout).
    """
    _check_params(params, config)
    p = {k: v for k, v in params.items()}
    out: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": np.asarray(p["embed_tokens"]),
        "model.norm.weight": np.asarray(p["norm"]["weight"]),
    }
    for i in range(config.num_hidden_layers):
        for suffix, path, transpose, e in layer_table(config):
            if config.scan_layers:
                arr = np.asarray(_get(p["layers"], path))[i]
            else:
                arr = np.asarray(_get(p[f"layers_{i}"], path))
            if e is not None:
                arr = arr[e]
            arr = arr.T if transpose else arr
            out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(arr) if contiguous else arr
    if not config.tie_word_embeddings:
        head = np.asarray(p["lm_head"]).T
        out["lm_head.weight"] = np.ascontiguousarray(head) if contiguous else head
    elif include_lm_head:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out
