"""What each stage trains, what it keeps frozen and what it writes at the end: the one place where the
training loop's behaviour differs by stage (the loss side of a stage is ``training/stages.py``).

``models_for(cfg)`` gives the stage's class; the loop asks it whether the stage needs trained weights to start
from, builds it once the model config is known, and then calls the same methods for every stage:

* ``fresh(base)`` -> ``(params, frozen)`` host trees of a new run (``params=None``: MiniMind's random init);
* ``shapes()`` -> ``(params, frozen)`` shapes, to restore a saved run without initialising it;
* ``shardings(model_sharding, mesh)`` -> ``(params, frozen)`` shardings (``params=None``: replicated);
* ``meta()`` -> what the run's checkpoint metadata records about the extra models;
* ``optimizer(total_steps)`` -> ``(tx, schedule)`` for the trained params (AdamW with the run's settings; a
  stage with several trained parts may give each its own learning rate);
* ``export(run_dir, params, frozen, step)`` -> writes the run's result, returns the params the sample runs.

Stages: pretrain / sft / reason train the model alone; ``dpo``, ``grpo`` and ``agent`` keep a frozen
reference (a copy of the initial weights); ``ppo`` trains the policy and a critic over the frozen reference;
``reward`` trains the model with a scalar head; ``lora`` trains
adapters over the frozen base; ``distill`` keeps the frozen teacher.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import optax

import convert
from minimind_jax import lora
from minimind_jax import sharding as shd
from minimind_jax import weights
from minimind_jax.checkpoint import save_checkpoint
from minimind_jax.config import ModelConfig, param_count
from minimind_jax.model.transformer import init_params
from minimind_jax.precision import get_policy, skip_nonfinite
from minimind_jax.rl import ppo, reward_model
from minimind_jax.training.config import TrainConfig, TrainConfigError
from minimind_jax.training.metrics import log
from minimind_jax.training.step import adamw_chain, make_optimizer


def weights_call(fn, *args, **kwargs):
    """``fn`` of ``minimind_jax.weights``, its errors as configuration errors."""
    try:
        return fn(*args, **kwargs)
    except weights.WeightsError as e:
        raise TrainConfigError(str(e)) from None


def model_shapes(model_cfg: ModelConfig, policy):
    return jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0), policy))


class StageModels:
    """pretrain, sft, reason: the model is trained, nothing is frozen; the result is ``<run>/weights``."""

    needs_init = False  # starts from trained weights (--from_weight / --init), as MiniMind's LoRA and DPO do
    frozen_name = "frozen"

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, policy, *, resuming: bool = False):
        self.cfg, self.model_cfg, self.policy = cfg, model_cfg, policy
        self.teacher_cfg = None  # the distillation teacher's model config (the stage's loss runs it)

    def fresh(self, base):
        return base, None

    def shapes(self):
        return model_shapes(self.model_cfg, self.policy), None

    def shardings(self, model_sharding, mesh):
        return model_sharding, None

    def meta(self) -> dict:
        return {}

    def optimizer(self, total_steps: int):
        cfg = self.cfg
        return make_optimizer(cfg.learning_rate, total_steps, schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps,
                              weight_decay=cfg.weight_decay, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                              grad_clip=cfg.grad_clip)

    def export(self, run_dir: Path, params, frozen: Callable, step: int):
        """Write the trained params (host arrays); ``frozen()`` gathers the frozen ones. Returns the sample's params."""
        export_weights(run_dir, params, self.model_cfg, self.cfg.stage, step)
        return params


class WithReference(StageModels):
    """dpo, grpo, agent: a frozen reference, a copy of the initial weights, sharded like the model."""

    needs_init = True
    frozen_name = "reference"

    def fresh(self, base):
        return base, jax.tree.map(np.array, base)

    def shapes(self):
        model = model_shapes(self.model_cfg, self.policy)
        return model, model

    def shardings(self, model_sharding, mesh):
        return model_sharding, model_sharding


class Lora(StageModels):
    """lora: adapters trained (small, replicated), the base model frozen; the result is ``<run>/adapter``."""

    needs_init = True
    frozen_name = "base model"

    def __init__(self, cfg, model_cfg, policy, *, resuming=False):
        super().__init__(cfg, model_cfg, policy, resuming=resuming)
        self.lora_cfg = lora.LoraConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        try:
            lora.target_paths(model_cfg, cfg.lora_targets)
        except lora.LoraError as e:
            raise TrainConfigError(str(e)) from None

    def fresh(self, base):
        return self._adapters(), base

    def _adapters(self):
        cfg = self.cfg
        if not cfg.lora_init:
            return lora.init_adapters(self.model_cfg, self.lora_cfg, seed=cfg.seed)
        try:
            adapters, loaded = lora.load_adapters(cfg.lora_init, self.model_cfg, alpha=cfg.lora_alpha)
        except lora.LoraError as e:
            raise TrainConfigError(f"--lora_init: {e}") from None
        if loaded.rank != cfg.lora_rank:
            raise TrainConfigError(f"--lora_init {cfg.lora_init}: rank {loaded.rank}, but --lora_rank is "
                                   f"{cfg.lora_rank}")
        log(f"adapters: {cfg.lora_init}")
        return adapters

    def shapes(self):
        adapters = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                lora.init_adapters(self.model_cfg, self.lora_cfg, seed=0))
        return adapters, model_shapes(self.model_cfg, self.policy)

    def shardings(self, model_sharding, mesh):
        return None, model_sharding

    def meta(self):
        return {"lora": self.lora_cfg.to_dict()}

    def export(self, run_dir, params, frozen, step):
        if jax.process_index() == 0:
            self._save_adapters(run_dir, params, step)
        return lora.merge(frozen(), params, self.lora_cfg.scale)  # the sample runs the adapted model

    def _save_adapters(self, run_dir, adapters, step):
        """The adapters alone (small) in ``<run>/adapter/``, with MiniMind's float16 .pth when torch is there."""
        cfg, model_cfg = self.cfg, self.model_cfg
        pth = None
        if importlib.util.find_spec("torch") is not None:
            pth = f"{cfg.lora_name}_{model_cfg.hidden_size}{'_moe' if model_cfg.use_moe else ''}.pth"
        out = lora.save_adapters(run_dir / "adapter", adapters, model_cfg, self.lora_cfg, pth=pth,
                                 source={"stage": "lora", "step": step, "base": cfg.init or cfg.from_weight})
        log(f"adapter: {out} ({lora.count_params(adapters):,} params{', MiniMind .pth: ' + pth if pth else ''}); "
            f"merge with: python scripts/merge_lora.py --base BASE --adapter {out} --out OUT")


class Distill(StageModels):
    """distill: the frozen teacher (``--teacher``), stored in its policy's compute dtype, sharded as its model."""

    frozen_name = "teacher"

    def __init__(self, cfg, model_cfg, policy, *, resuming=False):
        super().__init__(cfg, model_cfg, policy, resuming=resuming)
        self.teacher_cfg, self.teacher_params = load_teacher(cfg, model_cfg, keep=not resuming)

    def fresh(self, base):
        if base is None:
            base = jax.tree.map(np.asarray, init_params(self.model_cfg, jax.random.key(self.cfg.seed), self.policy))
        teacher, self.teacher_params = self.teacher_params, None
        return base, teacher

    def shapes(self):
        dtype = get_policy(self.cfg.teacher_policy).compute_dtype
        teacher = jax.eval_shape(lambda: init_params(self.teacher_cfg, jax.random.key(0), "fp32"))
        return (model_shapes(self.model_cfg, self.policy),
                jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), teacher))

    def shardings(self, model_sharding, mesh):
        return model_sharding, shd.param_shardings(self.teacher_cfg, mesh)

    def meta(self):
        return {"teacher": {"path": self.cfg.teacher, "model": dataclasses.asdict(self.teacher_cfg),
                            "policy": self.cfg.teacher_policy}}


class RewardHead(StageModels):
    """reward: the model plus a scalar head, both trained; the result is ``<run>/reward_model`` (the backbone as a
    checkpoint, the head in its manifest; see :mod:`minimind_jax.rl.reward_model`)."""

    needs_init = True

    def fresh(self, base):
        return {"model": base, "head": reward_model.init_head(self.model_cfg.hidden_size)}, None

    def shapes(self):
        head = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            reward_model.init_head(self.model_cfg.hidden_size))
        return {"model": model_shapes(self.model_cfg, self.policy), "head": head}, None

    def shardings(self, model_sharding, mesh):
        return {"model": model_sharding, "head": {"kernel": shd.replicated(mesh), "bias": shd.replicated(mesh)}}, None

    def export(self, run_dir, params, frozen, step):
        if jax.process_index() == 0:
            out = reward_model.save(run_dir / "reward_model", params, self.model_cfg, step=step)
            log(f"reward model: {out} (use it with --stage grpo rewards='{{reward_model: 1}}' "
                f"--reward_model {out})")
        return params["model"]


class PPOModels(WithReference):
    """ppo: the policy and a critic (the backbone + a value head, :mod:`minimind_jax.rl.ppo`) trained, each from
    the starting weights, the reference (a copy of them) frozen. Each part has its AdamW and its global-norm
    clip, as MiniMind's two optimizers; the result is ``<run>/weights`` (the policy) and ``<run>/critic`` (the
    critic in the reward model's layout)."""

    def fresh(self, base):
        head = ppo.init_value_head(self.model_cfg.hidden_size, self.cfg.seed)
        return ({"policy": base, "critic": {"model": jax.tree.map(np.array, base), "head": head}},
                jax.tree.map(np.array, base))

    def shapes(self):
        model = model_shapes(self.model_cfg, self.policy)
        head = {"kernel": jax.ShapeDtypeStruct((self.model_cfg.hidden_size,), np.float32),
                "bias": jax.ShapeDtypeStruct((), np.float32)}
        return {"policy": model, "critic": {"model": model, "head": head}}, model

    def shardings(self, model_sharding, mesh):
        head = {"kernel": shd.replicated(mesh), "bias": shd.replicated(mesh)}
        return {"policy": model_sharding, "critic": {"model": model_sharding, "head": head}}, model_sharding

    def optimizer(self, total_steps: int):
        """Actor at ``learning_rate``, critic at ``critic_learning_rate``, both on the run's schedule over
        ``total_steps x ppo_update_iters`` updates (MiniMind's ``T_max``); returns the actor's schedule."""
        cfg = self.cfg
        updates = total_steps * cfg.ppo_update_iters
        kw = dict(schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
                  b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps, grad_clip=cfg.grad_clip)
        actor, schedule = adamw_chain(cfg.learning_rate, updates, **kw)
        critic, _ = adamw_chain(cfg.critic_learning_rate, updates, **kw)
        shapes = self.shapes()[0]
        labels = {part: jax.tree.map(lambda _, part=part: part, shapes[part]) for part in ("policy", "critic")}
        return skip_nonfinite(optax.multi_transform({"policy": actor, "critic": critic}, labels)), schedule

    def export(self, run_dir, params, frozen, step):
        export_weights(run_dir, params["policy"], self.model_cfg, self.cfg.stage, step)
        if jax.process_index() == 0:
            out = reward_model.save(run_dir / "critic", params["critic"], self.model_cfg, step=step)
            log(f"critic: {out} (the backbone + value head, readable as a --reward_model)")
        return params["policy"]


MODELS: dict[str, type[StageModels]] = {"pretrain": StageModels, "sft": StageModels, "reason": StageModels,
                                        "dpo": WithReference, "lora": Lora, "distill": Distill,
                                        "grpo": WithReference, "agent": WithReference, "reward": RewardHead,
                                        "ppo": PPOModels}


def models_for(stage: str) -> type[StageModels]:
    if stage not in MODELS:
        raise TrainConfigError(f"stage: no models description for stage {stage!r}")
    return MODELS[stage]


def load_teacher(cfg: TrainConfig, student_cfg: ModelConfig, keep: bool = True):
    """The distillation teacher: (config, params in the teacher policy's storage dtype, or None if not ``keep``)."""
    path = cfg.teacher
    teacher_cfg, params = weights_call(weights.load, path, what="--teacher")
    if teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise TrainConfigError(f"--teacher {path}: vocab_size {teacher_cfg.vocab_size} differs from the student's "
                               f"{student_cfg.vocab_size}; teacher and student must share the tokenizer")
    tpol = get_policy(cfg.teacher_policy)
    # every teacher weight is cast to the compute dtype where it is used: storing it so gives the same logits
    # with half the memory under bf16
    store = np.dtype(tpol.compute_dtype)
    log(f"teacher: {path} ({param_count(teacher_cfg)[0] / 1e6:.2f}M params, {teacher_cfg.generation}"
        f"{' MoE' if teacher_cfg.use_moe else ''}), policy {tpol.name}, stored as {store.name}")
    if not keep:
        return teacher_cfg, None
    return teacher_cfg, weights.cast(params, store)


def export_weights(run_dir: Path, params, model_cfg: ModelConfig, stage: str, step: int) -> None:
    out = run_dir / "weights"
    if jax.process_count() > 1:
        # this project's checkpoint writer is single-process (orbax would wait for the other hosts): process 0
        # writes MiniMind's safetensors layout instead, which --init, --from_weight and the converter read
        if jax.process_index() == 0:
            convert.save_torch(params, model_cfg, out, format="minimind", dtype="float32", force=True)
            log(f"weights: {out} (MiniMind safetensors layout)")
        return
    if jax.process_index() == 0:
        save_checkpoint(out, params, model_cfg, source={"stage": stage, "step": step}, force=True)
        log(f"weights: {out} (export with: python -m convert to-torch {out} OUT)")
