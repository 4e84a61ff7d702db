"""Grain worker processes in the training loop (``num_workers``, MiniMind's flag): the same batches as reading
in the loop's own thread, exact resume from a checkpoint saved while the workers read ahead, and a resume
with another number of workers refused by name."""

import multiprocessing

import numpy as np
import pytest

from minimind_jax.training import loop
from minimind_jax.training.config import TrainConfigError
from test_train_loop import SFT, tiny_run


def _run(path, **over):
    settings = dict(stage="sft", data_path=SFT, max_steps=8, save_interval=4, log_interval=4, batch_size=8)
    settings.update(over)
    return tiny_run(path, **settings)


def test_workers_make_the_same_batches_and_resume_exactly(tmp_path, monkeypatch):
    whole = loop.train(_run(tmp_path / "thread"))
    calls, real = {"n": 0, "children": 0}, loop._next_batch

    def failing(it, accum, keys):
        calls["n"] += 1
        calls["children"] = max(calls["children"], len(multiprocessing.active_children()))
        if calls["n"] == 7:  # steps 1..4 saved at step 4, the workers already further on
            raise RuntimeError("data went away")
        return real(it, accum, keys)

    monkeypatch.setattr(loop, "_next_batch", failing)
    with pytest.raises(RuntimeError, match="data went away"):
        loop.train(_run(tmp_path / "workers", num_workers=2))
    monkeypatch.setattr(loop, "_next_batch", real)
    assert calls["children"] >= 2  # the batches came from the worker processes
    assert not multiprocessing.active_children()  # the failed run stopped its workers
    with pytest.raises(TrainConfigError, match="num_workers=2"):
        loop.train(_run(tmp_path / "workers", from_resume=1))
    rest = loop.train(_run(tmp_path / "workers", num_workers=2, from_resume=1))
    assert rest.first_step == 4 and rest.steps == 8
    np.testing.assert_array_equal(rest.losses, whole.losses[4:])  # fp32 on CPU: bitwise the same batches
    assert not multiprocessing.active_children()


def test_num_workers_must_not_be_negative(tmp_path):
    with pytest.raises(TrainConfigError, match="num_workers"):
        _run(tmp_path, num_workers=-1)
