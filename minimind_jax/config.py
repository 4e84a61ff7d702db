"""Model configuration: one frozen dataclass for both MiniMind generations.

* ``minimind3`` (2026, Qwen3-style): q/k RMSNorm, eps 1e-6, ``intermediate = ceil(pi*hidden/64)*64``,
  MoE with a softmax router, top-k, no shared experts and a batch-level aux loss.
* ``minimind2`` (2025, Llama-style): no q/k norm, eps 1e-5, ``intermediate = 64*ceil(int(8*hidden/3)/64)``,
  MoE with shared experts, top-2 and a sequence-level aux loss.

The generation only picks defaults; the model reads the individual switches (``qk_norm``, ``seq_aux``,
``n_shared_experts`` ...), so every field below is honoured whatever the generation.

``ModelConfig.from_json`` reads MiniMind ``config.json`` files of either generation and Hugging Face
``Qwen3`` / ``Qwen3Moe`` / ``Llama`` files; ``to_json`` writes MiniMind's layout for the generation (plus
the few keys this project adds), and ``from_json(to_json(c)) == c``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any, Mapping

GENERATIONS = ("minimind3", "minimind2")
MOE_IMPLS = ("auto", "dense", "sorted")
KERNELS = ("auto", "xla_cpu", "generic")  # see minimind_jax.model.kernels
REMAT_POLICIES = ("none", "full", "dots")


class ConfigError(ValueError):
    """A config file or override that cannot describe a MiniMind model."""


def minimind2_intermediate_size(hidden_size: int) -> int:
    """MiniMind2's FeedForward rule: ``64 * ceil(int(8 * hidden / 3) / 64)``."""
    return 64 * ((int(hidden_size * 8 / 3) + 63) // 64)


def minimind3_intermediate_size(hidden_size: int) -> int:
    """MiniMind-3's rule: ``ceil(hidden * pi / 64) * 64``."""
    return math.ceil(hidden_size * math.pi / 64) * 64


# Generation defaults for every field whose default depends on the generation (``None`` in the dataclass).
_GENERATION_DEFAULTS: dict[str, dict[str, Any]] = {
    "minimind3": dict(
        rms_norm_eps=1e-6, qk_norm=True, num_experts_per_tok=1, n_shared_experts=0,
        router_aux_loss_coef=5e-4, seq_aux=False,
    ),
    "minimind2": dict(
        rms_norm_eps=1e-5, qk_norm=False, num_experts_per_tok=2, n_shared_experts=1,
        router_aux_loss_coef=0.1, seq_aux=True,
    ),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every hyperparameter of a MiniMind model (either generation, Dense or MoE).

    Fields left ``None`` / ``0`` take the generation's default in ``__post_init__``, so a config
    object is always fully resolved: ``config.rms_norm_eps`` is a number, never ``None``.
    """

    generation: str = "minimind3"
    vocab_size: int = 6400
    hidden_size: int = 768
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    intermediate_size: int = 0  # 0: the generation's rule
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float | None = None
    rope_theta: float = 1e6
    # YaRN, as MiniMind's ``inference_rope_scaling`` (factor 16 over an original 2048 context).
    inference_rope_scaling: bool = False
    rope_scaling_factor: float = 16.0
    rope_scaling_original_max: int = 2048
    rope_scaling_beta_fast: float = 32.0
    rope_scaling_beta_slow: float = 1.0
    rope_scaling_attention_factor: float = 1.0
    qk_norm: bool | None = None
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    # Mixture of experts (ignored unless use_moe).
    use_moe: bool = False
    num_experts: int = 4
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int = 0  # 0: intermediate_size
    n_shared_experts: int | None = None
    norm_topk_prob: bool = True
    router_aux_loss_coef: float | None = None
    seq_aux: bool | None = None  # sequence-level (minimind2) or batch-level (minimind3) aux loss
    # Implementation switches (not part of the architecture; checkpoints record them).
    scan_layers: bool = False
    remat_policy: str = "none"
    moe_impl: str = "auto"  # auto: dense with the XLA:CPU kernels, sorted (grouped matmul) elsewhere
    kernels: str = "auto"  # auto: XLA:CPU specialisations when lowered for the CPU, plain einsums elsewhere
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.generation not in GENERATIONS:
            raise ConfigError(f"generation must be one of {GENERATIONS}, got {self.generation!r}")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        for key, value in _GENERATION_DEFAULTS[self.generation].items():
            if getattr(self, key) is None:
                set_(key, value)
        if self.head_dim == 0:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; give head_dim explicitly")
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if self.intermediate_size == 0:
            rule = minimind3_intermediate_size if self.generation == "minimind3" else minimind2_intermediate_size
            set_("intermediate_size", rule(self.hidden_size))
        if self.moe_intermediate_size == 0:
            set_("moe_intermediate_size", self.intermediate_size)
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings")
        for key in positive:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ConfigError(f"{key} must be an integer, got {value!r}")
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value!r}")
        for key in ("rms_norm_eps", "rope_theta", "rope_scaling_factor"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{key} must be a positive finite number, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ConfigError(f"only hidden_act='silu' is supported (MiniMind's SwiGLU), got {self.hidden_act!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.use_moe:
            if self.num_experts <= 0:
                raise ConfigError(f"num_experts must be positive for MoE, got {self.num_experts}")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                    f"got {self.num_experts_per_tok}")
            if self.n_shared_experts < 0:
                raise ConfigError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.moe_impl not in MOE_IMPLS:
            raise ConfigError(f"moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        if self.kernels not in KERNELS:
            raise ConfigError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named configuration; ``overrides`` replace any field."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived
    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def num_routed_experts(self) -> int:
        return self.num_experts if self.use_moe else 0

    # ------------------------------------------------------------------ JSON
    @classmethod
    def from_json(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], *,
                  generation: str | None = None, **overrides) -> "ModelConfig":
        """Read a MiniMind (either generation) or Hugging Face (Qwen3, Qwen3Moe, Llama) ``config.json``.

        ``path_or_dict`` may be a file, a directory holding ``config.json``, or an already-parsed dict.
        The generation is told by the keys; pass ``generation=`` for a file that does not say.
        """
        source = "<dict>"
        if isinstance(path_or_dict, Mapping):
            raw = dict(path_or_dict)
        elif not isinstance(path_or_dict, (str, os.PathLike)):  # e.g. a config.json parsed as a list elsewhere
            raise ConfigError(f"expected a JSON object, got {type(path_or_dict).__name__} (a model config is a "
                              "mapping of model fields)")
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = path
            try:
                with open(path, encoding="utf-8") as f:
                    raw = json.load(f)
            except FileNotFoundError:
                raise ConfigError(f"{path}: no such config file") from None
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                raise ConfigError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
            except IsADirectoryError:
                raise ConfigError(f"{path}: a directory, not a config file") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__} (a config.json is "
                                  "a mapping of model fields)")
        try:
            fields = _fields_from_raw(raw, generation)
            fields.update(overrides)
            return cls(**fields)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:  # a value of the wrong type, e.g. a string for hidden_size
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """MiniMind's config.json layout for this generation, plus this project's keys."""
        d: dict[str, Any] = {
            "architectures": ["MiniMindForCausalLM"],
            "model_type": "minimind",
            "generation": self.generation,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "inference_rope_scaling": self.inference_rope_scaling,
            "rope_scaling": self.rope_scaling_dict(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "dropout": self.dropout,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "flash_attn": True,
            "use_moe": self.use_moe,
            "num_experts_per_tok": self.num_experts_per_tok,
            "norm_topk_prob": self.norm_topk_prob,
        }
        if self.generation == "minimind3":
            d.update(head_dim=self.head_dim, num_experts=self.num_experts,
                     moe_intermediate_size=self.moe_intermediate_size,
                     router_aux_loss_coef=self.router_aux_loss_coef)
            # Switches MiniMind-3 does not have: written only when they differ from its behaviour.
            if self.seq_aux:
                d["seq_aux"] = True
            if self.n_shared_experts:
                d["n_shared_experts"] = self.n_shared_experts
            if not self.qk_norm:
                d["qk_norm"] = False
        else:
            d.update(n_routed_experts=self.num_experts, n_shared_experts=self.n_shared_experts,
                     scoring_func="softmax", aux_loss_alpha=self.router_aux_loss_coef, seq_aux=self.seq_aux)
            if self.head_dim != self.hidden_size // self.num_attention_heads:
                d["head_dim"] = self.head_dim
            if self.moe_intermediate_size != self.intermediate_size:
                d["moe_intermediate_size"] = self.moe_intermediate_size
            if self.qk_norm:
                d["qk_norm"] = True
        d.update(rope_scaling_extra(self))
        d.update(scan_layers=self.scan_layers, remat_policy=self.remat_policy, moe_impl=self.moe_impl,
                 kernels=self.kernels, initializer_range=self.initializer_range)
        return d

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, ensure_ascii=False) + "\n"
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def rope_scaling_dict(self) -> dict[str, Any] | None:
        if not self.inference_rope_scaling:
            return None
        return {
            "beta_fast": self.rope_scaling_beta_fast,
            "beta_slow": self.rope_scaling_beta_slow,
            "factor": self.rope_scaling_factor,
            "original_max_position_embeddings": self.rope_scaling_original_max,
            "attention_factor": self.rope_scaling_attention_factor,
            "type": "yarn",
        }


def rope_scaling_extra(config: ModelConfig) -> dict[str, Any]:
    """YaRN parameters that differ from MiniMind's fixed ones (kept even when scaling is off)."""
    default = ModelConfig()
    out = {}
    for key in ("rope_scaling_factor", "rope_scaling_original_max", "rope_scaling_beta_fast",
                "rope_scaling_beta_slow", "rope_scaling_attention_factor"):
        if getattr(config, key) != getattr(default, key):
            out[key] = getattr(config, key)
    return out


# ---------------------------------------------------------------------------------------------- parsing
_MINIMIND3_MARKERS = ("num_experts", "router_aux_loss_coef", "head_dim")
_MINIMIND2_MARKERS = ("n_routed_experts", "aux_loss_alpha", "seq_aux", "n_shared_experts")
_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
_OURS = {"scan_layers": bool, "remat_policy": str, "moe_impl": str, "kernels": str, "initializer_range": float, "qk_norm": bool,
         "rope_scaling_factor": float, "rope_scaling_original_max": int, "rope_scaling_beta_fast": float,
         "rope_scaling_beta_slow": float, "rope_scaling_attention_factor": float}  # key: JSON type


def _detect_generation(raw: Mapping[str, Any], asked: str | None = None) -> str | None:
    model_type = raw.get("model_type")
    if model_type in ("qwen3", "qwen3_moe"):
        return "minimind3"
    if model_type == "llama":
        return "minimind2"
    if raw.get("generation") is not None:
        return raw["generation"]
    m3 = [k for k in _MINIMIND3_MARKERS if k in raw]
    m2 = [k for k in _MINIMIND2_MARKERS if k in raw]
    if m3 and m2:
        if asked is not None:  # the caller settles it, as the message below suggests
            return asked
        raise ConfigError(
            f"contradictory generation keys: minimind-3 keys {m3} and minimind2 keys {m2} in one file; "
            "pass generation= to say which")
    if m3:
        return "minimind3"
    if m2:
        return "minimind2"
    return None


def _fields_from_raw(raw: Mapping[str, Any], generation: str | None) -> dict[str, Any]:
    """The ModelConfig fields of a MiniMind (either generation) or Hugging Face ``config.json``."""
    model_type = raw.get("model_type") or "minimind"
    if model_type not in ("minimind", "qwen3", "qwen3_moe", "llama"):
        raise ConfigError(f"unsupported model_type {model_type!r} (expected minimind, qwen3, qwen3_moe or llama)")
    hf = model_type in ("qwen3", "qwen3_moe", "llama")
    missing = [k for k in _SHAPE_KEYS if raw.get(k) is None]
    generation = _generation(raw, generation)
    if missing:
        raise ConfigError(f"missing model-shape field(s) {missing}")
    f: dict[str, Any] = {"generation": generation, **_shape_fields(raw, hf)}
    f.update(_rope_fields(raw, hf))
    f.update(_moe_fields(raw, model_type, hf))
    # This project's own keys (written by to_json).
    for key, kind in _OURS.items():
        if key in raw and raw[key] is not None and key not in f:
            f[key] = _TYPED[kind](key, raw[key])
    return f


def _generation(raw: Mapping[str, Any], generation: str | None) -> str:
    detected = _detect_generation(raw, generation)
    if generation is not None and detected is not None and generation != detected:
        raise ConfigError(f"generation={generation!r} was asked for but the file's keys say {detected!r}")
    generation = generation or detected
    if generation is None:
        raise ConfigError(
            "cannot tell the MiniMind generation from the keys (no num_experts / router_aux_loss_coef / "
            "head_dim for minimind-3, no n_routed_experts / aux_loss_alpha / seq_aux / n_shared_experts "
            "for minimind2); pass generation='minimind3' or 'minimind2'")
    if generation not in GENERATIONS:
        raise ConfigError(f"generation must be one of {GENERATIONS}, got {generation!r}")
    return generation


def _shape_fields(raw: Mapping[str, Any], hf: bool) -> dict[str, Any]:
    f: dict[str, Any] = {}
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):  # HF allows a list; MiniMind has one eos
        raw = {**raw, "eos_token_id": eos[0] if eos else None}
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "pad_token_id", "bos_token_id",
                "eos_token_id"):
        if raw.get(key) is not None:
            f[key] = _as_int(raw, key)
    kv = raw.get("num_key_value_heads")
    if kv is None:
        if not hf:
            raise ConfigError("missing model-shape field 'num_key_value_heads'")
        kv = f["num_attention_heads"]  # HF convention: absent means multi-head attention
    f["num_key_value_heads"] = _int("num_key_value_heads", kv)
    if raw.get("head_dim") is not None:
        f["head_dim"] = _as_int(raw, "head_dim")
    for key in ("hidden_act",):
        if raw.get(key) is not None:
            f[key] = raw[key]
    for key in ("rms_norm_eps", "dropout", "initializer_range"):
        if raw.get(key) is not None:
            f[key] = _float(key, raw[key])
    if raw.get("tie_word_embeddings") is not None:
        f["tie_word_embeddings"] = _bool("tie_word_embeddings", raw["tie_word_embeddings"])
    elif hf:
        f["tie_word_embeddings"] = False  # transformers' default for Qwen3, Qwen3Moe and Llama

    return f


def _rope_fields(raw: Mapping[str, Any], hf: bool) -> dict[str, Any]:
    """RoPE: MiniMind and older HF files carry rope_theta; transformers 5 nests it in rope_parameters."""
    f: dict[str, Any] = {}
    rope_params = raw.get("rope_parameters") or {}
    theta = raw.get("rope_theta", rope_params.get("rope_theta"))
    if theta is not None:
        f["rope_theta"] = _float("rope_theta", theta)
    rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
    if hf:
        scaling = raw.get("rope_scaling")
        if scaling or rope_type not in ("default", None):
            raise ConfigError(
                f"rope scaling {scaling or rope_params!r} in a Hugging Face config is not supported "
                "(MiniMind's YaRN is enabled with inference_rope_scaling in a MiniMind config)")
        if raw.get("attention_bias") or raw.get("mlp_bias"):
            raise ConfigError("attention_bias / mlp_bias are set: MiniMind models have no biases")
    else:
        f["inference_rope_scaling"] = _bool("inference_rope_scaling", raw.get("inference_rope_scaling", False))
        # transformers 5 saves MiniMind's rope_scaling dict as rope_parameters (rope_type "yarn").
        scaling = raw.get("rope_scaling") or (rope_params if rope_type == "yarn" else {})
        for ours, theirs in (("rope_scaling_factor", "factor"),
                             ("rope_scaling_original_max", "original_max_position_embeddings"),
                             ("rope_scaling_beta_fast", "beta_fast"), ("rope_scaling_beta_slow", "beta_slow"),
                             ("rope_scaling_attention_factor", "attention_factor")):
            if theirs in scaling:
                f[ours] = _TYPED[_OURS[ours]](f"rope_scaling.{theirs}", scaling[theirs])

    return f


def _moe_fields(raw: Mapping[str, Any], model_type: str, hf: bool) -> dict[str, Any]:
    f: dict[str, Any] = {}
    if model_type == "qwen3_moe":
        f["use_moe"] = True
        if raw.get("mlp_only_layers") or _int("decoder_sparse_step", raw.get("decoder_sparse_step", 1)) != 1:
            raise ConfigError("mlp_only_layers / decoder_sparse_step != 1: MiniMind puts MoE in every layer")
    elif hf:
        f["use_moe"] = False
    else:
        f["use_moe"] = _bool("use_moe", raw.get("use_moe", False))
    n3, n2 = raw.get("num_experts"), raw.get("n_routed_experts")
    if n3 is None and model_type == "qwen3_moe":  # transformers 5 writes Qwen3Moe's num_experts under this name
        n3 = raw.get("num_local_experts")
    n3 = None if n3 is None else _int("num_experts", n3)
    n2 = None if n2 is None else _int("n_routed_experts", n2)
    if n3 is not None and n2 is not None and n3 != n2:
        raise ConfigError(f"num_experts ({n3}) and n_routed_experts ({n2}) disagree")
    if (n3 if n3 is not None else n2) is not None:
        f["num_experts"] = n3 if n3 is not None else n2
    a3, a2 = raw.get("router_aux_loss_coef"), raw.get("aux_loss_alpha")
    a3 = None if a3 is None else _float("router_aux_loss_coef", a3)
    a2 = None if a2 is None else _float("aux_loss_alpha", a2)
    if a3 is not None and a2 is not None and a3 != a2:
        raise ConfigError(f"router_aux_loss_coef ({a3}) and aux_loss_alpha ({a2}) disagree")
    if (a3 if a3 is not None else a2) is not None:
        f["router_aux_loss_coef"] = a3 if a3 is not None else a2
    for key in ("num_experts_per_tok", "moe_intermediate_size", "n_shared_experts"):
        if raw.get(key) is not None:
            f[key] = _int(key, raw[key])
    for key in ("norm_topk_prob", "seq_aux"):
        if raw.get(key) is not None:
            f[key] = _bool(key, raw[key])
    if raw.get("scoring_func", "softmax") != "softmax":
        raise ConfigError(f"scoring_func {raw['scoring_func']!r} is not supported (MiniMind uses softmax)")
    if f.get("use_moe") and model_type == "qwen3_moe" and raw.get("shared_expert_intermediate_size"):
        raise ConfigError("shared_expert_intermediate_size is set: that is Qwen2-MoE, not a MiniMind model")

    return f


def _as_int(raw: Mapping[str, Any], key: str) -> int:
    return _int(key, raw[key])


def _int(key: str, value: Any) -> int:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not value.is_integer())):  # also refuses inf / nan
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return int(value)


def _float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def _bool(key: str, value: Any) -> bool:
    # Not bool(value): bool("false") is True.
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


_TYPED = {int: _int, float: _float, bool: _bool, str: _str}


# ---------------------------------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # Published models (parameter counts checked in tests/test_config.py).
    "minimind3": dict(generation="minimind3", hidden_size=768, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4),
    "minimind3-moe": dict(generation="minimind3", hidden_size=768, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=4, use_moe=True, num_experts=4, num_experts_per_tok=1),
    "minimind2-small": dict(generation="minimind2", hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=2),
    "minimind2": dict(generation="minimind2", hidden_size=768, num_hidden_layers=16, num_attention_heads=8,
                      num_key_value_heads=2),
    "minimind2-moe": dict(generation="minimind2", hidden_size=640, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=2, use_moe=True, num_experts=4, num_experts_per_tok=2,
                          n_shared_experts=1),
    # Tiny models for tests and the CPU demo (vocab 6400 so the MiniMind tokenizer fits).
    "tiny3": dict(generation="minimind3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512),
    "tiny3-moe": dict(generation="minimind3", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512, use_moe=True,
                      num_experts=4, num_experts_per_tok=2),
    "tiny2": dict(generation="minimind2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    "tiny2-moe": dict(generation="minimind2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, use_moe=True, num_experts=4,
                      num_experts_per_tok=2, n_shared_experts=1),
}


def param_count(config: ModelConfig) -> tuple[int, int]:
    """(total, active) parameter counts, computed from the config alone.

    ``active`` counts the parameters one token uses: the router, the top-k routed experts and the
    shared experts of each MoE layer (and everything outside the MLPs). Equal to ``total`` for Dense.
    """
    h, d = config.hidden_size, config.head_dim
    attn = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    if config.qk_norm:
        attn += 2 * d
    norms = 2 * h
    if config.use_moe:
        expert = 3 * h * config.moe_intermediate_size
        router = h * config.num_experts
        mlp_total = expert * (config.num_experts + config.n_shared_experts) + router
        mlp_active = expert * (config.num_experts_per_tok + config.n_shared_experts) + router
    else:
        mlp_total = mlp_active = 3 * h * config.intermediate_size
    outside = config.vocab_size * h + h  # embedding + final norm
    if not config.tie_word_embeddings:
        outside += config.vocab_size * h
    layers = config.num_hidden_layers
    return (outside + layers * (attn + norms + mlp_total), outside + layers * (attn + norms + mlp_active))
