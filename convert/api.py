"""The converter's Python API: ``load_torch`` (PyTorch checkpoint -> config + params) and ``save_torch``
(params -> MiniMind or Hugging Face directory). The CLI (``convert.cli``) is a thin layer over these."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from convert import dtypes as dt
from convert.infer import infer_config
from convert.io import atomic_directory, read_source_config, read_tensors, write_json, write_pth, write_safetensors
from convert.mapping import _check_keys, params_to_torch, torch_to_params
from minimind_jax.config import ModelConfig


@dataclasses.dataclass
class Report:
    """What a conversion did, for the user: where the config came from, the dtype decision, every cast."""

    source: str = ""
    config_source: str = ""
    dtype: str = ""
    dtype_reason: str = ""
    stored_dtypes: dict[str, int] = dataclasses.field(default_factory=dict)
    casts: dt.CastLog = dataclasses.field(default_factory=dt.CastLog)
    notes: list[str] = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"source: {self.source}", f"config: {self.config_source}",
               f"stored dtypes: {', '.join(f'{k} x{v}' for k, v in sorted(self.stored_dtypes.items()))}",
               f"target dtype: {self.dtype} ({self.dtype_reason})"]
        out += self.casts.lines()
        out += [f"note: {n}" for n in self.notes]
        return out


def _config_from(config: ModelConfig | str | os.PathLike | Mapping | None, src_config: dict | None,
                 src_config_path: Path | None, tensors: Mapping[str, np.ndarray], report: Report) -> ModelConfig:
    if isinstance(config, ModelConfig):
        report.config_source = "given by the caller"
        return config
    if config is not None:
        report.config_source = f"--config {config}" if not isinstance(config, Mapping) else "given by the caller"
        return ModelConfig.from_json(config)
    if src_config is not None:
        report.config_source = f"{src_config_path}"
        inferred = None
        try:
            return ModelConfig.from_json(src_config)
        except ValueError as e:
            if "cannot tell the MiniMind generation" not in str(e):
                raise
            # A MiniMind config.json without generation keys: the tensors decide (q_norm or not).
            inferred, _ = infer_config(tensors)
            report.config_source += f" (generation {inferred.generation}, told by the tensors)"
            return ModelConfig.from_json(src_config, generation=inferred.generation)
    inferred, assumptions = infer_config(tensors)
    report.config_source = "inferred from tensor shapes"
    report.notes += assumptions
    return inferred


def load_torch(path: str | os.PathLike, config: ModelConfig | str | os.PathLike | Mapping | None = None,
               dtype: str | None = None, *, scan_layers: bool | None = None,
               report: Report | None = None) -> tuple[ModelConfig, dict]:
    """Load a MiniMind / Hugging Face PyTorch checkpoint into ``(ModelConfig, params)``.

    ``path``: a ``.safetensors`` file, a directory with ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``, or a MiniMind ``.pth`` state dict (needs torch).
    ``config``: a ``ModelConfig``, a config.json path or dict; by default the ``config.json`` beside the
    weights, else inferred from the tensor shapes. ``dtype``: the params' dtype, whatever the file
    stores (``None`` -> float32 for training; ``auto`` follows the source config's ``torch_dtype``).
    Params come back as numpy arrays (bfloat16 as ``ml_dtypes.bfloat16``) in this project's layout
    (``scan_layers`` overrides the config's). Pass a ``Report`` to learn what was cast.
    """
    report = report if report is not None else Report()
    report.source = os.fspath(path)
    tensors = read_tensors(path)
    src_config, src_config_path = read_source_config(path)
    cfg = _config_from(config, src_config, src_config_path, tensors, report)
    if scan_layers is not None:
        cfg = cfg.replace(scan_layers=scan_layers)
    report.stored_dtypes = dt.summary(tensors)
    report.dtype, report.dtype_reason = dt.resolve(dtype, src_config, report.stored_dtypes)
    _check_keys(tensors, cfg)  # names and shapes, before anything is cast
    dt.check_finite(tensors, report.source)  # NaN / inf weights: a broken checkpoint, never loaded silently
    # Cast each stored tensor before experts / layers are stacked: the report names the tensors as stored
    # (e.g. every float32 expert of a bfloat16 checkpoint), and a stack never mixes dtypes (torch_to_params
    # refuses that rather than cast silently).
    # Both steps replace / consume the tensors one at a time: the checkpoint is never held twice.
    dt.cast_all(tensors, report.dtype, report.casts, in_place=True, where=report.source)
    params = torch_to_params(tensors, cfg, consume=True)
    return cfg, params


# ------------------------------------------------------------------------------------------- export
def hf_config(config: ModelConfig, dtype: str) -> dict[str, Any]:
    """A Hugging Face config.json that ``AutoModelForCausalLM`` loads without trust_remote_code."""
    if config.inference_rope_scaling:
        raise ValueError("inference_rope_scaling (MiniMind's YaRN) has no exact Hugging Face equivalent; "
                         "export with --format minimind, or disable it")
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                  num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                  head_dim=config.head_dim, hidden_act=config.hidden_act,
                  max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
                  rope_theta=config.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                  tie_word_embeddings=config.tie_word_embeddings, attention_bias=False, attention_dropout=0.0,
                  initializer_range=config.initializer_range, bos_token_id=config.bos_token_id,
                  eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, use_cache=True,
                  torch_dtype=dtype, dtype=dtype)
    if config.generation == "minimind3" and config.qk_norm:
        if not config.use_moe:
            return dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", use_sliding_window=False,
                        **common)
        if config.n_shared_experts:
            raise ValueError("a minimind-3 MoE with shared experts has no Hugging Face equivalent; "
                             "export with --format minimind")
        return dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", use_sliding_window=False,
                    num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                    moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
                    router_aux_loss_coef=config.router_aux_loss_coef, decoder_sparse_step=1, mlp_only_layers=[],
                    output_router_logits=False, **common)
    if config.generation == "minimind2" and not config.qk_norm:
        if config.use_moe:
            raise ValueError("minimind2 MoE (shared experts, top-2 with MiniMind's router) has no Hugging Face "
                             "equivalent; export with --format minimind")
        return dict(architectures=["LlamaForCausalLM"], model_type="llama", mlp_bias=False, pretraining_tp=1,
                    **common)
    raise ValueError(f"{config.generation} with qk_norm={config.qk_norm} has no Hugging Face equivalent; "
                     "export with --format minimind")


def save_torch(params: Mapping, config: ModelConfig, out_dir: str | os.PathLike, format: str = "minimind",
               dtype: str = "float32", *, pth: bool | str = False, tokenizer: str | os.PathLike | None = None,
               force: bool = False, clip_fp16: bool = False, report: Report | None = None) -> Path:
    """Export params to a PyTorch directory, atomically.

    ``format="minimind"``: ``model.safetensors`` + MiniMind's ``config.json`` (``pth=True`` also writes
    MiniMind's ``.pth``, with the tied ``lm_head.weight`` as its trainer saves it; a string names the
    file, default ``full_sft_{hidden}[_moe].pth`` as MiniMind's eval script expects). ``format="hf"``: a
    directory that ``transformers.AutoModelForCausalLM`` loads (Qwen3 / Qwen3-MoE / Llama).
    Every tensor is cast to ``dtype``; float16 refuses values beyond +-65504 unless ``clip_fp16``, and NaN / inf
    values whatever ``clip_fp16`` says (an error naming the tensors, before anything is written).
    """
    if format not in ("minimind", "hf"):
        raise ValueError(f"format must be 'minimind' or 'hf', got {format!r}")
    report = report if report is not None else Report()
    report.dtype, report.dtype_reason = dt.canonical(dtype), "requested"
    meta = hf_config(config, report.dtype) if format == "hf" else None  # fail before writing anything
    host = jax.tree.map(np.asarray, params)
    tensors = params_to_torch(host, config, contiguous=False)  # views: the writer copies one at a time
    report.stored_dtypes = dt.summary(tensors)
    tensors = dt.cast_all(tensors, report.dtype, report.casts, clip_fp16=clip_fp16)
    with atomic_directory(out_dir, force=force) as tmp:
        write_safetensors(tmp / "model.safetensors", tensors)
        if format == "hf":
            write_json(tmp / "config.json", meta)
        else:
            cfg = config.to_dict()
            cfg.update(torch_dtype=report.dtype, dtype=report.dtype)
            write_json(tmp / "config.json", cfg)
            if pth:
                with_head = dict(tensors)
                if config.tie_word_embeddings:
                    with_head["lm_head.weight"] = tensors["model.embed_tokens.weight"]
                name = pth if isinstance(pth, str) else default_pth_name(config)
                write_pth(tmp / name, with_head)
                report.notes.append(f"wrote MiniMind .pth: {name}")
        if tokenizer is not None:
            _copy_tokenizer(Path(tokenizer), tmp)
    return Path(out_dir)


def default_pth_name(config: ModelConfig) -> str:
    return f"full_sft_{config.hidden_size}{'_moe' if config.use_moe else ''}.pth"


def _copy_tokenizer(src: Path, dst: Path) -> None:
    names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
    if not (src / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{src}: not a tokenizer directory (no tokenizer.json)")
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
