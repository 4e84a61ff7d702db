"""The training state on disk: one orbax ``CheckpointManager`` per run (``<run>/state``) holding, per saved
step, the ``TrainState`` (params, optimizer state, loss scale, rng, frozen models), the grain data iterator's
position and a JSON ``meta`` (config, data fingerprint, counters) that resume checks before restoring."""

from __future__ import annotations

from pathlib import Path

import grain
import orbax.checkpoint as ocp

from minimind_jax.training.config import TrainConfig
from minimind_jax.training.step import TrainState


def manager(state_dir: Path, cfg: TrainConfig):
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True,
                                           enable_async_checkpointing=cfg.async_checkpointing,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(state_dir.absolute(), options=options)


def save(mgr, step: int, state: TrainState, data_iter, meta: dict, *, force: bool = False) -> None:
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           data=grain.checkpoint.CheckpointSave(data_iter),
                                           meta=ocp.args.JsonSave(meta)), force=force)


def latest_step(mgr) -> int | None:
    """The step a resumed run continues from: the newest saved step (None when nothing is saved)."""
    return mgr.latest_step()


def read_meta(mgr, step: int) -> dict:
    return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(mgr, step: int, abstract_state, data_iter):
    restored = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored["state"]
