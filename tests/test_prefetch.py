"""The training loop's read-ahead (``training/prefetch.py``) and deferred metric read-back: the same losses and
params with and without prefetching, exact resume from a checkpoint saved while batches were read ahead, data
errors raised where the batch is needed, ``data_wait`` logged, and no thread left behind."""

import json
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

from minimind_jax.data import DataError
from minimind_jax.training import loop
from test_train_loop import PRETRAIN, tiny_run


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "batch-prefetch"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_prefetch_changes_nothing_but_the_waiting(tmp_path):
    """fp32 on CPU: 6 steps with batches read 2 ahead (and placed on the devices by the thread) give bitwise
    the losses and params of reading each batch when its step needs it; every row has data_wait."""
    runs = {}
    for depth in (0, 2):
        runs[depth] = loop.train(tiny_run(tmp_path / str(depth), max_steps=6, log_interval=4, prefetch_batches=depth))
        assert not _prefetch_threads()
    assert runs[0].losses == runs[2].losses and len(runs[2].losses) == 6
    for a, b in zip(jax.tree.leaves(runs[0].params), jax.tree.leaves(runs[2].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = _rows(runs[2].run_dir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["data_wait"] >= 0.0 for r in rows)
    assert [r["loss"] for r in rows] == pytest.approx(runs[2].losses, rel=1e-6)


def test_resume_from_a_checkpoint_saved_while_reading_ahead(tmp_path, monkeypatch):
    """The step-4 checkpoint is written while the thread already holds batches 5 and 6; it must hold the data
    position after batch 4, so the resumed run's steps 5..8 equal the uninterrupted run's."""
    whole = loop.train(tiny_run(tmp_path / "whole", max_steps=8, save_interval=4, prefetch_batches=2))
    calls, real = {"n": 0}, loop._next_batch

    def failing(it, accum, keys):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("data went away")
        return real(it, accum, keys)

    monkeypatch.setattr(loop, "_next_batch", failing)
    cut = tiny_run(tmp_path / "cut", max_steps=8, save_interval=4, prefetch_batches=2)
    with pytest.raises(RuntimeError, match="data went away"):
        loop.train(cut)
    assert not _prefetch_threads()
    monkeypatch.setattr(loop, "_next_batch", real)
    rest = loop.train(tiny_run(tmp_path / "cut", max_steps=8, save_interval=4, prefetch_batches=2, from_resume=1))
    assert rest.first_step == 4 and rest.steps == 8
    np.testing.assert_allclose(rest.losses, whole.losses[4:], rtol=1e-6)
    rows = _rows(rest.run_dir)  # the cut run logged steps 1..6 (read back when the error came), then 5..8
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]


def test_a_bad_line_raises_the_same_data_error_through_the_prefetcher(tmp_path):
    """Line 30 (batch 4 unshuffled) is not JSON: the run stops at step 4 with the DataError naming file:30,
    the same error as without prefetching, after the steps before it ran."""
    lines = Path(PRETRAIN).read_text().splitlines()[:64]
    lines[29] = '{"text": "cut short'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    messages = []
    for depth in (0, 2):
        with pytest.raises(DataError, match=r"bad\.jsonl:30") as err:
            loop.train(tiny_run(tmp_path / str(depth), data_path=str(bad), shuffle=False, max_steps=6,
                                log_interval=10, save_interval=10, prefetch_batches=depth))
        messages.append(str(err.value))
        assert not _prefetch_threads()
        assert [r["step"] for r in _rows(tmp_path / str(depth) / "pretrain_64")] == [1, 2, 3]
    assert messages[0] == messages[1]
