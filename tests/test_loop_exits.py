"""How the training loop leaves: a rejected run replaces nothing, an exception keeps the last complete
checkpoint, SIGTERM stops after the current step and saves (exit 143), and the run is built from named steps
(setup -> run -> finish) whose stage behaviour comes from the stage's models description."""

import os
import signal

import jax
import numpy as np
import pytest

from minimind_jax.precision import get_policy
from minimind_jax.training import config as tconfig
from minimind_jax.training import loop
from minimind_jax.training import stage_models
from minimind_jax.training.config import TrainConfigError
from test_train_loop import PRETRAIN, _run_cli, _steps, _wait_for_step, TINY_MODEL, tiny_run


def test_overwrite_keeps_the_old_run_when_the_new_one_is_rejected(tmp_path):
    loop.train(tiny_run(tmp_path, max_steps=2, save_interval=1))
    run = tmp_path / "pretrain_64"
    before = sorted(p.name for p in (run / "state").iterdir())
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(TrainConfigError, match="no such file"):
        loop.train(tiny_run(tmp_path, max_steps=2, overwrite=True, data_path=str(tmp_path / "misspelled.jsonl")))
    assert sorted(p.name for p in (run / "state").iterdir()) == before
    assert (run / "metrics.jsonl").read_text() == metrics
    with pytest.raises(TrainConfigError, match="data-parallel size"):
        loop.train(tiny_run(tmp_path, max_steps=2, overwrite=True, batch_size=12))
    assert sorted(p.name for p in (run / "state").iterdir()) == before


def test_an_exception_keeps_the_last_checkpoint_and_resume_continues(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = loop._next_batch

    def failing(it, accum, keys):
        calls["n"] += 1
        if calls["n"] == 5:  # right after the asynchronous save of step 4 started
            raise RuntimeError("data went away")
        return real(it, accum, keys)

    monkeypatch.setattr(loop, "_next_batch", failing)
    cfg = tiny_run(tmp_path, max_steps=8, save_interval=2, async_checkpointing=True)
    with pytest.raises(RuntimeError, match="data went away"):
        loop.train(cfg)
    state = tmp_path / "pretrain_64" / "state"
    assert _steps(state) == [2, 4]
    assert not [p for p in state.iterdir() if "tmp" in p.name]  # the in-flight save completed
    monkeypatch.setattr(loop, "_next_batch", real)
    res = loop.train(tiny_run(tmp_path, max_steps=8, save_interval=2, from_resume=1))
    assert res.first_step == 4 and res.steps == 8 and res.stopped == "done"


def test_sigterm_stops_after_the_step_saves_and_exits_143(tmp_path):
    args = ["--preset", "minimind3", "--data_path", PRETRAIN, "--batch_size", "8", "--max_seq_len", "64",
            "--max_steps", "400", "--save_interval", "2", "--log_interval", "1", "--dtype", "float32",
            "--progress", "false", "--sample_prompt", "", "--plot", "false", "--tensorboard", "false",
            "--out_dir", str(tmp_path)] + [f"model.{k}={v}" for k, v in TINY_MODEL.items()]
    proc = _run_cli(args, dict(os.environ))
    state = tmp_path / "pretrain_64" / "state"
    _wait_for_step(proc, state, 2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    assert "interrupted: saved step" in out and "SIGTERM" in out
    saved = max(_steps(state))
    assert 2 <= saved < 400
    assert f"saved step {saved} " in out


@pytest.mark.parametrize("stage, trained, frozen", [("pretrain", "model", None), ("dpo", "model", "model"),
                                                    ("lora", "adapters", "model")])
def test_stage_models_describe_what_is_trained_and_frozen(tmp_path, stage, trained, frozen):
    cfg = tiny_run(tmp_path, stage=stage, init=None)
    model_cfg = tconfig.model_config(cfg)
    models = stage_models.models_for(stage)(cfg, model_cfg, get_policy("fp32"))
    params, frozen_shapes = models.shapes()
    n_model = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(stage_models.model_shapes(model_cfg, "fp32")))
    n_trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert (n_trained == n_model) == (trained == "model")
    assert (frozen_shapes is None) == (frozen is None)
    assert models.needs_init == (stage in ("dpo", "lora"))


def test_an_update_that_makes_params_nonfinite_stops_and_is_never_saved(tmp_path):
    """1e39 is a finite float that overflows float32: the gradients are finite, the update is not. The guard
    checks the params after the update, so no checkpoint ever holds them."""
    with pytest.raises(loop.TrainingError, match="non-finite"):
        loop.train(tiny_run(tmp_path, max_steps=3, save_interval=1, learning_rate=1e39, lr_schedule="constant",
                            warmup_steps=0))
    assert _steps(tmp_path / "pretrain_64" / "state") == []
    assert not (tmp_path / "pretrain_64" / "weights").exists()


def test_a_hopeless_fp16_run_stops_with_an_error(tmp_path, capsys):
    """fp16 at learning_rate 10: every step after the first is non-finite and skipped while the loss scale
    falls; after max_skipped_steps in a row the run stops with an error instead of writing weights and a
    sample."""
    with pytest.raises(loop.TrainingError, match="non-finite"):
        loop.train(tiny_run(tmp_path, max_steps=40, save_interval=100, dtype="float16", learning_rate=10.0,
                            max_skipped_steps=4))
    assert "4 steps in a row were skipped" in capsys.readouterr().out
    assert not (tmp_path / "pretrain_64" / "weights").exists()
