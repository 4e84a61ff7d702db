"""Train-state checkpoint integrity: each finalised step gets a sha256 manifest (async and sync saves); a step
whose files were flipped, cut short or deleted is named and skipped, resume falls back to the newest intact
step and continues bit-identically to an uninterrupted run; when every step is damaged, one clear error and
nothing is touched; orbax's max_to_keep cleanup still removes old steps with their manifests."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minimind_jax.training import loop, state_io
from minimind_jax.training.config import TrainConfigError
from test_train_loop import PRETRAIN, TINY_MODEL, _steps, tiny_run

pytestmark = pytest.mark.xdist_group("state_integrity")  # one worker trains the module's runs once

# constant lr: a 6-step run's state at step 6 is the 8-step run's state at step 6
SETTINGS = dict(save_interval=2, lr_schedule="constant", warmup_steps=0, tensorboard=False, plot=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 8-step run (async saves, 3 kept) and a 6-step run of the same settings (sync saves,
    4 kept: steps 2, 4, 6) that the tests copy, damage and resume to step 8."""
    ref_dir, base_dir = tmp_path_factory.mktemp("ref"), tmp_path_factory.mktemp("base")
    ref = loop.train(tiny_run(ref_dir, max_steps=8, keep_checkpoints=3, async_checkpointing=True, **SETTINGS))
    base = loop.train(tiny_run(base_dir, max_steps=6, keep_checkpoints=4, async_checkpointing=False, **SETTINGS))
    return ref, ref_dir / "pretrain_64", base, base_dir / "pretrain_64"


def _copy_base(runs, tmp_path):
    shutil.copytree(runs[3], tmp_path / "pretrain_64")
    return tmp_path / "pretrain_64" / "state"


def _resume(tmp_path, **over):
    return loop.train(tiny_run(tmp_path, max_steps=8, keep_checkpoints=4, from_resume=1, **SETTINGS, **over))


def _largest_file(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {"flip": (_flip, "sha256 differs"), "truncate": (_truncate, "bytes,"),
          "delete": (lambda p: p.unlink(), "missing")}


def _listing(directory):
    return sorted((p.relative_to(directory).as_posix(), p.stat().st_size if p.is_file() else -1)
                  for p in directory.rglob("*"))


def test_async_and_sync_saves_write_verified_manifests_and_cleanup_removes_old_steps(runs):
    ref, ref_run, base, base_run = runs
    assert base.losses == ref.losses[:6]  # sync and async saves train identically
    assert _steps(ref_run / "state") == [4, 6, 8]  # max_to_keep=3 removed step 2, its manifest with it
    assert _steps(base_run / "state") == [2, 4, 6]
    for run, steps in ((ref_run, [4, 6, 8]), (base_run, [2, 4, 6])):
        for step in steps:
            step_dir = run / "state" / str(step)
            manifest = json.loads((step_dir / state_io.MANIFEST).read_text())
            assert len(manifest["files"]) == len([p for p in step_dir.rglob("*") if p.is_file()]) - 1
            assert state_io.verify_manifest(step_dir) is None
    assert not list((ref_run / "state").rglob("*.tmp"))


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_each_kind_of_damage_names_the_first_bad_file(runs, tmp_path, kind):
    damage, message = DAMAGE[kind]
    step_dir = tmp_path / "6"
    shutil.copytree(runs[3] / "state" / "6", step_dir)
    victim = _largest_file(step_dir)
    damage(victim)
    problem = state_io.verify_manifest(step_dir)
    assert problem.startswith(victim.relative_to(step_dir).as_posix()) and message in problem


def test_resume_of_an_intact_run_is_unchanged(runs, tmp_path):
    _copy_base(runs, tmp_path)
    res = _resume(tmp_path)
    assert res.first_step == 6 and res.losses == runs[0].losses[6:8]


def test_damaged_steps_are_named_and_resume_falls_back_to_the_newest_intact_one(runs, tmp_path, capsys):
    state = _copy_base(runs, tmp_path)
    flipped, deleted = _largest_file(state / "6"), _largest_file(state / "4")
    _flip(flipped)
    deleted.unlink()
    res = _resume(tmp_path)
    out = capsys.readouterr().out
    assert f"checkpoint step 6 in {state} is damaged ({flipped.relative_to(state / '6').as_posix()}: sha256" in out
    assert f"checkpoint step 4 in {state} is damaged ({deleted.relative_to(state / '4').as_posix()}: missing" in out
    assert out.count("resuming from step 2, the newest intact one") == 2
    assert res.first_step == 2 and res.losses == runs[0].losses[2:8]  # bit-identical to the uninterrupted run
    assert _steps(state / "damaged") == [4, 6]  # kept for inspection, out of orbax's way
    assert _steps(state) == [2, 4, 6, 8]


def test_every_step_damaged_is_one_clear_error_and_nothing_is_touched(runs, tmp_path):
    state = _copy_base(runs, tmp_path)
    for step, kind in ((6, "flip"), (4, "truncate"), (2, "delete")):
        DAMAGE[kind][0](_largest_file(state / str(step)))
    before = _listing(tmp_path)
    with pytest.raises(TrainConfigError, match=r"every kept checkpoint is damaged \(step 6: .*sha256.*step 4: .*"
                                               r"bytes.*step 2: .*missing.*overwrite=true without --from_resume"):
        _resume(tmp_path)
    assert _listing(tmp_path) == before
    # a fresh run over it with overwrite=true replaces it (no checkpoint is read, none verified)
    loop.train(tiny_run(tmp_path, max_steps=2, overwrite=True, **SETTINGS))
    assert sorted(p.name for p in state.iterdir() if p.name.isdigit()) == ["2"]


def test_a_step_without_manifest_is_used_unverified_and_its_restore_errors_are_one_line(runs, tmp_path, capsys):
    state = _copy_base(runs, tmp_path)
    (state / "6" / state_io.MANIFEST).unlink()
    mgr = state_io.manager(state, tiny_run(tmp_path, keep_checkpoints=4))
    assert state_io.latest_step(mgr) == 6
    assert f"checkpoint step 6 in {state} has no {state_io.MANIFEST}" in capsys.readouterr().out
    (state / "6" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(TrainConfigError, match=r"6: cannot restore the checkpoint \("):
        state_io.read_meta(mgr, 6)
    assert state_io.latest_step(mgr, verify=False) == 6
    mgr.close()


def test_resume_on_data_that_changed(tmp_path, capsys):
    """The saved data position is only meaningful on the same records: fewer records is one clear error (the
    run untouched); the same records in a rewritten file resume with a note."""
    data = tmp_path / "p.jsonl"
    lines = open(tiny_run(tmp_path).data_path[0], encoding="utf-8").read().splitlines()[:200]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    loop.train(tiny_run(tmp_path, data_path=str(data), max_steps=4, **SETTINGS))
    listing = _listing(tmp_path / "pretrain_64" / "state")
    data.write_text("\n".join(lines[:100]) + "\n", encoding="utf-8")
    with pytest.raises(TrainConfigError, match=r"p\.jsonl: the data changed since .* \(200 examples per epoch "
                                                r"then, 100 now\)"):
        _resume(tmp_path, data_path=str(data))
    assert _listing(tmp_path / "pretrain_64" / "state") == listing
    data.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # same records, another file
    res = _resume(tmp_path, data_path=str(data))
    assert res.steps == 8 and "changed since the run was saved (same number of examples)" in capsys.readouterr().out


def test_a_corrupt_data_position(runs, tmp_path):
    """The data iterator's saved position is covered by the manifest (damaged: check_step names it, so resume falls
    back as above); in a step without a manifest it is one clear error naming the step."""
    state = _copy_base(runs, tmp_path)
    (state / "6" / "data" / "process_0-of-1.json").write_text('{"next_index": ', encoding="utf-8")
    assert state_io.check_step(state_io.manager(state, tiny_run(tmp_path)), 6) is not None
    (state / "6" / "manifest.sha256.json").unlink()
    with pytest.raises(TrainConfigError, match=r"state/6: cannot restore the checkpoint \(JSONDecodeError"):
        _resume(tmp_path)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   ValueError('RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database: '
                                              "Failed to write 182874 bytes to file 6: No space left on device")])
def test_a_full_disk_while_saving_names_the_last_complete_checkpoint(tmp_path, monkeypatch, error):
    save = state_io.save

    def full_at_step_4(mgr, step, *args, **kwargs):
        if step >= 4:
            raise error
        return save(mgr, step, *args, **kwargs)

    monkeypatch.setattr(state_io, "save", full_at_step_4)
    with pytest.raises(loop.TrainingError, match=r"state: no space left on device while saving a checkpoint; the "
                                                 r"last complete checkpoint \(step 2\) is intact\. Free some space"):
        loop.train(tiny_run(tmp_path, max_steps=6, **SETTINGS))
    monkeypatch.setattr(state_io, "save", save)
    assert _resume(tmp_path).steps == 8  # space back: the run continues from step 2


# ``sh -c`` script: mount a tmpfs of $1 at $0 (in the private mount namespace of ``unshare``: gone when it exits),
# run the rest, then list what the disk holds of the run's state (stdout)
_ON_A_SMALL_DISK = ('mount -t tmpfs -o size="$1" tmpfs "$0" || exit 99; shift; "$@"; rc=$?; '
                    'ls "$0"/pretrain_64/state "$0"/pretrain_64/state/1 2>&1; exit $rc')


def _unshare(mount_point: Path, size: str, *command: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", _ON_A_SMALL_DISK,
                           str(mount_point), size, *command], capture_output=True, text=True, **kw)


def test_a_really_full_disk_is_one_error_line_without_orbax_tracebacks(tmp_path):
    """A real full disk (an 8 MB tmpfs: step 1's 5.4 MB state fits, step 2's does not) under async saves:
    stderr is our one error line, without the ~300-600 lines orbax's background threads printed (absl ERROR
    records with tracebacks, tensorstore's "Event loop is closed"); step 1 stays complete."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        probe = _unshare(mount_point, "1m", "true", timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot run unshare: {e}")
    if probe.returncode != 0:
        pytest.skip(f"no private tmpfs mount here (unshare / user namespaces): {probe.stderr.strip()[:200]}")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device: compiles fastest
    args = ["--preset", "minimind3", "--data_path", PRETRAIN, "--out_dir", str(mount_point), "--batch_size", "8",
            "--max_seq_len", "64", "--max_steps", "3", "--save_interval", "1", "--async_checkpointing", "true",
            "--dtype", "float32", "--progress", "false", "--sample_prompt", "", "--plot", "false",
            "--tensorboard", "false"] + [f"model.{k}={v}" for k, v in TINY_MODEL.items()]
    res = _unshare(mount_point, "8m", sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" /
                                                           "train.py"), *args, env={**env, "JAX_PLATFORMS": "cpu"},
                   timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1, res.stdout + res.stderr
    assert len(lines) < 15, res.stderr
    assert lines[-1] == (f"error: {mount_point}/pretrain_64/state: no space left on device while saving a checkpoint; "
                         "the last complete checkpoint (step 1) is intact. Free some space (or lower "
                         "keep_checkpoints), then continue with --from_resume 1")
    assert "Traceback" not in res.stderr and "Event loop is closed" not in res.stderr
    assert state_io.MANIFEST in res.stdout.split()  # step 1 finalised and hashed
