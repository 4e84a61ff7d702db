"""Training configuration: one typed ``TrainConfig`` filled from YAML files and the command line.

Resolution order (later wins)::

    TrainConfig defaults  ->  configs/<stage>.yaml  ->  --config FILE(s)  ->  flags  ->  key=value overrides

The stage comes from ``--stage`` or from the config files. Without ``--stage`` and without ``--config``,
``scripts/train.py`` runs ``configs/quickstart.yaml`` (a small model on the bundled sample data; other flags
still apply on top of it).

MiniMind's flags keep their names and meaning (``--epochs --batch_size --learning_rate --accumulation_steps
--grad_clip --max_seq_len --hidden_size --num_hidden_layers --use_moe --data_path --from_weight --from_resume
--save_interval --log_interval --dtype``); the model's fields can also be set as ``model.<field>=value``.
Everything is validated before anything compiles: an unknown key or a bad value is a ``TrainConfigError``
naming the file or flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from minimind_jax.config import PRESETS, ConfigError, ModelConfig
from minimind_jax.rl.rewards import REWARDS

REPO_ROOT = Path(__file__).resolve().parents[2]
# configs/ sits at the top of a source checkout; an installed wheel carries it as data files
# (pyproject.toml [tool.setuptools.data-files]) under <prefix>/share/minimind-jax/configs
INSTALLED_CONFIG_DIR = Path(sysconfig.get_path("data")) / "share" / "minimind-jax" / "configs"
CONFIG_DIR = REPO_ROOT / "configs" if (REPO_ROOT / "configs").is_dir() else INSTALLED_CONFIG_DIR
QUICKSTART = CONFIG_DIR / "quickstart.yaml"
STAGES = ("pretrain", "sft", "lora", "dpo", "distill", "reason", "grpo", "agent", "reward", "ppo")
RL_STAGES = ("grpo", "agent", "ppo")  # stages that learn from their own rollouts (max_seq_len: the prompt's limit)
LOSS_TYPES = ("grpo", "cispo")
LORA_TARGET_HELP = "minimind (every square projection, MiniMind's rule) or a comma list of q_proj k_proj v_proj o_proj gate_proj up_proj down_proj attention mlp experts all"
DTYPES = ("float32", "bfloat16", "float16")
POLICIES = ("fp32", "bf16", "fp16", "bf16-params")
LOSS_SCALES = ("auto", "none", "static", "dynamic")
SCHEDULES = ("minimind", "constant")


class TrainConfigError(ValueError):
    pass


@dataclasses.dataclass
class TrainConfig:
    """Every training setting, documented next to its default (MiniMind's where it has one)."""

    # --- what to train
    stage: str = "pretrain"  # pretrain | sft | lora | dpo | distill | reason | grpo | agent | reward | ppo
    data_path: list[str] = dataclasses.field(default_factory=lambda: ["data/sample/pretrain.jsonl"])
    preset: str = "minimind3"  # a ModelConfig preset; `model` overrides its fields
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    model_config: str | None = None  # a config.json / YAML with the model's fields (instead of preset)
    init: str | None = None  # start from weights: this project's checkpoint or anything the converter reads
    from_weight: str = "none"  # MiniMind's flag: a previous stage's name (e.g. pretrain) or a path
    from_resume: int = 0  # 1: continue the run in out_dir from its latest checkpoint (full state)
    # --- where
    out_dir: str = "out"
    run_name: str | None = None  # default: {stage}_{hidden_size}[_moe], MiniMind's file naming
    overwrite: bool = False  # replace a finished or stopped run in the same directory (else: an error)
    tokenizer: str | None = None  # default: the shipped MiniMind tokenizer
    # --- how long
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; stops earlier than `epochs` when set
    # --- optimisation (MiniMind: AdamW, lr * (0.1 + 0.45 * (1 + cos(pi * step / total))))
    batch_size: int = 32  # per optimizer micro-batch, global (all devices)
    accumulation_steps: int = 8
    learning_rate: float = 5e-4
    lr_schedule: str = "minimind"  # minimind | constant
    warmup_steps: int = 0
    weight_decay: float = 0.01  # torch AdamW's default, which MiniMind uses
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    max_seq_len: int = 340
    # --- precision and parallelism
    dtype: str = "bfloat16"  # MiniMind's flag: float32 | bfloat16 | float16 -> policy fp32 | bf16 | fp16
    policy: str | None = None  # fp32 | bf16 | fp16 | bf16-params (wins over dtype)
    loss_scale: str = "auto"  # auto (dynamic for fp16, none otherwise) | none | static | dynamic
    max_skipped_steps: int = 20  # stop (exit 1) after this many skipped non-finite steps in a row; 0: never
    mesh: str | None = None  # e.g. data=4,fsdp=2 ; default: every device on `data`
    coordinator: str | None = None  # multi-host: host:port of process 0 (else auto-detected launchers)
    num_processes: int | None = None
    process_id: int | None = None
    # --- data
    seed: int = 42
    shuffle: bool = True
    skip_bad_lines: bool = False
    add_system_prompt_prob: float = 0.0
    drop_empty_think_prob: float = 0.0
    # packed rows (pretrain data prepared with --pack): a token attends only to its own document, RoPE positions
    # restarting per document, so each document trains exactly as it does unpacked (MiniMind trains one document
    # per row); false: causal attention over the whole row (cheaper with cuDNN: no mask tensor)
    document_mask: bool = True
    # batches the loop reads ahead in a background thread (and, for stages that need no rollout first, already
    # places on the devices) while the current step runs; 0: read each batch when its step needs it
    prefetch_batches: int = 2
    # grain worker processes that read, render and tokenise the batches (MiniMind's --num_workers); 0: the read-ahead
    # thread does it. The batches are the same for any number; a run resumes with the number it was saved with
    num_workers: int = 0
    # --- checkpoints and logging
    save_interval: int = 1000  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    log_interval: int = 100
    progress: bool = True  # the progress bar (off: one log line every log_interval)
    tensorboard: bool = True
    plot: bool = True
    peak_tflops: float | None = None  # per device, for MFU; default: the published figure of known GPUs, else no MFU
    sample_prompt: str | None = None  # greedy sample printed at the end ("" to skip)
    sample_tokens: int = 40
    # --- post-training stages (MiniMind's defaults; configs/<stage>.yaml sets each stage's own)
    lora_rank: int = 16  # lora: adapter rank r (MiniMind: 16)
    lora_alpha: float | None = None  # lora: scale alpha / r; None: alpha = r, i.e. no scaling (MiniMind)
    lora_targets: str = "minimind"  # lora: minimind (every square projection) | comma list (see lora.py)
    lora_name: str = "lora_identity"  # lora: MiniMind's adapter file name, {lora_name}_{hidden_size}.pth
    lora_init: str | None = None  # lora: start from an adapter (this project's adapter dir or MiniMind .pth)
    dpo_beta: float = 0.15  # dpo: beta of -log sigmoid(beta * margin) (MiniMind: 0.15); flag --beta too
    teacher: str | None = None  # distill: teacher weights (this project's checkpoint or converter input)
    teacher_policy: str = "bf16"  # distill: the teacher's precision policy (no gradients either way)
    distill_alpha: float = 0.5  # distill: alpha * CE + (1 - alpha) * T^2 * KL (MiniMind: 0.5); flag --alpha
    distill_temperature: float = 1.5  # distill: T (MiniMind: 1.5); flag --temperature
    special_token_weight: float = 10.0  # reason: loss weight of <think> </think> <answer> </answer> tokens
    # --- reinforcement learning (grpo, agent; MiniMind-3's train_grpo.py defaults; max_seq_len is the prompt's
    # limit)
    num_generations: int = 6  # rollouts per prompt: the group whose rewards give each other's advantages
    max_gen_len: int = 1024  # new tokens per rollout (agent: per turn)
    loss_type: str = "cispo"  # grpo (clipped ratio) | cispo (MiniMind's default: weight min(ratio, eps_high))
    kl_beta: float = 0.1  # weight of the k3 KL to the frozen reference (flag --beta in RL stages)
    clip_epsilon: float = 0.2  # grpo: ratio clipped to [1 - eps, 1 + eps]
    clip_epsilon_high: float = 5.0  # cispo: the stopped weight min(ratio, eps_high)
    rollout_temperature: float = 0.8
    rollout_top_k: int = 50
    rollout_top_p: float = 0.85
    thinking_ratio: float = 0.9  # the share of prompts rendered with thinking opened
    # grpo: reward name -> weight: minimind (length / thinking / repetition shaping), exact, numeric (against
    # the record's gt), think_format, reward_model (the score of `reward_model`); e.g.
    # rewards='{numeric: 1, minimind: 0.5}' (agent: MiniMind's trajectory reward)
    rewards: dict[str, float] = dataclasses.field(default_factory=lambda: {"minimind": 1.0})
    # the `reward_model` reward's model: a directory written by --stage reward (its <run>/reward_model) or a
    # Hugging Face sequence-classification / reward model directory (config.json; needs the torch extra)
    reward_model: str | None = None
    agent_max_turns: int = 3  # agent: generation turns per trajectory (tool results between them)
    agent_max_total_tokens: int = 2500  # agent: tokens of a whole trajectory (generated + tool turns)
    # --- ppo (MiniMind-3's train_ppo.py defaults; one rollout per prompt, rewards as in grpo, clip_epsilon 0.2)
    critic_learning_rate: float = 5e-7  # the critic's lr (learning_rate is the actor's), same schedule
    ppo_update_iters: int = 2  # update passes over each rollout batch inside one train step
    early_stop_kl: float = 0.25  # a pass whose mean(0.5 log_ratio^2) exceeds this, and the later ones, do not update
    kl_coef: float = 0.02  # weight of the k3 KL to the frozen reference in the policy loss (flag --beta in ppo)
    vf_coef: float = 0.5  # weight of the value loss
    cliprange_value: float = 0.2  # the value loss's clip of the new values around the old ones
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda

    # ------------------------------------------------------------------------------------------------ derived
    @property
    def policy_name(self) -> str:
        if self.policy:
            return self.policy
        return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[self.dtype]

    def validate(self, where: str = "the training config") -> None:
        """Every setting checked before anything runs; the first bad one is a TrainConfigError naming it."""
        def bad(key, msg):
            raise TrainConfigError(f"{where}: {key}: {msg}")

        for check in (self._check_choices, self._check_numbers, self._check_paths, self._check_stage_settings,
                      self._check_model):
            check(bad)

    def _check_choices(self, bad) -> None:
        """Settings that name one of a fixed set."""
        if self.stage not in STAGES:
            bad("stage", f"unknown stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        if self.dtype not in DTYPES:
            bad("dtype", f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.policy is not None and self.policy not in POLICIES:
            bad("policy", f"{self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.policy_name == "bf16-params":
            bad("policy", "bf16-params stores params in bfloat16, which is for inference; train with bf16")
        if self.loss_scale not in LOSS_SCALES:
            bad("loss_scale", f"{self.loss_scale!r} is not one of {', '.join(LOSS_SCALES)}")
        if self.lr_schedule not in SCHEDULES:
            bad("lr_schedule", f"{self.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.loss_type not in LOSS_TYPES:
            bad("loss_type", f"{self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")

    def _check_numbers(self, bad) -> None:
        """Counts, rates and optimizer numbers."""
        for key in ("epochs", "batch_size", "accumulation_steps", "max_seq_len", "save_interval", "log_interval",
                    "keep_checkpoints"):
            if int(getattr(self, key)) < 1:
                bad(key, f"must be positive, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", f"must be positive, got {self.max_steps}")
        if self.from_resume not in (0, 1):
            bad("from_resume", f"must be 0 or 1, got {self.from_resume}")
        for key in ("learning_rate", "grad_clip", "weight_decay", "adam_b1", "adam_b2", "adam_eps", "dpo_beta",
                    "distill_alpha", "distill_temperature", "special_token_weight"):
            value = getattr(self, key, 0.0)
            if not math.isfinite(value):
                bad(key, f"must be a finite number, got {value}")
        if self.learning_rate <= 0:
            bad("learning_rate", f"must be positive, got {self.learning_rate}")
        if self.grad_clip < 0:
            bad("grad_clip", f"must be >= 0, got {self.grad_clip}")
        for key in ("warmup_steps", "max_skipped_steps", "prefetch_batches", "num_workers"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")

    def _check_paths(self, bad) -> None:
        """Data files and the output directory."""
        if not self.data_path:
            bad("data_path", "no data file given")
        blocker = _non_directory_on(self.out_dir)
        if blocker is not None:
            bad("out_dir", f"{self.out_dir!r} cannot be a run directory: {str(blocker)!r} is an existing "
                           "file, not a directory; pick another --out_dir")

    def _check_stage_settings(self, bad) -> None:
        """LoRA, DPO, distillation and reasoning settings."""
        if self.lora_rank < 1:
            bad("lora_rank", f"must be positive, got {self.lora_rank}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            bad("lora_alpha", f"must be positive, got {self.lora_alpha}")
        if not self.lora_targets.strip():
            bad("lora_targets", f"empty; give {LORA_TARGET_HELP}")
        if self.dpo_beta <= 0:
            bad("dpo_beta", f"must be positive, got {self.dpo_beta}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            bad("distill_alpha", f"must be in [0, 1], got {self.distill_alpha}")
        if self.distill_temperature <= 0:
            bad("distill_temperature", f"must be positive, got {self.distill_temperature}")
        if self.teacher_policy not in POLICIES:
            bad("teacher_policy", f"{self.teacher_policy!r} is not one of {', '.join(POLICIES)}")
        if self.special_token_weight <= 0:
            bad("special_token_weight", f"must be positive, got {self.special_token_weight}")
        if self.stage == "distill" and not self.teacher:
            bad("teacher", "--stage distill needs a teacher: --teacher CHECKPOINT (any weights --init reads)")
        self._check_rl_settings(bad)

    def _check_rl_settings(self, bad) -> None:
        """Rollout, reward and RL loss settings."""
        for key in ("num_generations", "max_gen_len", "agent_max_turns", "agent_max_total_tokens"):
            if getattr(self, key) < 1:
                bad(key, f"must be positive, got {getattr(self, key)}")
        if self.stage in ("grpo", "agent") and self.num_generations < 2:
            bad("num_generations", "must be >= 2: advantages compare the rollouts of a prompt with each other")
        for key in ("kl_beta", "clip_epsilon", "clip_epsilon_high", "rollout_temperature", "rollout_top_k"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                bad(key, f"must be a finite number >= 0, got {value}")
        if self.ppo_update_iters < 1:
            bad("ppo_update_iters", f"must be positive, got {self.ppo_update_iters}")
        for key in ("critic_learning_rate", "early_stop_kl", "kl_coef", "vf_coef", "cliprange_value", "gamma", "lam"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                bad(key, f"must be a finite number >= 0, got {value}")
        if not 0.0 < self.rollout_top_p <= 1.0:
            bad("rollout_top_p", f"must be in (0, 1], got {self.rollout_top_p}")
        if not 0.0 <= self.thinking_ratio <= 1.0:
            bad("thinking_ratio", f"must be in [0, 1], got {self.thinking_ratio}")
        for name, weight in self.rewards.items():
            if name not in REWARDS and name != "reward_model":
                bad(f"rewards.{name}", f"unknown reward; known: {', '.join(REWARDS)}, reward_model")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                bad(f"rewards.{name}", f"the weight must be a finite number, got {weight!r}")
        if self.stage in ("grpo", "ppo") and not any(self.rewards.values()):
            bad("rewards", "no reward has a non-zero weight")
        if self.rewards.get("reward_model") and not self.reward_model:
            bad("reward_model", "rewards name reward_model: give --reward_model DIR (trained by --stage reward, or a "
                                "Hugging Face sequence-classification model)")

    def _check_model(self, bad) -> None:
        """The weights to start from and the model settings."""
        if self.init and self.from_weight not in ("none", "", None):
            bad("init", "give either --init or --from_weight, not both")
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        for key in self.model:
            if key not in model_fields:
                bad(f"model.{key}", f"not a model field; the fields are {', '.join(sorted(model_fields))}")
        if self.preset not in PRESETS:
            bad("preset", f"unknown preset {self.preset!r}; known presets: {', '.join(sorted(PRESETS))}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _non_directory_on(path: str) -> Path | None:
    """The nearest existing part of ``path`` (itself or a parent) when it is not a directory, else None."""
    current = Path(path)
    while not current.exists():
        if current.parent == current:
            return None
        current = current.parent
    return None if current.is_dir() else current


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, value: Any, where: str) -> Any:
    """A YAML / CLI value -> the type of ``TrainConfig.key`` (strings from the CLI are parsed as YAML)."""
    field = _FIELDS[key]
    typ = str(field.type)
    if isinstance(value, str) and not typ.startswith("str"):
        value = yaml.safe_load(value) if value != "" else None
    if key == "data_path":
        if isinstance(value, str):
            value = [p for p in value.split(",") if p]
        if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
            raise TrainConfigError(f"{where}: data_path: expected a path or a list of paths, got {value!r}")
        return value
    if key == "model":
        if not isinstance(value, dict):
            raise TrainConfigError(f"{where}: model: expected a mapping of model fields, got {value!r}")
        return dict(value)
    if key == "rewards":
        if isinstance(value, str):  # a single reward name
            value = {value: 1.0}
        if not isinstance(value, dict):
            raise TrainConfigError(f"{where}: rewards: expected a mapping of reward name -> weight, got {value!r}")
        return dict(value)
    if value is None:
        if "None" in typ:
            return None
        raise TrainConfigError(f"{where}: {key}: a value is required")
    base = typ.split("|")[0].strip()
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if value in (0, 1):
                return bool(value)
            raise TypeError
        if base == "int":
            if isinstance(value, bool) or not float(value).is_integer():
                raise TypeError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base == "str":
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise TrainConfigError(f"{where}: {key}: expected {base}, got {value!r}") from None
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TrainConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise TrainConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{path}: expected a mapping of settings at the top level")
    return raw


def _apply(values: dict[str, Any], raw: Mapping[str, Any], where: str) -> None:
    for key, value in raw.items():
        if key.startswith("model."):
            values.setdefault("model", {})
            values["model"] = {**values["model"], key[6:]: _model_value(value)}
            continue
        if key not in _FIELDS:
            close = [k for k in _FIELDS if k.startswith(key[:4])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise TrainConfigError(f"{where}: unknown setting {key!r}{hint}")
        value = _coerce(key, value, where)
        if key == "model":
            value = {**values.get("model", {}), **value}
        values[key] = value


def _model_value(value):
    return yaml.safe_load(value) if isinstance(value, str) else value


# MiniMind's model flags map onto model fields
MODEL_FLAGS = {"hidden_size": int, "num_hidden_layers": int, "use_moe": int}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=None if Path(sys.argv[0]).name.startswith("minimind-") else "train.py",
        description="Train a MiniMind model (any stage) with JAX.", allow_abbrev=False,
        epilog="Extra settings: key=value (any TrainConfig key, or model.<field>=value). The defaults shown are "
               "the built-in ones: configs/<stage>.yaml sets each stage's own (MiniMind's) over them, and without "
               "--stage and --config configs/quickstart.yaml is used.")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML config file(s), applied in order over configs/<stage>.yaml")
    for name, field in _FIELDS.items():
        if name in ("model",):
            continue
        flag = f"--{name}"
        p.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                       help=f"(default {field.default if field.default is not dataclasses.MISSING else '...'})")
    for name in MODEL_FLAGS:
        p.add_argument(f"--{name}", dest=f"model.{name}", default=None, metavar=name.upper(),
                       help="model override (MiniMind flag)")
    p.add_argument("--aux_loss_coef", dest="model.router_aux_loss_coef", default=None, help="MoE aux loss weight")
    # MiniMind's names for the post-training hyperparameters
    p.add_argument("--beta", dest="beta", default=None, metavar="BETA",
                   help="DPO beta (= --dpo_beta); in RL stages the KL weight (= --kl_beta; ppo: --kl_coef)")
    p.add_argument("--alpha", dest="distill_alpha", default=None, metavar="ALPHA", help="= --distill_alpha")
    p.add_argument("--temperature", dest="distill_temperature", default=None, metavar="T",
                   help="= --distill_temperature")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def resolve(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse the command line (``argv``) into a validated ``TrainConfig``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "overrides")}
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise TrainConfigError(f"command line: {item!r} is not a key=value setting")
        overrides[key.strip()] = value
    config_files = [Path(c) for c in args.config]
    if not config_files and args.stage is None and "stage" not in overrides:
        config_files = [QUICKSTART]  # no stage and no config file: the quickstart
    file_layers = [(str(f), _read_yaml(f)) for f in config_files]

    stage = flags.get("stage") or overrides.get("stage")
    if stage is None:
        for _, raw in file_layers:
            if "stage" in raw:
                stage = raw["stage"]
        stage = stage or "pretrain"
    if stage not in STAGES:
        raise TrainConfigError(f"command line: stage: unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if "beta" in flags:  # MiniMind's --beta: DPO's beta, or the KL weight of its RL scripts
        flags["kl_coef" if stage == "ppo" else "kl_beta" if stage in RL_STAGES else "dpo_beta"] = flags.pop("beta")

    values: dict[str, Any] = {}
    stage_file = CONFIG_DIR / f"{stage}.yaml"
    if not stage_file.is_file():  # training with the dataclass defaults instead would silently differ from MiniMind
        raise TrainConfigError(f"stage {stage}: its defaults file {stage_file} does not exist (configs/ missing "
                               "from this install?)")
    _apply(values, _read_yaml(stage_file), str(stage_file))
    for where, raw in file_layers:
        _apply(values, raw, where)
    _apply(values, flags, "command line")
    _apply(values, overrides, "command line")
    values["stage"] = stage
    cfg = TrainConfig(**values)
    cfg.validate("command line / config files")
    return cfg


def from_dict(raw: Mapping[str, Any], where: str = "config") -> TrainConfig:
    """A validated ``TrainConfig`` from a mapping (e.g. a test's settings) over the dataclass defaults."""
    values: dict[str, Any] = {}
    _apply(values, raw, where)
    cfg = TrainConfig(**values)
    cfg.validate(where)
    return cfg


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The model to build when not starting from a checkpoint (preset or file, then overrides)."""
    overrides = dict(cfg.model)
    if "use_moe" in overrides:
        overrides["use_moe"] = bool(overrides["use_moe"])
    try:
        if cfg.model_config:
            path = Path(cfg.model_config)
            if path.suffix in (".yaml", ".yml"):
                raw = _read_yaml(path)
                preset = raw.pop("preset", None)
                base = ModelConfig.preset(preset, **raw) if preset else ModelConfig(**raw)
            else:
                base = ModelConfig.from_json(path)
            return base.replace(**overrides) if overrides else base
        return ModelConfig.preset(cfg.preset, **overrides)
    except (ConfigError, TypeError, ValueError, KeyError) as e:
        raise TrainConfigError(f"model config: {e}") from None


def run_name(cfg: TrainConfig, model: ModelConfig) -> str:
    return cfg.run_name or f"{cfg.stage}_{model.hidden_size}{'_moe' if model.use_moe else ''}"


def dump_yaml(cfg: TrainConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
