"""The training loop end to end: outputs, pretrain -> SFT, exact resume after kill -9 and Ctrl-C, resharding on
restore, non-finite stop, and clear configuration errors (tiny models on the bundled sample data)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minimind_jax.checkpoint import load_checkpoint
from minimind_jax.training import config as tconfig
from minimind_jax.training.config import TrainConfigError, from_dict, resolve
from minimind_jax.training.loop import TrainingError, train

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "data" / "sample" / "pretrain.jsonl")
SFT = str(ROOT / "data" / "sample" / "sft.jsonl")
TINY_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "intermediate_size": 128}


def tiny_run(tmp_path, **over):
    settings = {"stage": "pretrain", "data_path": PRETRAIN, "preset": "minimind3", "model": dict(TINY_MODEL),
                "out_dir": str(tmp_path), "batch_size": 8, "accumulation_steps": 1, "max_seq_len": 64,
                "learning_rate": 3e-3, "dtype": "float32", "max_steps": 20, "save_interval": 10, "log_interval": 5,
                "progress": False, "sample_prompt": "", "async_checkpointing": False}
    settings.update(over)
    return from_dict(settings)


def _mean(xs):
    return float(np.mean(xs))


def test_pretrain_then_sft_from_its_weights(tmp_path, capsys):
    res = train(tiny_run(tmp_path, max_steps=30, keep_checkpoints=2, tensorboard=True, plot=True, sample_prompt="你好",
                         sample_tokens=8))
    assert res.stopped == "done" and res.steps == 30
    assert _mean(res.losses[:5]) - _mean(res.losses[-5:]) > 1.0, res.losses  # falls clearly from ~8.7
    run = tmp_path / "pretrain_64"
    assert res.run_dir == run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("loss", "aux_loss", "lr", "grad_norm", "loss_scale", "skipped", "tokens_per_s", "tflops_per_device"):
        assert key in rows[-1]
    assert (run / "loss.png").stat().st_size > 1000
    assert any((run / "tb").iterdir())
    assert sorted(int(p.name) for p in (run / "state").iterdir() if p.name.isdigit()) == [20, 30]  # keeps 2
    cfg, params = load_checkpoint(run / "weights")
    assert cfg.hidden_size == 64
    np.testing.assert_array_equal(np.asarray(params["norm"]["weight"]),
                                  np.asarray(res.params["norm"]["weight"]))
    out = capsys.readouterr().out
    assert "sample (greedy) '你好' ->" in out

    # SFT, MiniMind style: --from_weight pretrain finds {out_dir}/pretrain_{hidden}/weights
    sft = train(tiny_run(tmp_path, stage="sft", data_path=SFT, from_weight="pretrain", max_steps=15,
                         max_seq_len=128, learning_rate=1e-3))
    assert sft.run_dir == tmp_path / "sft_64"
    assert "weights: " + str(run / "weights") in capsys.readouterr().out
    assert sft.losses[0] < 7.0  # starts from the pretrained weights, not from scratch (ln 6400 = 8.76)
    assert _mean(sft.losses[-5:]) < _mean(sft.losses[:5])


def test_fresh_run_does_not_overwrite_a_run(tmp_path):
    train(tiny_run(tmp_path, max_steps=2, save_interval=1))
    with pytest.raises(TrainConfigError, match="already holds a run"):
        train(tiny_run(tmp_path, max_steps=2))
    train(tiny_run(tmp_path, max_steps=1, overwrite=True))
    assert sorted(p.name for p in (tmp_path / "pretrain_64" / "state").iterdir() if p.name.isdigit()) == ["1"]


def test_restore_onto_another_mesh(tmp_path, capsys):
    """A run saved on 8 devices (data=8) continues on data=2 x fsdp=2 x tensor=2: the state is resharded on
    restore and the losses continue as in an uninterrupted run (fp32, within 1e-5)."""
    common = {"lr_schedule": "constant"}
    whole = train(tiny_run(tmp_path / "a", max_steps=6, **common))
    train(tiny_run(tmp_path / "b", max_steps=3, **common))
    capsys.readouterr()
    rest = train(tiny_run(tmp_path / "b", max_steps=6, from_resume=1, mesh="data=2,fsdp=2,tensor=2", **common))
    out = capsys.readouterr().out
    assert "resumed" in out and "resharded onto data=2 x fsdp=2 x tensor=2" in out
    np.testing.assert_allclose(rest.losses, whole.losses[3:], atol=1e-5, rtol=0)


def test_nonfinite_loss_stops_with_last_checkpoint_intact(tmp_path):
    with pytest.raises(TrainingError, match="non-finite loss or gradients"):
        train(tiny_run(tmp_path, max_steps=10, save_interval=1, learning_rate=1e12, lr_schedule="constant",
                       grad_clip=0.0))
    state = tmp_path / "pretrain_64" / "state"
    steps = sorted(int(p.name) for p in state.iterdir() if p.name.isdigit())
    assert steps and not (tmp_path / "pretrain_64" / "weights").exists()
    # the last checkpoint restores and its params are finite
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(state.absolute()) as mgr:
        restored = mgr.restore(steps[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(restored["params"])]
    assert all(np.isfinite(x).all() for x in leaves)


def _run_cli(args, env, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _steps(state_dir: Path):
    if not state_dir.is_dir():
        return []
    return sorted(int(p.name) for p in state_dir.iterdir() if p.name.isdigit())


def _wait_for_step(proc, state_dir, at_least, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if [s for s in _steps(state_dir) if s >= at_least]:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for a checkpoint")


def test_resume_after_kill9_and_ctrl_c_equals_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL, resumed, stopped with Ctrl-C (SIGINT: saves and exits 130), and resumed
    again ends with exactly (bitwise) the parameters of an uninterrupted run of the same length."""
    env = dict(os.environ)
    args = ["--preset", "minimind3", "--data_path", PRETRAIN, "--batch_size", "8", "--max_seq_len", "64",
            "--accumulation_steps", "2", "--max_steps", "14", "--save_interval", "2", "--log_interval", "1",
            "--dtype", "float32", "--learning_rate", "3e-3", "--progress", "false", "--sample_prompt", "",
            "--plot", "false", "--tensorboard", "false"] + [f"model.{k}={v}" for k, v in TINY_MODEL.items()]
    whole = _run_cli(args + ["--out_dir", str(tmp_path / "whole")], env)
    out, _ = whole.communicate(timeout=300)
    assert whole.returncode == 0, out

    run = tmp_path / "cut"
    state = run / "pretrain_64" / "state"
    first = _run_cli(args + ["--out_dir", str(run)], env)
    _wait_for_step(first, state, 4)
    first.send_signal(signal.SIGKILL)  # possibly in the middle of writing the next checkpoint
    first.wait()
    killed_at = max(_steps(state))
    assert killed_at < 14

    second = _run_cli(args + ["--out_dir", str(run), "--from_resume", "1"], env)
    _wait_for_step(second, state, killed_at + 2)
    second.send_signal(signal.SIGINT)
    out2, _ = second.communicate(timeout=120)
    assert f"resumed {state}" in out2 or "resumed" in out2, out2
    if second.returncode == 130:
        assert "interrupted: saved step" in out2
    else:  # the run was already finishing when the signal came
        assert second.returncode == 0, out2

    third = _run_cli(args + ["--out_dir", str(run), "--from_resume", "1"], env)
    out3, _ = third.communicate(timeout=300)
    assert third.returncode == 0, out3
    _, p_whole = load_checkpoint(tmp_path / "whole" / "pretrain_64" / "weights", as_numpy=True)
    _, p_cut = load_checkpoint(run / "pretrain_64" / "weights", as_numpy=True)
    flat_w, flat_c = dict(_flat(p_whole)), dict(_flat(p_cut))
    assert flat_w.keys() == flat_c.keys()
    for k in flat_w:
        np.testing.assert_array_equal(flat_w[k], flat_c[k], err_msg=k)


def _flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", np.asarray(v)


# ----------------------------------------------------------------------------------------------- config errors
def test_every_shipped_config_resolves():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = resolve(["--config", str(path)])
        assert cfg.stage in tconfig.STAGES
        tconfig.model_config(cfg)
    assert resolve([]).data_path == ["data/sample/pretrain.jsonl"]  # no arguments: the quickstart


def test_flags_keep_minimind_names_and_meaning():
    cfg = resolve(["--stage", "sft", "--epochs", "3", "--batch_size", "4", "--learning_rate", "2e-5",
                   "--accumulation_steps", "2", "--grad_clip", "0.5", "--max_seq_len", "256", "--hidden_size", "768",
                   "--num_hidden_layers", "16", "--use_moe", "1", "--data_path", "a.jsonl", "--from_weight", "none",
                   "--from_resume", "1", "--save_interval", "50", "--log_interval", "5", "--dtype", "float16"])
    assert (cfg.epochs, cfg.batch_size, cfg.learning_rate, cfg.accumulation_steps, cfg.grad_clip) == (3, 4, 2e-5, 2, 0.5)
    assert cfg.policy_name == "fp16" and cfg.from_resume == 1 and cfg.data_path == ["a.jsonl"]
    m = tconfig.model_config(cfg)
    assert (m.hidden_size, m.num_hidden_layers, m.use_moe) == (768, 16, True)
    sft_defaults = resolve(["--stage", "sft"])
    assert (sft_defaults.learning_rate, sft_defaults.accumulation_steps) == (1e-5, 1)
    pre = resolve(["--stage", "pretrain"])
    assert (pre.learning_rate, pre.accumulation_steps, pre.grad_clip) == (5e-4, 8, 1.0)


def test_abbreviated_flags_are_rejected(capsys):
    with pytest.raises(SystemExit):  # argparse would otherwise read --max_step as --max_steps
        resolve(["--max_step", "3"])
    assert "unrecognized arguments: --max_step" in capsys.readouterr().err
    assert resolve(["--max_steps", "3"]).max_steps == 3


@pytest.mark.parametrize("argv, match", [
    (["--dtype", "float8"], "dtype: 'float8' is not one of"),
    (["--stage", "rlhf"], "unknown stage 'rlhf'"),
    (["--batch_size", "many"], "batch_size: expected int"),
    (["learning_rat=1"], "unknown setting 'learning_rat'"),
    (["model.hidden_sise=4"], "model.hidden_sise: not a model field"),
    (["--config", "no/such.yaml"], "config file not found: no/such.yaml"),
    (["--policy", "bf16-params"], "inference"),
    (["learning_rate=inf"], "learning_rate: must be a finite number"),
    (["--learning_rate", "nan"], "learning_rate: must be a finite number"),
    (["grad_clip=nan"], "grad_clip: must be a finite number"),
])
def test_bad_settings_are_named(argv, match):
    with pytest.raises(TrainConfigError, match=match):
        resolve(argv)


def test_errors_before_compiling(tmp_path):
    with pytest.raises(TrainConfigError, match="no/such/data.jsonl: no such file"):
        train(tiny_run(tmp_path, data_path="no/such/data.jsonl"))
    import jax

    from minimind_jax import init_params
    from minimind_jax.checkpoint import save_checkpoint

    model = tconfig.model_config(tiny_run(tmp_path))
    weights = tmp_path / "o" / "weights"
    save_checkpoint(weights, init_params(model, jax.random.key(0)), model)
    with pytest.raises(TrainConfigError, match=r"different model than asked for: hidden_size=128"):
        train(tiny_run(tmp_path, init=str(weights), model={**TINY_MODEL, "hidden_size": 128}))
    with pytest.raises(TrainConfigError, match="--init no/such/ckpt: no such file"):
        train(tiny_run(tmp_path, init="no/such/ckpt"))
    with pytest.raises(TrainConfigError, match="--from_weight pretrain: found none of"):
        train(tiny_run(tmp_path, stage="sft", data_path=SFT, from_weight="pretrain"))


def test_model_preset_files_match_the_code_presets():
    from minimind_jax.config import ModelConfig

    files = sorted((ROOT / "configs" / "models").glob("*.yaml"))
    assert len(files) == 5
    for path in files:
        cfg = from_dict({"model_config": str(path)})
        assert tconfig.model_config(cfg) == ModelConfig.preset(path.stem), path
    over = from_dict({"model_config": str(files[0]), "model": {"num_hidden_layers": 2}})
    assert tconfig.model_config(over).num_hidden_layers == 2


def test_quickstart_is_the_default_without_stage_or_config():
    q = resolve(["--progress", "false"])
    assert q.out_dir == "out/quickstart" and q.progress is False and q.model["hidden_size"] == 128
    assert resolve(["--stage", "pretrain"]).out_dir == "out"


def _two_processes(args, env, *extra) -> list[str]:
    """Outputs of ``args`` run as two processes (4 simulated devices each) joined over a free local port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_run_cli([*args, "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i),
                       *extra], env) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    return outs


def test_two_processes_train_like_one(tmp_path):
    """Multi-host on one machine: two processes (4 simulated devices each) joined by jax.distributed over
    127.0.0.1 train on one 8-device mesh, each reading its own half of the data, save the state together
    and export the weights; the losses match a single process with 8 devices (fp32, within 1e-5). Resumed
    after bytes of the latest step were flipped, both fall back to the intact step and train on alike."""
    args = ["--preset", "minimind3", "--data_path", PRETRAIN, "--batch_size", "8", "--max_seq_len", "64",
            "--max_steps", "4", "--save_interval", "2", "--log_interval", "1", "--dtype", "float32",
            "--progress", "false", "--sample_prompt", "", "--plot", "false", "--tensorboard", "false",
            "--shuffle", "false", "--learning_rate", "3e-3", "--out_dir", str(tmp_path / "multi")]
    args += [f"model.{k}={v}" for k, v in TINY_MODEL.items()]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
           "JAX_PLATFORMS": "cpu"}
    outs = _two_processes(args, env)
    assert "mesh data=8 x fsdp=1 x tensor=1 (8 devices)" in outs[0]
    single = train(tiny_run(tmp_path / "single", max_steps=4, shuffle=False))
    run = tmp_path / "multi" / "pretrain_64"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in rows], single.losses, atol=1e-5, rtol=0)
    from convert import load_torch

    _, params = load_torch(run / "weights")
    np.testing.assert_allclose(params["norm"]["weight"], np.asarray(single.params["norm"]["weight"]), atol=1e-5)

    # both processes verify the manifests on resume: flipped bytes in step 4 make both fall back to step 2
    state = run / "state"
    assert all((state / str(s) / "manifest.sha256.json").is_file() for s in (2, 4))
    damaged = max((p for p in (state / "4").rglob("*") if p.is_file() and p.name != "manifest.sha256.json"),
                  key=lambda p: p.stat().st_size)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    outs = _two_processes(args, env, "--from_resume", "1")
    assert "checkpoint step 4" in outs[0] and "damaged" in outs[0], outs[0]
    assert (state / "damaged" / "4").is_dir() and _steps(state) == [2, 4]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["loss"] for r in rows[-2:]], single.losses[2:], atol=1e-5, rtol=0)
