"""The one training loop every stage runs: ``train(cfg)``.

Order of work (every check that can fail runs before anything compiles):
config -> model config (preset / --init checkpoint / resumed run) -> data files and tokenizer -> mesh ->
train state (fresh, from weights, or restored from the run's latest checkpoint, resharded onto this mesh)
-> jit(train_step) -> loop: host batch -> device -> step -> metrics -> checkpoint every ``save_interval`` ->
final checkpoint, weights export, loss curve, greedy sample.

Run directory ``{out_dir}/{run_name}`` (run_name defaults to MiniMind's ``{stage}_{hidden_size}[_moe]``)::

    state/<step>/        orbax CheckpointManager: full train state, data-iterator state, run metadata
    weights/             this project's checkpoint of the final params (what --init / --from_weight read)
    metrics.jsonl  tb/   loss.png  train_config.yaml
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

import convert
from minimind_jax import lora
from minimind_jax import sharding as shd
from minimind_jax import weights
from minimind_jax.checkpoint import save_checkpoint
from minimind_jax.config import ModelConfig, param_count
from minimind_jax.data import make_dataset
from minimind_jax.generate import greedy_generate
from minimind_jax.model.transformer import init_params
from minimind_jax.precision import get_policy, make_loss_scale
from minimind_jax.tokenizer import load_tokenizer
from minimind_jax.training import config as tconfig
from minimind_jax.training import state_io
from minimind_jax.training.config import TrainConfig, TrainConfigError
from minimind_jax.training.metrics import (
    MetricsLogger,
    flops_per_token,
    stated_peak,
    plot_loss,
)
from minimind_jax.training.stages import build_stage
from minimind_jax.training.step import (
    TrainState,
    abstract_with_shardings,
    init_train_state,
    jit_train_step,
    make_optimizer,
    make_train_step,
    state_shardings,
)

# stages that start from trained weights (MiniMind: LoRA and DPO from the SFT model)
NEEDS_INIT = ("lora", "dpo")


class TrainingError(RuntimeError):
    pass


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    steps: int
    losses: list[float]
    params: Any
    config: ModelConfig
    stopped: str = "done"  # done | interrupted | nonfinite
    sample: str | None = None
    frozen: Any = None  # the frozen params of the run (LoRA base, DPO reference, distillation teacher)
    opt_state: Any = None


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


# ------------------------------------------------------------------------------------------------ the loop
def train(cfg: TrainConfig) -> RunResult:
    """Run one stage as ``cfg`` says. Returns what happened (also written to the run directory)."""
    cfg.validate()
    if shd.maybe_initialize_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id):
        _log(f"distributed: process {jax.process_index()} of {jax.process_count()}")
    policy = get_policy(cfg.policy_name)

    # ---- model config: from the resumed run, the init weights, or the preset
    model_cfg = tconfig.model_config(cfg)
    name = tconfig.run_name(cfg, model_cfg)
    run_dir = Path(cfg.out_dir) / name
    state_dir = run_dir / "state"
    resume_step = None
    manager = None
    if state_dir.is_dir():
        manager = state_io.manager(state_dir, cfg)
        resume_step = manager.latest_step()
    init_params_np = None
    meta_prev = None
    if cfg.from_resume and resume_step is not None:
        meta_prev = state_io.read_meta(manager, resume_step)
        saved_cfg = ModelConfig(**meta_prev["model"])
        overrides = {k: weights.model_value(k, v) for k, v in cfg.model.items()}
        conflicts = [f"{k}={v!r} (run: {getattr(saved_cfg, k)!r})" for k, v in overrides.items()
                     if getattr(saved_cfg, k) != v]
        if conflicts:
            raise TrainConfigError(f"{state_dir}: cannot resume: the run was trained as a different model: "
                                   f"{', '.join(conflicts)}")
        model_cfg = saved_cfg
    else:
        if cfg.from_resume:
            _log(f"--from_resume 1: no checkpoint in {state_dir}, starting a fresh run")
        elif resume_step is not None:
            if not cfg.overwrite:
                raise TrainConfigError(
                    f"{run_dir} already holds a run (checkpoint at step {resume_step}): continue it with "
                    "--from_resume 1, or pick another --out_dir / --run_name, or pass overwrite=true to replace it")
            manager.close()
            manager = None
            shutil.rmtree(state_dir)
            for f in ("metrics.jsonl", "loss.png"):
                (run_dir / f).unlink(missing_ok=True)
            shutil.rmtree(run_dir / "tb", ignore_errors=True)
        init_path = _weights_call(weights.resolve_init, cfg.init, cfg.from_weight, cfg.out_dir, model_cfg)
        if cfg.stage in NEEDS_INIT and not init_path:
            raise TrainConfigError(f"--stage {cfg.stage} starts from trained weights (MiniMind: the SFT model): give "
                                   "--from_weight sft or --init CHECKPOINT")
        if init_path:
            model_cfg, init_params_np = _weights_call(weights.load, init_path, overrides=cfg.model)
            _log(f"weights: {init_path}")

    # ---- the stage's extra models: a distillation teacher, LoRA's adapter settings
    teacher_cfg, teacher_params = None, None
    if cfg.stage == "distill":
        teacher_cfg, teacher_params = _load_teacher(cfg, model_cfg, keep=meta_prev is None)
    lora_cfg = None
    if cfg.stage == "lora":
        lora_cfg = lora.LoraConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        try:
            lora.target_paths(model_cfg, cfg.lora_targets)
        except lora.LoraError as e:
            raise TrainConfigError(str(e)) from None
    stage = build_stage(cfg, model_cfg, policy, teacher_cfg)

    # ---- data and tokenizer (errors name the file before anything compiles)
    for p in cfg.data_path:
        if not os.path.exists(p):
            raise TrainConfigError(f"data_path: {p}: no such file or directory")
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else load_tokenizer()
    if len(tokenizer) > model_cfg.vocab_size:
        raise TrainConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                               f"{model_cfg.vocab_size}")
    nproc = jax.process_count()
    if cfg.batch_size % nproc:
        raise TrainConfigError(f"batch_size {cfg.batch_size} must divide over {nproc} processes")
    mesh = shd.make_mesh(cfg.mesh)
    dp = shd.data_parallel_size(mesh)
    if cfg.batch_size % dp:
        raise TrainConfigError(f"batch_size {cfg.batch_size} must be a multiple of the data-parallel size {dp} "
                               f"(mesh {shd.describe_mesh(mesh)})")
    pipeline = make_dataset(stage.data_stage, cfg.data_path, tokenizer, cfg.max_seq_len, cfg.batch_size // nproc,
                            seed=cfg.seed, epochs=cfg.epochs, shuffle=cfg.shuffle, shard_index=jax.process_index(),
                            shard_count=nproc, skip_bad_lines=cfg.skip_bad_lines,
                            add_system_prompt_prob=cfg.add_system_prompt_prob,
                            drop_empty_think_prob=cfg.drop_empty_think_prob,
                            special_token_weight=cfg.special_token_weight if cfg.stage == "reason" else None)
    batches = len(pipeline)
    if nproc > 1:  # shards may differ by a record: every process must run the same number of steps
        batches = int(np.min(multihost_utils.process_allgather(np.int64(batches))))
    steps_in_data = batches // cfg.accumulation_steps
    if steps_in_data < 1:
        raise TrainConfigError(f"{', '.join(cfg.data_path)}: {batches} batches of {cfg.batch_size} are fewer "
                               f"than one optimizer step ({cfg.accumulation_steps} accumulation steps)")
    total_steps = min(steps_in_data, cfg.max_steps) if cfg.max_steps else steps_in_data

    # ---- state
    tx, schedule = make_optimizer(cfg.learning_rate, total_steps, schedule=cfg.lr_schedule,
                                  warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, b1=cfg.adam_b1,
                                  b2=cfg.adam_b2, eps=cfg.adam_eps, grad_clip=cfg.grad_clip)
    model_sharding = shd.param_shardings(model_cfg, mesh)
    param_sharding, frozen_sharding = model_sharding, None
    if cfg.stage == "lora":  # adapters are small: replicated (their optimizer moments follow them)
        param_sharding = None
    if cfg.stage in ("lora", "dpo"):  # the base model / the reference: sharded like the model
        frozen_sharding = model_sharding
    if cfg.stage == "distill":
        frozen_sharding = shd.param_shardings(teacher_cfg, mesh)
    data_iter = pipeline.iterator()
    start_step = 0
    if meta_prev is not None:
        params_shape, frozen_shape = _state_shapes(cfg, model_cfg, policy, lora_cfg, teacher_cfg)
        if param_sharding is None:
            param_sharding = jax.tree.map(lambda _: shd.replicated(mesh), params_shape)
        abstract, state_sharding = _abstract_state(params_shape, frozen_shape, tx, cfg, policy, mesh, param_sharding,
                                                   frozen_sharding)
        state = state_io.restore(manager, resume_step, abstract, data_iter)
        start_step = int(state.step)
        before = meta_prev.get("mesh", "?")
        now = shd.describe_mesh(mesh)
        note = "" if before == now else f" (saved on {before}; resharded onto {now})"
        _log(f"resumed {state_dir} at step {start_step}{note}")
        if meta_prev.get("total_steps") != total_steps:
            _log(f"note: the run was planned for {meta_prev.get('total_steps')} steps, now {total_steps}")
    else:
        params, frozen = _trainables(cfg, model_cfg, policy, init_params_np, lora_cfg, teacher_params)
        if param_sharding is None:
            param_sharding = jax.tree.map(lambda _: shd.replicated(mesh), params)
        state, state_sharding = init_train_state(model_cfg, tx, seed=cfg.seed, policy=policy,
                                                 loss_scale=cfg.loss_scale, params=params, mesh=mesh,
                                                 param_sharding=param_sharding, frozen=frozen,
                                                 frozen_sharding=frozen_sharding)
        del params, frozen
    del init_params_np, teacher_params

    batch_sharding = shd.batch_sharding(mesh, leading=1)
    step_fn = jit_train_step(make_train_step(stage, model_cfg, policy, tx, schedule), state_sharding,
                             batch_sharding, mesh)

    run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        tconfig.dump_yaml(cfg, run_dir / "train_config.yaml")
    if manager is None:
        manager = state_io.manager(state_dir, cfg)
    meta = {"model": dataclasses.asdict(model_cfg), "train": cfg.to_dict(), "stage": cfg.stage, "policy": policy.name,
            "mesh": shd.describe_mesh(mesh), "devices": jax.device_count(), "total_steps": total_steps}
    if lora_cfg is not None:
        meta["lora"] = lora_cfg.to_dict()
    if teacher_cfg is not None:
        meta["teacher"] = {"path": cfg.teacher, "model": dataclasses.asdict(teacher_cfg), "policy": cfg.teacher_policy}
    logger = MetricsLogger(run_dir, tensorboard=cfg.tensorboard, enabled=jax.process_index() == 0)

    total, active = param_count(model_cfg)
    tokens_per_step = cfg.batch_size * cfg.accumulation_steps * cfg.max_seq_len * stage.sequences_per_example
    fpt = flops_per_token(model_cfg, cfg.max_seq_len)
    peak, peak_text = stated_peak(policy, cfg.peak_tflops)
    _log(f"stage {cfg.stage}: {total / 1e6:.2f}M params ({active / 1e6:.2f}M active), policy {policy}, "
         f"mesh {shd.describe_mesh(mesh)}, {total_steps} steps of {cfg.batch_size}x{cfg.accumulation_steps}x"
         f"{cfg.max_seq_len} tokens, run dir {run_dir}")
    _log(_describe_trainables(cfg, state))
    _log(f"MFU: {peak_text}")

    # ---- loop
    stopped = "done"
    losses: list[float] = []
    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        if interrupted["flag"]:
            raise KeyboardInterrupt
        interrupted["flag"] = True

    old_handler = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    bar = _progress(cfg, total_steps, start_step)
    last_saved = start_step if meta_prev is not None else None
    t_compile = None
    window_t, window_tokens = time.perf_counter(), 0
    step = start_step
    try:
        while step < total_steps:
            batch = _next_batch(data_iter, cfg.accumulation_steps, stage.data_keys or stage.batch_keys)
            host_metrics = {}
            if stage.prepare is not None:
                batch, host_metrics = stage.prepare(batch, state, step)
            device_batch = shd.shard_batch(batch, batch_sharding)
            t0 = time.perf_counter()
            state, metrics = step_fn(state, device_batch)
            metrics = jax.device_get(metrics)
            if t_compile is None:
                t_compile = time.perf_counter() - t0
                window_t = time.perf_counter()
            else:
                window_tokens += tokens_per_step
            step += 1
            loss = float(metrics["loss"])
            if not policy.needs_loss_scaling and not (math.isfinite(loss) and bool(metrics["finite"])):
                # without loss scaling nothing can recover: the update was skipped, so stop here
                stopped = "nonfinite"
                what = f"loss is {loss}" if not math.isfinite(loss) else "gradients are not finite"
                _log(f"\nstep {step}: {what} under the {policy.name} policy; stopping. The last good checkpoint "
                     f"(step {last_saved}) in {state_dir} is intact. Lower --learning_rate, keep --grad_clip, "
                     "or check the data.")
                break
            losses.append(loss)
            elapsed = time.perf_counter() - window_t
            tps = window_tokens / elapsed if window_tokens and elapsed > 0 else float("nan")
            row = {k: float(v) for k, v in metrics.items() if k not in ("finite",)}
            row.update({k: float(v) for k, v in host_metrics.items()})
            row["tokens_per_s"] = tps
            row["tflops_per_device"] = tps * fpt / 1e12 / jax.device_count() if window_tokens else float("nan")
            if peak:
                row["mfu"] = row["tflops_per_device"] / peak
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(_postfix(row), refresh=False)
            logger.log(step, row)  # every step (a few hundred bytes): the curve and TensorBoard see all of them
            if step % cfg.log_interval == 0 or step == total_steps or step == start_step + 1:
                if bar is None:
                    _log(f"step {step}/{total_steps} {_postfix(row)}")
            if step % cfg.save_interval == 0 and step < total_steps:
                state_io.save(manager, step, state, data_iter, {**meta, "step": step})
                last_saved = step
            if interrupted["flag"]:
                stopped = "interrupted"
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        if bar is not None:
            bar.close()

    if stopped != "nonfinite" and last_saved != step:
        state_io.save(manager, step, state, data_iter, {**meta, "step": step}, force=True)
        last_saved = step
    manager.wait_until_finished()
    manager.close()
    logger.close()
    if stopped == "interrupted":
        _log(f"interrupted: saved step {step} to {state_dir}; continue with --from_resume 1")

    result = RunResult(run_dir, step, losses, state.params, model_cfg, stopped, frozen=state.frozen,
                       opt_state=state.opt_state)
    host_params = _to_host(state.params) if stopped == "done" else None  # collective: every process
    if stopped == "done" and cfg.stage == "lora":
        _export_adapters(run_dir, host_params, model_cfg, cfg, lora_cfg, step)
        host_params = lora.merge(_to_host(state.frozen), host_params, lora_cfg.scale)  # the sample runs the adapted model
    elif stopped == "done":
        _export_weights(run_dir, host_params, model_cfg, cfg, step)
    if cfg.plot and jax.process_index() == 0:
        png = plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"{name} ({cfg.stage})")
        if png:
            _log(f"loss curve: {png}")
    if losses:
        head = np.mean(losses[: max(1, min(10, len(losses) // 5))])
        tail = np.mean(losses[-max(1, min(10, len(losses) // 5)):])
        _log(f"loss {head:.3f} -> {tail:.3f} over steps {start_step + 1}..{step}"
             + (f"; first step (compile) {t_compile:.1f} s" if t_compile is not None else ""))
    if stopped == "done" and cfg.sample_prompt != "" and jax.process_index() == 0:
        result.sample = _sample(host_params, model_cfg, policy, tokenizer, cfg)
    if stopped == "nonfinite":
        raise TrainingError(f"training stopped at step {step}: non-finite loss or gradients (last good checkpoint: step "
                            f"{last_saved} in {state_dir})")
    return result


def _abstract_state(params_shape, frozen_shape, tx, cfg, policy, mesh, param_sharding, frozen_sharding):
    """The TrainState's shapes, dtypes and (this mesh's) shardings, for restoring without initialising."""
    kind = cfg.loss_scale if cfg.loss_scale != "auto" else ("dynamic" if policy.needs_loss_scaling else "none")

    def make(params, frozen):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          loss_scale=make_loss_scale(kind), rng=jax.random.key_data(jax.random.key(0)), frozen=frozen)

    shape = jax.eval_shape(make, params_shape, frozen_shape)
    shardings = state_shardings(shape, param_sharding, mesh, tx, frozen_sharding)
    return abstract_with_shardings(shape, shardings), shardings


# ------------------------------------------------------------------------------------------------ stages
def _load_teacher(cfg: TrainConfig, student_cfg: ModelConfig, keep: bool = True):
    """The distillation teacher: (config, params in the teacher policy's storage dtype, or None if not ``keep``)."""
    path = cfg.teacher
    teacher_cfg, params = _weights_call(weights.load, path, what="--teacher")
    if teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise TrainConfigError(f"--teacher {path}: vocab_size {teacher_cfg.vocab_size} differs from the student's "
                               f"{student_cfg.vocab_size}; teacher and student must share the tokenizer")
    tpol = get_policy(cfg.teacher_policy)
    # every teacher weight is cast to the compute dtype where it is used: storing it so gives the same logits
    # with half the memory under bf16
    store = np.dtype(tpol.compute_dtype)
    _log(f"teacher: {path} ({param_count(teacher_cfg)[0] / 1e6:.2f}M params, {teacher_cfg.generation}"
         f"{' MoE' if teacher_cfg.use_moe else ''}), policy {tpol.name}, stored as {store.name}")
    if not keep:
        return teacher_cfg, None
    return teacher_cfg, weights.cast(params, store)


def _weights_call(fn, *args, **kwargs):
    """``fn`` of ``minimind_jax.weights``, its errors as configuration errors."""
    try:
        return fn(*args, **kwargs)
    except weights.WeightsError as e:
        raise TrainConfigError(str(e)) from None


def _trainables(cfg: TrainConfig, model_cfg: ModelConfig, policy, base, lora_cfg, teacher_params):
    """(trained params, frozen params) of a fresh run: host arrays, or params=None for MiniMind's init."""
    if cfg.stage == "lora":
        if cfg.lora_init:
            try:
                adapters, loaded = lora.load_adapters(cfg.lora_init, model_cfg, alpha=cfg.lora_alpha)
            except lora.LoraError as e:
                raise TrainConfigError(f"--lora_init: {e}") from None
            if loaded.rank != cfg.lora_rank:
                raise TrainConfigError(f"--lora_init {cfg.lora_init}: rank {loaded.rank}, but --lora_rank is "
                                       f"{cfg.lora_rank}")
            _log(f"adapters: {cfg.lora_init}")
        else:
            adapters = lora.init_adapters(model_cfg, lora_cfg, seed=cfg.seed)
        return adapters, base
    if cfg.stage == "dpo":
        return base, jax.tree.map(np.array, base)  # the reference: a copy of the initial weights
    if cfg.stage == "distill":
        if base is None:
            base = jax.tree.map(np.asarray, init_params(model_cfg, jax.random.key(cfg.seed),
                                                                                  policy))
        return base, teacher_params
    return base, None


def _state_shapes(cfg: TrainConfig, model_cfg: ModelConfig, policy, lora_cfg, teacher_cfg):
    """(params, frozen) shapes of the run's TrainState, for restoring it."""
    model = jax.eval_shape(lambda: init_params(model_cfg, jax.random.key(0), policy))
    if cfg.stage == "lora":
        adapters = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                lora.init_adapters(model_cfg, lora_cfg, seed=0))
        return adapters, model
    if cfg.stage == "dpo":
        return model, model
    if cfg.stage == "distill":
        dtype = get_policy(cfg.teacher_policy).compute_dtype
        teacher = jax.eval_shape(lambda: init_params(teacher_cfg, jax.random.key(0), "fp32"))
        return model, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), teacher)
    return model, None


def _describe_trainables(cfg: TrainConfig, state: TrainState) -> str:
    def count(tree):
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))

    def nbytes(tree):
        return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))

    text = (f"trained params: {count(state.params):,} ({nbytes(state.params) / 2**20:.2f} MiB); optimizer state "
            f"{nbytes(state.opt_state) / 2**20:.2f} MiB")
    if state.frozen is not None:
        what = {"lora": "base model", "dpo": "reference", "distill": "teacher"}.get(cfg.stage, "frozen")
        text += f"; frozen {what}: {count(state.frozen):,} params ({nbytes(state.frozen) / 2**20:.2f} MiB, no gradients)"
    return text


def _export_adapters(run_dir: Path, adapters, model_cfg: ModelConfig, cfg: TrainConfig, lora_cfg, step: int) -> None:
    """LoRA: the adapters alone (small) in ``<run>/adapter/``, with MiniMind's float16 .pth when torch is there."""

    if jax.process_index() != 0:
        return
    pth = None
    if importlib.util.find_spec("torch") is not None:
        pth = f"{cfg.lora_name}_{model_cfg.hidden_size}{'_moe' if model_cfg.use_moe else ''}.pth"
    base = cfg.init or cfg.from_weight
    out = lora.save_adapters(run_dir / "adapter", adapters, model_cfg, lora_cfg, pth=pth,
                        source={"stage": "lora", "step": step, "base": base})
    _log(f"adapter: {out} ({lora.count_params(adapters):,} params{', MiniMind .pth: ' + pth if pth else ''}); merge with: "
         f"python scripts/merge_lora.py --base BASE --adapter {out} --out OUT")


def _next_batch(it, accum: int, keys) -> dict[str, np.ndarray]:
    micro = [next(it) for _ in range(accum)]
    return {k: np.stack([m[k] for m in micro]) for k in keys}


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _progress(cfg: TrainConfig, total: int, initial: int):
    if not cfg.progress or jax.process_index() != 0:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                desc=cfg.stage, mininterval=0.5)


def _postfix(row: dict) -> str:
    parts = [f"loss {row['loss']:.4f}"]
    if row.get("aux_loss"):
        parts.append(f"aux {row['aux_loss']:.4f}")
    if "lr" in row:
        parts.append(f"lr {row['lr']:.2e}")
    if math.isfinite(row.get("tokens_per_s", float("nan"))):
        parts.append(f"{row['tokens_per_s']:.0f} tok/s")
    if "mfu" in row and math.isfinite(row["mfu"]):
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
    if row.get("skipped"):
        parts.append(f"skipped {int(row['skipped'])}")
    if row.get("loss_scale", 1.0) != 1.0:
        parts.append(f"scale {row['loss_scale']:.0f}")
    return ", ".join(parts)


def _export_weights(run_dir: Path, params, model_cfg: ModelConfig, cfg: TrainConfig, step: int) -> None:
    out = run_dir / "weights"
    if jax.process_count() > 1:
        # this project's checkpoint writer is single-process (orbax would wait for the other hosts): process 0
        # writes MiniMind's safetensors layout instead, which --init, --from_weight and the converter read
        if jax.process_index() == 0:
            convert.save_torch(params, model_cfg, out, format="minimind", dtype="float32", force=True)
            _log(f"weights: {out} (MiniMind safetensors layout)")
        return
    if jax.process_index() == 0:
        save_checkpoint(out, params, model_cfg, source={"stage": cfg.stage, "step": step}, force=True)
        _log(f"weights: {out} (export with: python -m convert to-torch {out} OUT)")


def _to_host(tree):
    """Full numpy copies of (possibly sharded, possibly multi-host) arrays."""
    if jax.process_count() > 1:
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _sample(params, model_cfg: ModelConfig, policy, tokenizer, cfg: TrainConfig) -> str:
    prompt = cfg.sample_prompt
    if prompt is None:
        prompt = "你好" if cfg.stage == "pretrain" else None
    if cfg.stage == "pretrain":
        ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
    else:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt or "你好"}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        prompt = prompt or "你好"
    new = greedy_generate(jax.tree.map(jnp.asarray, params), model_cfg, ids, cfg.sample_tokens, policy="fp32" if policy.name == "fp32" else "bf16",
                          eos_id=tokenizer.eos_token_id)
    text = tokenizer.decode(new, skip_special_tokens=True)
    _log(f"sample (greedy) {prompt!r} -> {text!r}")
    return text
