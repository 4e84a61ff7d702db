"""LoRA: low-rank adapters as a pure function of (base params, adapter params).

An adapted projection computes ``W x + (alpha / r) * B A x`` (MiniMind's ``model_lora.py``): ``A`` is drawn
from N(0, 0.02) and ``B`` is zero, so the adapted model starts exactly equal to the base model.

**Adapter params** mirror the base params tree: for every adapted base leaf (a projection kernel ``(in, out)``,
or an expert bank ``(E, in, out)``; with ``scan_layers`` a leading layer axis too) the adapter tree holds
``{"lora_A": (..., in, r), "lora_B": (..., r, out)}`` at the same path. Only these are trained; the base stays
in ``TrainState.frozen`` (not differentiated, not in the optimizer state).

**Running an adapted model** (:func:`adapted_apply`): projections that are ``Linear`` modules get ``lora_A`` /
``lora_B`` next to their ``kernel`` in the params tree handed to ``model.apply`` (no weight is copied, nn.scan
slices them per layer like the kernel), and a flax method interceptor adds ``scale * (x @ A) @ B`` to the
module's output: the true low-rank path. Expert banks (stacked weights used inside the MoE dispatch, not
``Linear`` modules) get their merged weight ``W + scale * A @ B`` instead (the same function, computed once per
step for the adapted banks only).

**Targets** (``--lora_targets``): ``minimind`` is MiniMind's rule, every square projection (in_features ==
out_features: with MiniMind's shapes, ``q_proj`` and ``o_proj``); otherwise a comma list of projection names
(``q_proj k_proj v_proj o_proj`` of attention, ``gate_proj up_proj down_proj`` of the dense MLP) and groups
(``attention``, ``mlp``, ``experts`` = every routed and shared expert projection, ``all``). The MoE router and
the LM head are never adapted (neither is a square Linear in any MiniMind model).

**Files**: MiniMind's adapter files hold ``{module}.lora.A.weight`` (r, in) and ``{module}.lora.B.weight``
(out, r) (torch layout) per adapted module, e.g. ``model.layers.0.self_attn.q_proj.lora.A.weight``, in float16
(``torch.save``). :func:`save_adapters` writes this project's adapter directory (``adapter.safetensors`` with the
same names in float32, plus ``adapter_config.json``: rank, alpha, targets, the model config) and, with ``pth``,
MiniMind's ``.pth``; :func:`load_adapters` reads either (a ``module.`` prefix, as DDP writes, is dropped).
:func:`merge` folds the adapters into full weights, which the converter exports like any checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers numpy bfloat16 for the merged weights' casts)
import numpy as np
from safetensors.numpy import save_file

import convert
from minimind_jax import weights
from minimind_jax.checkpoint import save_checkpoint
from minimind_jax.config import ModelConfig
from minimind_jax.model.layers import Linear, matmul

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FILE",
    "LoraConfig",
    "LoraError",
    "adapted",
    "adapted_apply",
    "adapter_tensors",
    "adapters_from_tensors",
    "count_params",
    "init_adapters",
    "inject",
    "load_adapters",
    "merge",
    "merge_checkpoint",
    "save_adapters",
    "target_paths",
]

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
INIT_STD = 0.02  # MiniMind: A.weight.data.normal_(mean=0.0, std=0.02)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
GROUPS = {"attention": ATTENTION, "mlp": MLP, "experts": ("experts",), "all": ATTENTION + MLP + ("experts",)}
EXPERT_BANKS = ("experts", "shared_experts")


class LoraError(ValueError):
    """Bad LoRA settings or an adapter file that does not fit the model (the message names the key / file)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16  # MiniMind: 16
    alpha: float | None = None  # None: alpha = rank (MiniMind applies no scaling)
    targets: str = "minimind"

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.rank if self.alpha is None else self.alpha, "targets": self.targets,
                "scale": self.scale}


# ------------------------------------------------------------------------------------------------ targets
def _base_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    return convert.expected_param_shapes(config)


def _kind(path: tuple[str, ...]) -> str | None:
    """'linear' for a Linear module's kernel, 'expert' for an expert bank's projection, else None."""
    if path[-1] == "kernel" and path[-2] in ATTENTION + MLP:
        return "linear"
    if len(path) >= 2 and path[-2] in EXPERT_BANKS and path[-1] in MLP:
        return "expert"
    return None


def _wanted(targets: str) -> set[str] | None:
    """The projection names a comma list asks for (None: MiniMind's square rule)."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if names == ["minimind"]:
        return None
    known = set(ATTENTION + MLP) | set(GROUPS)
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise LoraError(f"lora_targets: unknown {', '.join(map(repr, bad)) or 'empty list'}; use 'minimind' (every "
                        f"square projection) or a comma list of {', '.join(ATTENTION + MLP)}, "
                        f"{', '.join(GROUPS)}")
    out: set[str] = set()
    for n in names:
        out.update(GROUPS.get(n, (n,)))
    return out


def target_paths(config: ModelConfig, targets: str = "minimind") -> list[tuple[str, ...]]:
    """The base param paths ``targets`` adapts in a model of ``config`` (sorted; an error if none)."""
    wanted = _wanted(targets)
    out = []
    for path, shape in sorted(_base_shapes(config).items()):
        kind = _kind(path)
        if kind is None:
            continue
        if wanted is None:
            chosen = shape[-1] == shape[-2]  # MiniMind: in_features == out_features
        elif kind == "expert":
            chosen = "experts" in wanted
        else:
            chosen = path[-2] in wanted
        if chosen:
            out.append(path)
    if not out:
        raise LoraError(f"lora_targets={targets!r}: no projection of this model ({config.generation}, hidden "
                        f"{config.hidden_size}, {'MoE' if config.use_moe else 'dense'}) matches; e.g. use "
                        "lora_targets=attention")
    return out


# ------------------------------------------------------------------------------------------------ params
def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _leaves(adapters) -> list[tuple[tuple[str, ...], dict]]:
    """(base path, {"lora_A", "lora_B"}) for every adapted leaf of an adapter tree."""
    out = []

    def walk(node, prefix):
        if "lora_A" in node:
            out.append((prefix, node))
            return
        for k, v in node.items():
            walk(v, prefix + (k,))

    walk(adapters, ())
    return sorted(out, key=lambda item: item[0])


def init_adapters(config: ModelConfig, lora: LoraConfig, seed: int = 0, dtype=np.float32) -> dict:
    """Fresh adapters (numpy): A ~ N(0, 0.02), B = 0, one generator per leaf seeded by (seed, path)."""
    shapes = _base_shapes(config)
    adapters: dict = {}
    for path in target_paths(config, lora.targets):
        *lead, d_in, d_out = shapes[path]
        gen = np.random.default_rng([seed, zlib.crc32("/".join(path).encode())])
        a = (gen.standard_normal((*lead, d_in, lora.rank), dtype=np.float32) * np.float32(INIT_STD)).astype(dtype)
        _set(adapters, path, {"lora_A": a, "lora_B": np.zeros((*lead, lora.rank, d_out), dtype)})
    return adapters


def count_params(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def inject(base, adapters, scale: float):
    """The params tree ``adapted_apply`` runs: ``lora_A`` / ``lora_B`` beside each adapted Linear kernel, expert
    banks merged. Only dicts on the adapted paths are rebuilt; every other leaf is the base array itself."""
    params = dict(base)
    for path, ab in _leaves(adapters):
        # copy the dicts along the path so the base tree is never modified
        node = params
        for k in path[:-2]:
            node[k] = dict(node[k])
            node = node[k]
        parent = dict(node[path[-2]])
        node[path[-2]] = parent
        if _kind(path) == "linear":
            parent["lora_A"], parent["lora_B"] = ab["lora_A"], ab["lora_B"]
        else:
            w = parent[path[-1]]
            delta = jnp.einsum("...ir,...ro->...io", ab["lora_A"], ab["lora_B"], preferred_element_type=jnp.float32)
            parent[path[-1]] = (w + scale * delta).astype(w.dtype)
    return params


def _interceptor(scale: float):
    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, Linear) and module.has_variable("params", "lora_A"):
            a = module.get_variable("params", "lora_A")
            b = module.get_variable("params", "lora_B")
            x = args[0]
            kernels = module.config.kernels  # (x A) B: never forms B A
            low = matmul(matmul(x, a, module.policy, kernels=kernels), b, module.policy, kernels=kernels)
            out = out + (low * scale).astype(out.dtype)
        return out

    return intercept


def adapted(apply, base, scale: float):
    """``apply(params, *args, **kwargs)`` (any function that ends in ``model.apply``) -> ``fn(adapters, *args,
    **kwargs)`` running the adapted model on ``base``."""

    def fn(adapters, *args, **kwargs):
        with nn.intercept_methods(_interceptor(scale)):
            return apply(inject(base, adapters, scale), *args, **kwargs)

    return fn


def adapted_apply(model: nn.Module, base, adapters, scale: float, *args, **kwargs):
    """``model.apply`` of the adapted model: ``W x + scale * B A x`` on every adapted projection."""
    with nn.intercept_methods(_interceptor(scale)):
        return model.apply({"params": inject(base, adapters, scale)}, *args, **kwargs)


def merge(base, adapters, scale: float):
    """Full weights: ``W + scale * A @ B`` on every adapted leaf (float32 products), other leaves as they are.
    numpy in, numpy out (jax arrays are fetched)."""
    merged = jax.tree.map(np.asarray, base)
    merged = jax.tree.map(lambda x: x, merged)  # a fresh tree of dicts (leaves shared until replaced)
    for path, ab in _leaves(adapters):
        w = _get(merged, path)
        a = np.asarray(ab["lora_A"], np.float32)
        b = np.asarray(ab["lora_B"], np.float32)
        delta = np.matmul(a, b)
        _set(merged, path, (w.astype(np.float32) + np.float32(scale) * delta).astype(w.dtype))
    return merged


# ------------------------------------------------------------------------------------------------ files
def _module_names(config: ModelConfig) -> dict[tuple[tuple[str, ...], int | None, int | None], str]:
    """(path inside a layer, layer, expert) -> MiniMind module name (``model.layers.{i}.{...}``)."""
    out = {}
    for suffix, path, _transpose, e in convert.layer_table(config):
        if _kind(path) is None:
            continue
        module = suffix[: -len(".weight")]
        for i in range(config.num_hidden_layers):
            out[(path, i, e)] = f"model.layers.{i}.{module}"
    return out


def _split(path: tuple[str, ...], array: np.ndarray, config: ModelConfig):
    """One adapter leaf -> ((path inside the layer, layer, expert), 2-D array) pieces."""
    if path[0] == "layers":  # scanned: leading layer axis
        per_layer = [(path[1:], i, array[i]) for i in range(array.shape[0])]
    else:
        per_layer = [(path[1:], int(path[0].split("_")[1]), array)]
    for inner, i, x in per_layer:
        if _kind(path) == "expert":
            for e in range(x.shape[0]):
                yield (inner, i, e), x[e]
        else:
            yield (inner, i, None), x


def adapter_tensors(adapters, config: ModelConfig, dtype=np.float32) -> dict[str, np.ndarray]:
    """Adapters -> MiniMind's state dict: ``{module}.lora.A.weight`` (r, in), ``{module}.lora.B.weight`` (out, r)."""
    names = _module_names(config)
    out = {}
    for path, ab in _leaves(adapters):
        for key in ("lora_A", "lora_B"):
            for where, x in _split(path, np.asarray(ab[key]), config):
                out[f"{names[where]}.lora.{key[-1]}.weight"] = np.ascontiguousarray(x.T).astype(dtype)
    return out


def adapters_from_tensors(tensors: Mapping[str, np.ndarray], config: ModelConfig, where: str = "adapter",
                          dtype=np.float32) -> tuple[dict, int]:
    """MiniMind's adapter state dict -> (adapters in this project's layout, rank). Every key must name a
    projection of ``config``; every adapted module needs both A and B of matching shapes."""
    found = _tensors_by_module(tensors, config, where)
    pieces, rank = _checked_pairs(found, config, where)
    adapters: dict = {}
    for (inner, is_expert), layers in pieces.items():
        per_layer = {i: _stack_experts(per_e, inner, is_expert, config, where) for i, per_e in layers.items()}
        if config.scan_layers:
            missing = [i for i in range(config.num_hidden_layers) if i not in per_layer]
            if missing:
                raise LoraError(f"{where}: {'.'.join(inner)} is adapted in some layers but not {missing[:5]}; a "
                                "scanned model (scan_layers) needs every layer")
            a = np.stack([per_layer[i][0] for i in range(config.num_hidden_layers)])
            b = np.stack([per_layer[i][1] for i in range(config.num_hidden_layers)])
            _set(adapters, ("layers",) + inner, {"lora_A": a.astype(dtype), "lora_B": b.astype(dtype)})
        else:
            for i, (a, b) in per_layer.items():
                _set(adapters, (f"layers_{i}",) + inner, {"lora_A": a.astype(dtype), "lora_B": b.astype(dtype)})
    return adapters, rank


def _tensors_by_module(tensors: Mapping[str, np.ndarray], config: ModelConfig, where: str) -> dict:
    """{(path inside the layer, layer, expert): {"A": array, "B": array}} from MiniMind's adapter keys."""
    by_name = {name: key for key, name in _module_names(config).items()}
    found: dict[tuple, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        key = key.removeprefix("module.")
        module, sep, rest = key.partition(".lora.")
        if not sep or rest not in ("A.weight", "B.weight"):
            raise LoraError(f"{where}: {key!r} is not a LoRA tensor ({{module}}.lora.A.weight / .lora.B.weight)")
        if module not in by_name:
            raise LoraError(f"{where}: {key!r}: this model ({config.num_hidden_layers} layers, "
                            f"{'MoE' if config.use_moe else 'dense'}) has no adaptable projection {module!r}")
        found.setdefault(by_name[module], {})[rest[0]] = np.asarray(value)
    if not found:
        raise LoraError(f"{where}: no LoRA tensors in the file")
    return found


def _checked_pairs(found: dict, config: ModelConfig, where: str) -> tuple[dict, int]:
    """Each module's (A (in, r), B (r, out)) checked against its projection, grouped as
    {(inner path, is_expert): {layer: {expert: (a, b)}}}, and the one rank they share."""
    names, shapes = _module_names(config), _base_shapes(config)
    ranks = set()
    pieces: dict[tuple, dict] = {}
    def order(item):  # by module path, layer, expert (a non-expert module first)
        (inner, i, e), _ = item
        return inner, i, -1 if e is None else e

    for (inner, i, e), ab in sorted(found.items(), key=order):
        module = names[(inner, i, e)]
        for part in "AB":
            if part not in ab:
                raise LoraError(f"{where}: {module}.lora.{part}.weight is missing (its pair is present)")
        a, b = ab["A"].T, ab["B"].T  # (in, r), (r, out)
        full = ("layers",) + inner if config.scan_layers else (f"layers_{i}",) + inner
        d_in, d_out = shapes[full][-2:]
        if a.shape[0] != d_in or b.shape[1] != d_out or a.shape[1] != b.shape[0]:
            raise LoraError(f"{where}: {module}.lora: A {ab['A'].shape} / B {ab['B'].shape} do not fit the "
                            f"projection ({d_out}, {d_in}) (torch layout)")
        ranks.add(a.shape[1])
        pieces.setdefault((inner, e is not None), {}).setdefault(i, {}).setdefault(e, (a, b))
    if len(ranks) != 1:
        raise LoraError(f"{where}: the adapters have different ranks {sorted(ranks)}")
    return pieces, ranks.pop()


def _stack_experts(per_e: dict, inner: tuple[str, ...], is_expert: bool, config: ModelConfig, where: str):
    """One layer's (a, b) for a module; an expert bank's stacked over its experts (all of them required)."""
    if not is_expert:
        return per_e[None]
    bank = "experts" if inner[-2] == "experts" else "shared_experts"
    count = config.num_experts if bank == "experts" else config.n_shared_experts
    missing = [e for e in range(count) if e not in per_e]
    if missing:
        raise LoraError(f"{where}: expert bank {'.'.join(inner)} is adapted for some experts but not "
                        f"{missing[:5]} (all experts of a bank share one adapter tensor here)")
    return np.stack([per_e[e][0] for e in range(count)]), np.stack([per_e[e][1] for e in range(count)])


def save_adapters(out_dir: str | os.PathLike, adapters, config: ModelConfig, lora: LoraConfig, *,
                  pth: str | None = None, source: Any = None) -> Path:
    """This project's adapter directory (``adapter.safetensors`` float32 in MiniMind's names +
    ``adapter_config.json``); ``pth`` also writes MiniMind's float16 ``.pth`` of that name inside it."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = adapter_tensors(adapters, config, np.float32)
    save_file(tensors, str(tmp / ADAPTER_FILE))
    meta = {**lora.to_dict(), "params": count_params(adapters), "model": config.to_dict(), "source": source}
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    if pth:
        convert.write_pth(tmp / pth, adapter_tensors(adapters, config, np.float16))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_adapters(path: str | os.PathLike, config: ModelConfig, *, alpha: float | None = None,
                  dtype=np.float32) -> tuple[dict, LoraConfig]:
    """Adapters from this project's adapter directory (rank / alpha / targets from its config) or from any file
    of MiniMind's names (``.pth`` (needs torch) or ``.safetensors``; rank from the shapes, alpha = ``alpha`` or
    the rank, MiniMind's no-scaling). Returns (adapters, LoraConfig)."""
    p = Path(path)
    if not p.exists():
        raise LoraError(f"{p}: no such adapter file or directory")
    meta = {}
    if p.is_dir():
        if not (p / ADAPTER_FILE).is_file():
            raise LoraError(f"{p}: not an adapter directory (no {ADAPTER_FILE})")
        if (p / ADAPTER_CONFIG).is_file():
            meta = json.loads((p / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        file = p / ADAPTER_FILE
    else:
        file = p
    adapters, rank = adapters_from_tensors(convert.read_tensors(file), config, where=str(file), dtype=dtype)
    if meta and meta.get("rank") != rank:
        raise LoraError(f"{p / ADAPTER_CONFIG}: rank {meta.get('rank')} but the tensors have rank {rank}")
    if alpha is None:
        alpha = meta.get("alpha", rank)
    targets = meta.get("targets", "minimind")
    return adapters, LoraConfig(rank=rank, alpha=alpha, targets=targets)


def merge_checkpoint(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
                     format: str = "jax", dtype: str = "float32", alpha: float | None = None, pth: bool = False,
                     tokenizer: str | os.PathLike | None = None, force: bool = False,
                     log=print) -> Path:
    """MiniMind's merge-and-export flow: base weights (any checkpoint ``--init`` reads) + adapters (this project's
    adapter directory or MiniMind's ``.pth``) -> full weights in ``out``: this project's checkpoint
    (``format="jax"``) or, through the converter, MiniMind's layout (``minimind``, ``pth`` adds its ``.pth``) or
    a Hugging Face directory (``hf``)."""
    if format not in ("jax", "minimind", "hf"):
        raise LoraError(f"format must be jax, minimind or hf, got {format!r}")
    config, params = weights.load(base)
    adapters, lcfg = load_adapters(adapter, config, alpha=alpha)
    log(f"base: {base} ({config.generation}, hidden {config.hidden_size}); adapter: {adapter} (rank {lcfg.rank}, "
        f"scale {lcfg.scale:g}, {count_params(adapters):,} params on {len(_leaves(adapters))} tensors)")
    merged = merge(params, adapters, lcfg.scale)
    if format == "jax":
        if dtype != "float32":
            log(f"casting every tensor to {dtype}")
            merged = jax.tree.map(lambda x: np.asarray(x).astype(dtype), merged)
        path = save_checkpoint(out, merged, config, source={"merged": {"base": os.fspath(base),
                                                                      "adapter": os.fspath(adapter),
                                                                      **lcfg.to_dict()}}, force=force)
    else:
        report = convert.Report()
        path = convert.save_torch(merged, config, out, format=format, dtype=dtype, pth=pth, tokenizer=tokenizer,
                                  force=force, report=report)
        for line in report.casts.lines() + [f"note: {n}" for n in report.notes]:
            log(line)
    log(f"merged weights: {out}")
    return Path(path)
