"""The one training loop every stage runs: ``train(cfg) = finish(run(setup(cfg)))``.

* ``setup(cfg) -> Run``: every check that can fail runs before anything compiles or is deleted: config ->
  model config (preset / --init checkpoint / resumed run) -> the stage's extra models -> tokenizer and data
  files -> mesh -> (only then) the old run replaced if ``overwrite`` -> train state (fresh, from weights, or
  restored from the run's latest checkpoint, resharded onto this mesh) -> jit(train_step).
* ``run(run) -> RunResult``: a background thread reads the next ``prefetch_batches`` batches and puts them on
  the devices (``training/prefetch.py``); the loop dispatches steps and reads their metrics back only every
  ``log_interval`` steps (and before a save, at the end, at a stop), checking every step; a checkpoint every
  ``save_interval`` steps (holding the data position after exactly the batches consumed) and a final one;
  SIGINT / SIGTERM stop after the current step and save; any other exception waits for the checkpoint being
  written before it propagates, so the last complete checkpoint survives.
* ``finish(run, result)``: the stage's export (weights, LoRA adapter), loss curve, greedy sample.

What differs by stage enters through two descriptions: the loss side (``training/stages.py``) and the models
side (``training/stage_models.py``: what is trained, what is frozen, what is written at the end).

Run directory ``{out_dir}/{run_name}`` (run_name defaults to MiniMind's ``{stage}_{hidden_size}[_moe]``)::

    state/<step>/        orbax CheckpointManager: full train state, data-iterator state, run metadata
    weights/             this project's checkpoint of the final params (what --init / --from_weight read)
    metrics.jsonl  tb/   loss.png  train_config.yaml
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from minimind_jax import sharding as shd
from minimind_jax import weights
from minimind_jax.config import ModelConfig, param_count
from minimind_jax.data import make_dataset
from minimind_jax.generate import greedy_generate
from minimind_jax.precision import get_policy, make_loss_scale
from minimind_jax.tokenizer import load_tokenizer
from minimind_jax.training import config as tconfig
from minimind_jax.training import prefetch, state_io
from minimind_jax.training.config import TrainConfig, TrainConfigError
from minimind_jax.training.metrics import MetricsLogger, flops_per_token, log, plot_loss, stated_peak
from minimind_jax.training.stage_models import StageModels, models_for, weights_call
from minimind_jax.training.stages import Stage, build_stage
from minimind_jax.training.step import (
    TrainState,
    abstract_with_shardings,
    init_train_state,
    jit_train_step,
    make_train_step,
    state_shardings,
)


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
    first_step: int = 0  # the step the run started from (0, or the resumed checkpoint's)
    last_saved: int | None = None  # the newest complete checkpoint
    compile_s: float | None = None  # the first step's time (compilation included)
    stop_signal: int | None = None  # the signal that stopped an interrupted run (SIGINT, SIGTERM)


@dataclasses.dataclass
class Start:
    """Where a run starts: its model config, run directory, a checkpoint to resume, weights to start from."""
    model_cfg: ModelConfig
    run_dir: Path
    manager: Any = None  # the run's CheckpointManager, when state/ exists
    resume_step: int | None = None
    meta: dict | None = None  # the resumed checkpoint's metadata (None: a fresh run)
    init_params: Any = None  # host weights of --init / --from_weight (None: MiniMind's random init)
    replace: bool = False  # overwrite: the old run is removed once every check has passed

    @property
    def state_dir(self) -> Path:
        return self.run_dir / "state"


@dataclasses.dataclass
class Run:
    """Everything ``run`` and ``finish`` need, made by ``setup``."""
    cfg: TrainConfig
    policy: Any
    model_cfg: ModelConfig
    stage: Stage
    models: StageModels
    tokenizer: Any
    mesh: Any
    run_dir: Path
    manager: Any
    data_iter: Any
    state: TrainState
    step_fn: Any
    batch_sharding: Any
    meta: dict
    logger: MetricsLogger
    total_steps: int
    start_step: int
    resumed: bool


def train(cfg: TrainConfig) -> RunResult:
    """Run one stage as ``cfg`` says. Returns what happened (also written to the run directory)."""
    r = setup(cfg)
    return finish(r, run(r))


# ------------------------------------------------------------------------------------------------ setup
def setup(cfg: TrainConfig) -> Run:
    """Validate everything, then build the run: state on the mesh, the jitted step, the open run directory."""
    cfg.validate()
    if shd.maybe_initialize_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id):
        log(f"distributed: process {jax.process_index()} of {jax.process_count()}")
    policy = get_policy(cfg.policy_name)
    start = _starting_point(cfg)
    models = models_for(cfg.stage)(cfg, start.model_cfg, policy, resuming=start.meta is not None)
    tokenizer = _tokenizer(cfg, start.model_cfg)
    stage = build_stage(cfg, start.model_cfg, policy, models.teacher_cfg, tokenizer)
    mesh = _mesh(cfg, stage)
    pipeline, total_steps = _data(cfg, stage, tokenizer)
    data = _data_meta(cfg, pipeline)
    if start.meta is not None:
        _check_same_data(start, data)
    if start.replace:
        _remove_old_run(start)
    tx, schedule = models.optimizer(total_steps)
    data_iter = pipeline.iterator(workers=cfg.num_workers)
    if start.meta is not None:
        state, state_sharding = _restored_state(cfg, start, models, tx, policy, mesh, data_iter, total_steps)
    else:
        state, state_sharding = _fresh_state(cfg, start, models, tx, policy, mesh)
    start.init_params = None
    batch_sharding = shd.batch_sharding(mesh, leading=1)
    step_fn = jit_train_step(make_train_step(stage, start.model_cfg, policy, tx, schedule), state_sharding,
                             batch_sharding, mesh)
    manager, meta, logger = _open_run_dir(cfg, start, models, policy, mesh, total_steps)
    meta["data"] = data
    r = Run(cfg, policy, start.model_cfg, stage, models, tokenizer, mesh, start.run_dir, manager, data_iter, state,
            step_fn, batch_sharding, meta, logger, total_steps, int(state.step) if start.meta is not None else 0,
            start.meta is not None)
    _describe(r)
    return r


def _starting_point(cfg: TrainConfig) -> Start:
    """The model config and the run to resume or replace, or the weights to start from."""
    model_cfg = tconfig.model_config(cfg)
    start = Start(model_cfg, Path(cfg.out_dir) / tconfig.run_name(cfg, model_cfg))
    if start.state_dir.is_dir():
        start.manager = state_io.manager(start.state_dir, cfg)
        start.resume_step = state_io.latest_step(start.manager, verify=bool(cfg.from_resume))
    if cfg.from_resume and start.resume_step is not None:
        start.meta = state_io.read_meta(start.manager, start.resume_step)
        start.model_cfg = _resumed_model(cfg, start)
        return start
    if cfg.from_resume:
        log(f"--from_resume 1: no checkpoint in {start.state_dir}, starting a fresh run")
    elif start.resume_step is not None:
        if not cfg.overwrite:
            raise TrainConfigError(
                f"{start.run_dir} already holds a run (checkpoint at step {start.resume_step}): continue it with "
                "--from_resume 1, or pick another --out_dir / --run_name, or pass overwrite=true to replace it")
        start.replace = True
    init_path = weights_call(weights.resolve_init, cfg.init, cfg.from_weight, cfg.out_dir, model_cfg)
    if models_for(cfg.stage).needs_init and not init_path:
        raise TrainConfigError(f"--stage {cfg.stage} starts from trained weights (MiniMind: the SFT model): give "
                               "--from_weight sft or --init CHECKPOINT")
    if init_path:
        what = "--init" if cfg.init else "--from_weight"
        start.model_cfg, start.init_params = weights_call(weights.load, init_path, overrides=cfg.model, what=what)
        log(f"weights: {init_path}")
    return start


def _resumed_model(cfg: TrainConfig, start: Start) -> ModelConfig:
    """The resumed run's model config; model settings given now must agree with it."""
    saved = ModelConfig(**start.meta["model"])
    overrides = {k: weights.model_value(k, v) for k, v in cfg.model.items()}
    conflicts = [f"{k}={v!r} (run: {getattr(saved, k)!r})" for k, v in overrides.items() if getattr(saved, k) != v]
    if conflicts:
        raise TrainConfigError(f"{start.state_dir}: cannot resume: the run was trained as a different model: "
                               f"{', '.join(conflicts)}")
    return saved


def _remove_old_run(start: Start) -> None:
    """overwrite=true: the old run's checkpoints and metrics go (its exported weights/ stay until replaced)."""
    start.manager.close()
    start.manager = None
    shutil.rmtree(start.state_dir)
    for f in ("metrics.jsonl", "loss.png", "reward.png"):
        (start.run_dir / f).unlink(missing_ok=True)
    shutil.rmtree(start.run_dir / "tb", ignore_errors=True)


def _tokenizer(cfg: TrainConfig, model_cfg: ModelConfig):
    for p in cfg.data_path:
        if not os.path.exists(p):
            raise TrainConfigError(f"data_path: {p}: no such file or directory")
    tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else load_tokenizer()
    if len(tokenizer) > model_cfg.vocab_size:
        raise TrainConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                               f"{model_cfg.vocab_size}")
    return tokenizer


def _mesh(cfg: TrainConfig, stage: Stage):
    nproc = jax.process_count()
    if cfg.batch_size % nproc:
        raise TrainConfigError(f"batch_size {cfg.batch_size} must divide over {nproc} processes")
    mesh = shd.make_mesh(cfg.mesh)
    dp = shd.data_parallel_size(mesh)
    rows = cfg.batch_size * stage.rows_per_example
    if rows % dp:
        what = f"batch_size {cfg.batch_size}" + (f" x {stage.rows_per_example} rollouts" if rows != cfg.batch_size else "")
        raise TrainConfigError(f"{what} must be a multiple of the data-parallel size {dp} "
                               f"(mesh {shd.describe_mesh(mesh)})")
    return mesh


def _data(cfg: TrainConfig, stage: Stage, tokenizer):
    """This process's data pipeline and the run's number of optimizer steps."""
    nproc = jax.process_count()
    weighted = "loss_weights" in stage.batch_keys  # reason: the tag tokens weighted
    pipeline = make_dataset(stage.data_stage, cfg.data_path, tokenizer, cfg.max_seq_len, cfg.batch_size // nproc,
                            seed=cfg.seed, epochs=cfg.epochs, shuffle=cfg.shuffle, shard_index=jax.process_index(),
                            shard_count=nproc, skip_bad_lines=cfg.skip_bad_lines,
                            add_system_prompt_prob=cfg.add_system_prompt_prob,
                            drop_empty_think_prob=cfg.drop_empty_think_prob,
                            special_token_weight=cfg.special_token_weight if weighted else None,
                            thinking_ratio=cfg.thinking_ratio)
    batches = len(pipeline)
    if nproc > 1:  # shards may differ by a record: every process must run the same number of steps
        batches = int(np.min(multihost_utils.process_allgather(np.int64(batches))))
    steps_in_data = batches // cfg.accumulation_steps
    if steps_in_data < 1:
        raise TrainConfigError(f"{', '.join(cfg.data_path)}: {batches} batches of {cfg.batch_size} are fewer "
                               f"than one optimizer step ({cfg.accumulation_steps} accumulation steps)")
    return pipeline, min(steps_in_data, cfg.max_steps) if cfg.max_steps else steps_in_data


def _data_meta(cfg: TrainConfig, pipeline) -> dict:
    """What a checkpoint records of its data: the files (size, mtime) and this process's examples per epoch."""
    paths = [cfg.data_path] if isinstance(cfg.data_path, str) else list(cfg.data_path)
    files = []
    for path in paths:
        st = os.stat(path)
        files.append({"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"files": files, "examples_per_epoch": pipeline.examples_per_epoch, "processes": jax.process_count(),
            "num_workers": cfg.num_workers}


def _check_same_data(start: Start, now: dict) -> None:
    """A resumed run continues the saved data position, which only means something on the same records: fewer
    or more examples per epoch is an error naming the files; the same count in changed files is a warning."""
    saved = start.meta.get("data")
    if not saved:  # saved by an older version: nothing to compare
        return
    where = ", ".join(f["path"] for f in now["files"])
    if saved.get("num_workers", 0) != now["num_workers"]:  # the data position's form depends on it
        raise TrainConfigError(f"num_workers: {start.state_dir} was saved with num_workers="
                               f"{saved.get('num_workers', 0)}; resume with that number (the batches are the same)")
    if saved.get("processes") == now["processes"] and saved.get("examples_per_epoch") != now["examples_per_epoch"]:
        raise TrainConfigError(
            f"{where}: the data changed since {start.state_dir} was saved ({saved.get('examples_per_epoch')} "
            f"examples per epoch then, {now['examples_per_epoch']} now): the saved data position cannot be "
            "continued. Resume with the same data, or start a new run on the new data (another out_dir, or "
            "overwrite=true without --from_resume)")
    before = {(f["path"], f["size"], f["mtime_ns"]) for f in saved.get("files", [])}
    if before != {(f["path"], f["size"], f["mtime_ns"]) for f in now["files"]}:
        log(f"note: the data files ({where}) changed since the run was saved (same number of examples): the "
            "resumed batches are those of the new files")


def _shardings(models: StageModels, model_cfg: ModelConfig, mesh, params):
    """(params, frozen) shardings; trained params the stage keeps small (LoRA's adapters) are replicated."""
    param_sharding, frozen_sharding = models.shardings(shd.param_shardings(model_cfg, mesh), mesh)
    if param_sharding is None:
        param_sharding = jax.tree.map(lambda _: shd.replicated(mesh), params)
    return param_sharding, frozen_sharding


def _fresh_state(cfg: TrainConfig, start: Start, models: StageModels, tx, policy, mesh):
    params, frozen = models.fresh(start.init_params)
    param_sharding, frozen_sharding = _shardings(models, start.model_cfg, mesh, params)
    return init_train_state(start.model_cfg, tx, seed=cfg.seed, policy=policy, loss_scale=cfg.loss_scale,
                            params=params, mesh=mesh, param_sharding=param_sharding, frozen=frozen,
                            frozen_sharding=frozen_sharding)


def _restored_state(cfg: TrainConfig, start: Start, models: StageModels, tx, policy, mesh, data_iter,
                    total_steps: int):
    params_shape, frozen_shape = models.shapes()
    param_sharding, frozen_sharding = _shardings(models, start.model_cfg, mesh, params_shape)
    abstract, state_sharding = _abstract_state(params_shape, frozen_shape, tx, cfg, policy, mesh, param_sharding,
                                               frozen_sharding)
    state = state_io.restore(start.manager, start.resume_step, abstract, data_iter)
    before, now = start.meta.get("mesh", "?"), shd.describe_mesh(mesh)
    note = "" if before == now else f" (saved on {before}; resharded onto {now})"
    log(f"resumed {start.state_dir} at step {int(state.step)}{note}")
    if start.meta.get("total_steps") != total_steps:
        log(f"note: the run was planned for {start.meta.get('total_steps')} steps, now {total_steps}")
    return state, state_sharding


def _abstract_state(params_shape, frozen_shape, tx, cfg, policy, mesh, param_sharding, frozen_sharding):
    """The TrainState's shapes, dtypes and (this mesh's) shardings, for restoring without initialising."""
    kind = cfg.loss_scale if cfg.loss_scale != "auto" else ("dynamic" if policy.needs_loss_scaling else "none")

    def make(params, frozen):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          loss_scale=make_loss_scale(kind), rng=jax.random.key_data(jax.random.key(0)), frozen=frozen)

    shape = jax.eval_shape(make, params_shape, frozen_shape)
    shardings = state_shardings(shape, param_sharding, mesh, tx, frozen_sharding)
    return abstract_with_shardings(shape, shardings), shardings


def _open_run_dir(cfg: TrainConfig, start: Start, models: StageModels, policy, mesh, total_steps: int):
    """The run directory's config file, checkpoint manager, checkpoint metadata and metrics logger."""
    start.run_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        tconfig.dump_yaml(cfg, start.run_dir / "train_config.yaml")
    manager = start.manager or state_io.manager(start.state_dir, cfg)
    meta = {"model": dataclasses.asdict(start.model_cfg), "train": cfg.to_dict(), "stage": cfg.stage,
            "policy": policy.name, "mesh": shd.describe_mesh(mesh), "devices": jax.device_count(),
            "total_steps": total_steps, **models.meta()}
    logger = MetricsLogger(start.run_dir, tensorboard=cfg.tensorboard, enabled=jax.process_index() == 0)
    return manager, meta, logger


def _describe(r: Run) -> None:
    cfg = r.cfg
    total, active = param_count(r.model_cfg)
    batch = r.stage.describe or f"{cfg.batch_size}x{cfg.max_seq_len} tokens"
    log(f"stage {cfg.stage}: {total / 1e6:.2f}M params ({active / 1e6:.2f}M active), policy {r.policy}, "
        f"mesh {shd.describe_mesh(r.mesh)}, {r.total_steps} steps of {cfg.accumulation_steps} x {batch}, "
        f"run dir {r.run_dir}")
    log(_describe_trainables(r.state, r.models.frozen_name))
    log(f"MFU: {stated_peak(r.policy, cfg.peak_tflops)[1]}")


def _describe_trainables(state: TrainState, frozen_name: str) -> str:
    def count(tree):
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))

    def nbytes(tree):
        return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))

    text = (f"trained params: {count(state.params):,} ({nbytes(state.params) / 2**20:.2f} MiB); optimizer state "
            f"{nbytes(state.opt_state) / 2**20:.2f} MiB")
    if state.frozen is not None:
        text += (f"; frozen {frozen_name}: {count(state.frozen):,} params ({nbytes(state.frozen) / 2**20:.2f} MiB, "
                 "no gradients)")
    return text


# ------------------------------------------------------------------------------------------------ run
_IN_FLIGHT = 2  # steps dispatched ahead of the device at most: the next one is always queued, and data_wait
# counts only waits that can keep the device idle (not the host running ahead of a busy device)


@dataclasses.dataclass
class _Dispatched:
    """A step sent to the devices whose metrics are not read back yet."""
    step: int
    metrics: Any  # the jitted step's device metrics
    host_metrics: dict
    tokens: int | None  # the step's tokens (None: the fixed tokens per step)
    wait_s: float  # seconds the loop waited for its batch
    t: float  # when it was dispatched


def run(r: Run) -> RunResult:
    """The step loop; returns after the last step, a stop request or a non-finite step (saved except the last).
    A full disk while saving is one :class:`TrainingError` naming the last complete checkpoint."""
    try:
        return _run(r)
    except Exception as e:
        if not state_io.no_space_left(e):
            raise
        last = state_io.latest_step(r.manager, verify=False)  # the failed step was never finalised: not listed
        what = (f"the last complete checkpoint (step {last}) is intact" if last is not None
                else "no checkpoint is complete")
        raise TrainingError(f"{r.run_dir / 'state'}: no space left on device while saving a checkpoint; {what}. "
                            "Free some space (or lower keep_checkpoints), then continue with --from_resume 1") from None


def _run(r: Run) -> RunResult:
    res = RunResult(r.run_dir, r.start_step, [], None, r.model_cfg, first_step=r.start_step,
                    last_saved=r.start_step if r.resumed else None)
    feed = _feed(r)
    try:
        with _stop_requests() as stop, _progress(r.cfg, r.total_steps, r.start_step) as bar, feed:
            _steps(r, res, stop, bar, feed)
    except KeyboardInterrupt:
        if res.stopped != "nonfinite":
            res.stopped, res.stop_signal = "interrupted", signal.SIGINT
    except BaseException:
        _close(r)  # the checkpoint being written completes (the last complete one survives), then the error goes up
        raise
    if res.stopped != "nonfinite" and res.last_saved != res.steps:
        state_io.save(r.manager, res.steps, r.state, feed.consumed, {**r.meta, "step": res.steps}, force=True)
        res.last_saved = res.steps
    _close(r)
    if res.stopped == "interrupted":
        log(f"interrupted: saved step {res.steps} to {r.run_dir / 'state'} (stopped by "
            f"{signal.Signals(res.stop_signal).name}); continue with --from_resume 1")
    res.params, res.frozen, res.opt_state = r.state.params, r.state.frozen, r.state.opt_state
    return res


def _feed(r: Run) -> prefetch.BatchFeed:
    """The run's batches, ``prefetch_batches`` ahead; on the devices already unless the stage prepares them
    first (its rollouts need the current params)."""
    cfg, keys = r.cfg, r.stage.data_keys or r.stage.batch_keys
    place = None if r.stage.prepare is not None else (lambda batch: shd.shard_batch(batch, r.batch_sharding))
    return prefetch.BatchFeed(lambda: _next_batch(r.data_iter, cfg.accumulation_steps, keys), r.data_iter,
                              r.total_steps - r.start_step, cfg.prefetch_batches, place)


def _close(r: Run) -> None:
    """Wait for the checkpoint being written, then close the checkpoint manager (also when that save failed: its
    error goes up after), the metrics files and the data iterator."""
    try:
        r.manager.close()
    finally:
        r.logger.close()
        close = getattr(r.data_iter, "close", None)  # grain's worker processes stop
        if close is not None:
            close()


def _steps(r: Run, res: RunResult, stop, bar, feed: prefetch.BatchFeed) -> None:
    """Dispatch steps; read their metrics back (checking each) after the first step, every log_interval steps,
    before a save, at the last step and at a stop request; save only what the read-back showed good."""
    cfg = r.cfg
    clock = _Throughput(cfg.batch_size * cfg.accumulation_steps * cfg.max_seq_len * r.stage.sequences_per_example,
                        flops_per_token(r.model_cfg, cfg.max_seq_len), stated_peak(r.policy, cfg.peak_tflops)[0])
    pending: list[_Dispatched] = []
    step = r.start_step
    try:
        while step < r.total_steps:
            step += 1
            pending.append(_dispatch(r, step, feed.next(), pending))
            saving = step % cfg.save_interval == 0 and step < r.total_steps
            if (saving or stop.requested or step % cfg.log_interval == 0 or step in (r.start_step + 1, r.total_steps)) \
                    and _read_back(r, res, pending, clock, bar):
                return
            if saving:
                state_io.save(r.manager, step, r.state, feed.consumed, {**r.meta, "step": step})
                res.last_saved = step
            if stop.requested:
                res.stopped, res.stop_signal = "interrupted", stop.signum
                return
    except BaseException:
        if pending:  # the steps run so far are checked and logged (Ctrl-C then saves the last of them)
            _read_back(r, res, pending, clock, bar)
        raise


def _dispatch(r: Run, step: int, fed: prefetch.Fed, pending: list[_Dispatched]) -> _Dispatched:
    """Send step ``step`` to the devices (after the stage's prepare hook, if any) without waiting for it."""
    batch, device_batch, host_metrics = fed.host, fed.device, {}
    if r.stage.prepare is not None:
        batch, host_metrics = r.stage.prepare(batch, r.state, step - 1)
        device_batch = shd.shard_batch(batch, r.batch_sharding)
    if len(pending) >= _IN_FLIGHT:
        jax.block_until_ready(pending[-_IN_FLIGHT].metrics)
    t = time.perf_counter()
    r.state, metrics = r.step_fn(r.state, device_batch)
    tokens = r.stage.count_tokens(batch) if r.stage.count_tokens else None
    return _Dispatched(step, metrics, host_metrics, tokens, fed.wait_s, t)


def _read_back(r: Run, res: RunResult, pending: list[_Dispatched], clock: _Throughput, bar) -> bool:
    """The pending steps' metrics in one transfer, checked and logged in order; True when one is hopeless (its
    row and those after it are not logged). ``pending`` is emptied."""
    done, pending[:] = list(pending), []
    values = jax.device_get([d.metrics for d in done])
    figures = clock.interval(done[0].t, [d.tokens for d in done])
    res.compile_s = clock.compile_s
    rows = []
    for d, metrics in zip(done, values):
        res.steps = d.step
        if _hopeless(r, metrics, res):
            break
        row = {k: float(v) for k, v in metrics.items() if k not in ("finite", "params_finite", "skipped_in_a_row")}
        row.update({k: float(v) for k, v in d.host_metrics.items()})
        row.update(figures, data_wait=d.wait_s)
        res.losses.append(row["loss"])
        rows.append((d.step, row))
    if rows:
        _report(r, rows, bar, wait_share=clock.wait_share([d.wait_s for d in done]),
                restart_clock=done[0].step == r.start_step + 1)
    return res.stopped == "nonfinite"


def _hopeless(r: Run, metrics: dict, res: RunResult) -> bool:
    """Stop on a step nothing can recover from: non-finite params after the update; without loss scaling a
    non-finite loss or gradients (the update was skipped); with it ``max_skipped_steps`` skipped steps in a
    row (the loss scale cannot bring the gradients back). The state of that step is never saved."""
    loss = float(metrics["loss"])
    in_a_row = int(metrics["skipped_in_a_row"])
    limit = r.cfg.max_skipped_steps
    if not bool(metrics["params_finite"]):
        what = "the update made the params non-finite"
    elif not r.policy.needs_loss_scaling and not (math.isfinite(loss) and bool(metrics["finite"])):
        what = f"loss is {loss}" if not math.isfinite(loss) else "gradients are not finite"
    elif r.policy.needs_loss_scaling and limit and in_a_row >= limit:
        what = f"{in_a_row} steps in a row were skipped (non-finite gradients; max_skipped_steps={limit})"
    else:
        return False
    res.stopped = "nonfinite"
    kept = (f"The last good checkpoint (step {res.last_saved}) in {r.run_dir / 'state'} is intact."
            if res.last_saved is not None else "No checkpoint was saved.")
    log(f"\nstep {res.steps}: {what} under the {r.policy.name} policy; stopping. {kept} Lower --learning_rate, "
        "keep --grad_clip, or check the data.")
    return True


class _Throughput:
    """Tokens/s, TFLOP/s per device and MFU per read-back interval: the tokens of the interval's steps over the
    wall clock since the previous read-back. The first step (compilation included) is timed on its own."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float | None):
        self.tokens_per_step, self.fpt, self.peak = tokens_per_step, flops_per_token, peak
        self.compile_s: float | None = None
        self.t = time.perf_counter()
        self.elapsed = 0.0  # the last interval's seconds

    def interval(self, first_dispatch: float, tokens: list[int | None]) -> dict[str, float]:
        """Figures of the interval ending now; ``tokens`` per step (None: the fixed tokens per step)."""
        now = time.perf_counter()
        if self.compile_s is None:  # the first read-back holds the first step only
            self.compile_s, self.t, self.elapsed = now - first_dispatch, now, 0.0
            tps = float("nan")
        else:
            self.elapsed, self.t = now - self.t, now
            n = sum(self.tokens_per_step if k is None else k for k in tokens)
            tps = n / self.elapsed if n and self.elapsed > 0 else float("nan")
        out = {"tokens_per_s": tps, "tflops_per_device": tps * self.fpt / 1e12 / jax.device_count()}
        if self.peak:
            out["mfu"] = out["tflops_per_device"] / self.peak
        return out

    def wait_share(self, waits: list[float]) -> float | None:
        """The share of the last interval the loop spent waiting for batches (None for the first step)."""
        return sum(waits) / self.elapsed if self.elapsed > 0 else None


def _report(r: Run, rows: list[tuple[int, dict]], bar, *, wait_share: float | None, restart_clock: bool) -> None:
    """metrics.jsonl / TensorBoard get every step's row; the progress bar (or, without it, a line every
    log_interval steps) the interval's last row, and the time spent waiting for data when over 5%."""
    for step, row in rows:
        r.logger.log(step, row)  # a few hundred bytes: the curve and TensorBoard see every step
    step, row = rows[-1]
    text = _postfix(row) + (f", data wait {100 * wait_share:.0f}%" if wait_share and wait_share > 0.05 else "")
    if bar is not None:
        bar.set_postfix_str(text, refresh=False)  # before update(): the bar shows this interval's figures
        bar.update(len(rows))
        if restart_clock:  # the rate and ETA count the steps after compilation
            bar.reset(total=r.total_steps)
            bar.initial = bar.n = bar.last_print_n = step
    if bar is None and (step % r.cfg.log_interval == 0 or step == r.total_steps or restart_clock):
        log(f"step {step}/{r.total_steps} {text}")


class _StopRequest:
    requested = False
    signum: int | None = None


@contextlib.contextmanager
def _stop_requests():
    """SIGINT (Ctrl-C) and SIGTERM (schedulers, docker stop) ask the loop to stop after the current step and
    save; a second Ctrl-C raises KeyboardInterrupt at once. Handlers are only set from the main thread."""
    stop = _StopRequest()

    def handler(signum, frame):
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.requested, stop.signum = True, signum

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _progress(cfg: TrainConfig, total: int, initial: int):
    if not cfg.progress or jax.process_index() != 0:
        yield None
        return
    bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr, desc=cfg.stage,
               mininterval=0.5)
    try:
        yield bar
    finally:
        bar.close()


def _next_batch(it, accum: int, keys) -> dict[str, np.ndarray]:
    micro = [next(it) for _ in range(accum)]
    return {k: np.stack([m[k] for m in micro]) for k in keys}


def _postfix(row: dict) -> str:
    parts = [f"loss {row['loss']:.4f}"]
    if "reward_mean" in row:
        parts.append(f"reward {row['reward_mean']:.3f}")
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


# ------------------------------------------------------------------------------------------------ finish
def finish(r: Run, res: RunResult) -> RunResult:
    """The stage's export, the loss curve and a greedy sample; raises if the run stopped on a non-finite step."""
    cfg = r.cfg
    sample_params = None
    if res.stopped == "done":  # gathering is a collective: every process takes part
        sample_params = r.models.export(r.run_dir, _to_host(r.state.params), lambda: _to_host(r.state.frozen),
                                        res.steps)
    if cfg.plot and jax.process_index() == 0:
        png = plot_loss(r.run_dir / "metrics.jsonl", r.run_dir / "loss.png", title=f"{r.run_dir.name} ({cfg.stage})")
        if png:
            log(f"loss curve: {png}")
        png = plot_loss(r.run_dir / "metrics.jsonl", r.run_dir / "reward.png", title=f"{r.run_dir.name} (mean reward)",
                        key="reward_mean")  # RL stages
        if png:
            log(f"reward curve: {png}")
    if res.losses:
        k = max(1, min(10, len(res.losses) // 5))
        log(f"loss {np.mean(res.losses[:k]):.3f} -> {np.mean(res.losses[-k:]):.3f} over steps "
            f"{res.first_step + 1}..{res.steps}"
            + (f"; first step (compile) {res.compile_s:.1f} s" if res.compile_s is not None else ""))
    if res.stopped == "done" and cfg.sample_prompt != "" and jax.process_index() == 0:
        res.sample = _sample(sample_params, r)
    if res.stopped == "nonfinite":
        raise TrainingError(f"training stopped at step {res.steps}: non-finite loss or gradients (last good "
                            f"checkpoint: step {res.last_saved} in {r.run_dir / 'state'})")
    return res


def _to_host(tree):
    """Full numpy copies of (possibly sharded, possibly multi-host) arrays."""
    if jax.process_count() > 1:
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _sample(params, r: Run) -> str:
    cfg, tokenizer = r.cfg, r.tokenizer
    if r.stage.data_stage == "pretrain":
        prompt = "你好" if cfg.sample_prompt is None else cfg.sample_prompt
        ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
    else:
        prompt = cfg.sample_prompt or "你好"
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
    new = greedy_generate(jax.tree.map(jnp.asarray, params), r.model_cfg, ids, cfg.sample_tokens,
                          policy="fp32" if r.policy.name == "fp32" else "bf16", eos_id=tokenizer.eos_token_id)
    text = tokenizer.decode(new, skip_special_tokens=True)
    log(f"sample (greedy) {prompt!r} -> {text!r}")
    return text
