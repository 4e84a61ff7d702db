"""Model weights from disk: the one loader training, generation, chat, evaluation, the server and the LoRA
merge use.

``load(path)`` reads any of

* this project's checkpoint directory (``minimind_jax.checkpoint``),
* a MiniMind ``.pth`` state dict, a ``.safetensors`` file, a Hugging Face directory (through ``convert``),

and returns ``(ModelConfig, params)`` with params as host numpy arrays in this project's layout. ``dtype``
names the dtype every leaf is returned in; ``overrides`` (model config fields asked for on the command line)
may only change fields that affect how the model runs, not its weights (``RUNTIME_FIELDS``): anything else
that differs from the stored config is an error naming both values.

``resolve_init`` turns training's ``--init`` / ``--from_weight`` into the path ``load`` reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import jax
import ml_dtypes  # noqa: F401  (registers numpy bfloat16 for the casts below)
import numpy as np

import convert
from convert.dtypes import DTypeError
from convert.infer import InferenceError
from convert.io import CheckpointReadError
from convert.mapping import MappingError, params_to_torch, torch_to_params
from minimind_jax.checkpoint import CheckpointError, is_checkpoint, load_checkpoint, looks_like_checkpoint
from minimind_jax.config import ConfigError, ModelConfig

# model fields that change how a model runs, not its weights: a checkpoint's config may differ in these
RUNTIME_FIELDS = ("remat_policy", "moe_impl", "kernels", "dropout", "router_aux_loss_coef", "scan_layers")


class WeightsError(ValueError):
    """A weights path that does not exist or cannot be read (truncated, corrupt, NaN / inf tensors, a bad
    config.json), or weights of another model than the one asked for; one line naming the path."""


# Every way reading weights fails on a bad file (as opposed to a bug): these become a WeightsError.
READ_ERRORS = (CheckpointError, CheckpointReadError, ConfigError, DTypeError, InferenceError, MappingError, OSError)


def load(path: str | os.PathLike, *, dtype: str = "float32", overrides: Mapping[str, Any] | None = None,
         what: str | None = None) -> tuple[ModelConfig, dict]:
    """(config, params as numpy) from a checkpoint directory or anything the converter reads.

    ``what`` names the setting the path came from in error messages (``--init``, ``--teacher``)."""
    path = os.fspath(path)
    where = f"{what} {path}" if what else path
    if not os.path.exists(path):
        raise WeightsError(f"{where}: no such file or directory")
    try:
        # A directory with our manifest or params/ is read as our checkpoint even when damaged, so its error
        # says what is wrong with it (not that it holds no model.safetensors).
        if is_checkpoint(path) or looks_like_checkpoint(path):
            loaded_cfg, params = load_checkpoint(path, dtype=dtype, as_numpy=True)
        else:
            loaded_cfg, params = convert.load_torch(path, dtype=dtype)
    except READ_ERRORS as e:
        message = str(e) if path in str(e) else f"{path}: {e}"
        raise WeightsError(f"{what}: {message}" if what else message) from None
    params = jax.tree.map(np.asarray, params)
    return apply_overrides(loaded_cfg, params, overrides or {}, where)


def apply_overrides(loaded_cfg: ModelConfig, params, overrides: Mapping[str, Any],
                    where: str) -> tuple[ModelConfig, Any]:
    """The stored config with the runtime fields of ``overrides`` applied (params re-laid out if the layer
    layout changes); any other override that differs from the stored config is a ``WeightsError``."""
    conflicts = [f"{k}={v!r} (checkpoint: {getattr(loaded_cfg, k)!r})" for k, v in overrides.items()
                 if k not in RUNTIME_FIELDS and getattr(loaded_cfg, k) != model_value(k, v)]
    if conflicts:
        raise WeightsError(f"{where}: the checkpoint is a different model than asked for: {', '.join(conflicts)}")
    runtime = {k: model_value(k, v) for k, v in overrides.items() if k in RUNTIME_FIELDS}
    new_cfg = loaded_cfg.replace(**runtime) if runtime else loaded_cfg
    if new_cfg.scan_layers != loaded_cfg.scan_layers:
        params = torch_to_params(params_to_torch(params, loaded_cfg), new_cfg)
    return new_cfg, params


def cast(params, dtype) -> Any:
    """Every leaf of ``params`` as a numpy array of ``dtype`` (e.g. a frozen model stored in its compute dtype)."""
    dtype = np.dtype(dtype)
    return jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)


def resolve_init(init: str | None, from_weight: str | None, out_dir: str | os.PathLike,
                 model_cfg: ModelConfig) -> str | None:
    """The weights a training run starts from: ``init`` (a path), else ``from_weight`` as a path or as the
    name of an earlier stage trained into ``out_dir`` (MiniMind's ``{stage}_{hidden}[_moe]``), else None."""
    if init:
        if not os.path.exists(init):
            raise WeightsError(f"--init {init}: no such file or directory")
        return init
    if from_weight in (None, "", "none"):
        return None
    if os.path.exists(from_weight):
        return from_weight
    name = f"{from_weight}_{model_cfg.hidden_size}{'_moe' if model_cfg.use_moe else ''}"
    candidates = [Path(out_dir) / name / "weights", Path(out_dir) / f"{name}.pth"]
    for c in candidates:
        if c.exists():
            return str(c)
    raise WeightsError(f"--from_weight {from_weight}: found none of {', '.join(map(str, candidates))} "
                       f"(train that stage first, or give a path)")


def model_value(key, value):
    """A model override as the config stores it (``use_moe`` given as 0 / 1 is a bool)."""
    return bool(value) if key == "use_moe" else value
