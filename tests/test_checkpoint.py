"""The params-only checkpoint directory (``minimind_jax/checkpoint.py``).

* bitwise round trips (values and dtypes) for float32 / bfloat16 / float16 and both param layouts, Dense
  and MoE; the loaded model gives the same logits as before saving;
* the manifest: dtype counts, ``num_params == param_count(config)[0]``, a checksum stable across save/load;
* overwrite only with ``force`` (and never of a directory that is not a checkpoint);
* atomicity: a failure or a hard kill at any step leaves ``OUT`` absent or the old complete checkpoint,
  and a scratch directory left by a kill is never taken for a checkpoint;
* OUT/params/ is plain orbax (StandardRestore reads it; compressed StandardSave files load), restored in
  batches;
* every bad input (missing / foreign / truncated / corrupt files, layout mismatch) is a
  ``CheckpointError`` naming the directory; explicit dtype casts on load.
"""

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _util import random_ids, tiny, to_scanned, cached_params

from minimind_jax import MiniMindLM, param_count
from minimind_jax import checkpoint as ckpt
from minimind_jax.checkpoint import (CheckpointError, is_checkpoint, load_checkpoint, params_checksum,
                                     read_manifest, save_checkpoint)

# When one tensorstore read fails (test_corrupt_params), orbax's event loop closes while other reads still
# complete; their callbacks then raise "RuntimeError: Event loop is closed" as an unraisable exception,
# harmless noise that pytest may attribute to a later test of this module.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]
DTYPE_IDS = ["float32", "bfloat16", "float16"]


# ---------------------------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def _random_params(name: str, scan: bool = False, dtype=np.float32):
    """Numpy params with the model's exact tree (from ``jax.eval_shape``: nothing compiled) and random
    values, so no two tensors are equal and every bit pattern differs between tensors."""
    config = tiny(name, scan_layers=scan)
    rng = np.random.RandomState(0)
    flat = [(p, (0.05 * rng.standard_normal(shape)).astype(dtype))
            for p, shape in sorted(ckpt.expected_shapes(config).items())]
    return config, ckpt._unflatten(flat)


def _cast(params, dtype):
    return jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)


def _assert_bitwise_equal(a, b):
    fa, fb = ckpt.flatten_params(a), ckpt.flatten_params(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype, (path, x.dtype, y.dtype)
        assert x.shape == y.shape, (path, x.shape, y.shape)
        assert x.view(np.uint8).tobytes() == y.view(np.uint8).tobytes(), path


def _siblings(out: Path) -> list[str]:
    """Everything in OUT's parent except OUT itself (leftover scratch directories)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def _largest_params_file(out: Path) -> Path:
    files = [p for p in (out / "params").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


@functools.partial(jax.jit, static_argnums=0)
def _logits(config, params, ids):
    return MiniMindLM(config).apply({"params": params}, ids).logits


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scan", [False, True], ids=["per-layer", "scanned"])
def test_round_trip_bitwise(tmp_path, scan, dtype):
    config, params = _random_params("tiny3", scan, dtype)
    out = save_checkpoint(tmp_path / "ckpt", params, config, source="test")
    assert out == tmp_path / "ckpt" and is_checkpoint(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "manifest.json", "params"]
    assert _siblings(out) == []
    loaded_config, loaded = load_checkpoint(out)
    assert loaded_config == config
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(loaded))
    _assert_bitwise_equal(params, loaded)
    assert read_manifest(out)["param_layout"] == ("scanned" if scan else "per-layer")


@pytest.mark.parametrize("name,scan", [("tiny3-moe", True), ("tiny2-moe", False), ("tiny2", True)])
def test_round_trip_other_presets(tmp_path, name, scan):
    config, params = _random_params(name, scan, ml_dtypes.bfloat16)
    loaded_config, loaded = load_checkpoint(save_checkpoint(tmp_path / "c", params, config))
    assert loaded_config == config
    _assert_bitwise_equal(params, loaded)


def test_jax_arrays_and_mixed_dtypes(tmp_path):
    """jax.Array input (as training holds it); fp32 norms with bf16 matrices stay exactly that."""
    config, params = _random_params("tiny3")
    mixed = ckpt._unflatten(
        (p, jnp.asarray(x if p.endswith("norm/weight") else x.astype(ml_dtypes.bfloat16)))
        for p, x in ckpt.flatten_params(params))
    out = save_checkpoint(tmp_path / "c", mixed, config)
    _assert_bitwise_equal(mixed, load_checkpoint(out)[1])
    n_norms = sum(p.endswith("norm/weight") for p, _ in ckpt.flatten_params(params))
    assert read_manifest(out)["dtypes"] == {"bfloat16": len(jax.tree.leaves(params)) - n_norms, "float32": n_norms}


@pytest.mark.parametrize("scan", [False, True], ids=["per-layer", "scanned"])
def test_loaded_params_give_same_logits(tmp_path, scan):
    base = tiny("tiny3")
    params = cached_params(base)
    config = base.replace(scan_layers=scan)
    if scan:
        params = to_scanned(params, base)
    ids = random_ids((2, 12))
    before = np.asarray(_logits(config, params, ids))
    loaded_config, loaded = load_checkpoint(save_checkpoint(tmp_path / "c", params, config))
    after = np.asarray(_logits(loaded_config, loaded, ids))
    assert after.dtype == np.float32
    np.testing.assert_array_equal(before, after)


# ---------------------------------------------------------------------------------------------- orbax files
def test_params_dir_is_plain_orbax(tmp_path):
    """OUT/params/ restores with orbax's own StandardCheckpointHandler (as any orbax user reads it), and a
    params/ written by StandardCheckpointHandler (zstd-compressed, as earlier versions wrote it) loads."""
    import orbax.checkpoint as ocp

    config, params = _random_params("tiny3-moe", False, ml_dtypes.bfloat16)
    out = save_checkpoint(tmp_path / "c", params, config)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        _assert_bitwise_equal(params, ckptr.restore(out / "params", args=ocp.args.StandardRestore(abstract)))
        shutil.rmtree(out / "params")
        ckptr.save(out / "params", args=ocp.args.StandardSave(params))
    finally:
        ckptr.close()
    _assert_bitwise_equal(params, load_checkpoint(out)[1])


@pytest.mark.parametrize("batch_bytes", [1, 1 << 40], ids=["leaf-by-leaf", "one-batch"])
def test_restore_in_batches(tmp_path, monkeypatch, batch_bytes):
    config, params = _random_params("tiny3-moe", True, np.float16)
    out = save_checkpoint(tmp_path / "c", params, config)
    real, sizes = ckpt._batches, []

    def spy(stored, limit):
        for batch in real(stored, limit):
            sizes.append(len(batch))
            yield batch

    monkeypatch.setattr(ckpt, "_RESTORE_BATCH_BYTES", batch_bytes)
    monkeypatch.setattr(ckpt, "_batches", spy)
    _assert_bitwise_equal(params, load_checkpoint(out, as_numpy=True)[1])
    n = len(jax.tree.leaves(params))
    assert sizes == ([1] * n if batch_bytes == 1 else [n])


# ---------------------------------------------------------------------------------------------- manifest
def test_manifest_contents(tmp_path):
    config, params = _random_params("tiny3-moe", True)
    out = save_checkpoint(tmp_path / "c", params, config, source={"from": "model.safetensors", "step": 3},
                          extra={"stage": "sft", "lora": None})
    manifest = read_manifest(out)
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "minimind-jax-checkpoint" and manifest["version"] == 1
    assert manifest["source"] == {"from": "model.safetensors", "step": 3}
    assert manifest["extra"] == {"stage": "sft", "lora": None}
    assert manifest["param_layout"] == "scanned"
    assert manifest["dtypes"] == {"float32": len(jax.tree.leaves(params))}
    assert manifest["num_params"] == param_count(config)[0]
    assert manifest["checksum"] == params_checksum(params)
    import datetime
    assert datetime.datetime.fromisoformat(manifest["created"]).tzinfo is not None
    # the checksum is stable across save -> load -> save
    _, loaded = load_checkpoint(out)
    assert params_checksum(loaded) == manifest["checksum"]
    again = save_checkpoint(tmp_path / "d", loaded, config)
    assert read_manifest(again)["checksum"] == manifest["checksum"]
    # config.json is the config's own JSON (MiniMind layout + our keys)
    assert (out / "config.json").read_text() == config.to_json()


def test_checksum_properties():
    _, params = _random_params("tiny3")
    reference = params_checksum(params)
    assert params_checksum(jax.tree.map(jnp.asarray, params)) == reference  # jax or numpy
    reordered = {k: params[k] for k in reversed(list(params))}
    assert params_checksum(reordered) == reference  # key order does not matter, paths do
    flipped = jax.tree.map(np.copy, params)
    flipped["norm"]["weight"].view(np.uint32)[0] ^= 1  # one bit
    assert params_checksum(flipped) != reference
    assert params_checksum(_cast(params, np.float16)) != reference
    renamed = dict(params)
    renamed["embed"] = renamed.pop("embed_tokens")
    assert params_checksum(renamed) != reference


def test_source_and_extra_must_be_json(tmp_path):
    config, params = _random_params("tiny3")
    with pytest.raises(CheckpointError, match="source must be JSON"):
        save_checkpoint(tmp_path / "c", params, config, source=object())
    with pytest.raises(CheckpointError, match="extra must be a dict"):
        save_checkpoint(tmp_path / "c", params, config, extra=[1])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- overwrite
def test_refuses_overwrite_without_force(tmp_path):
    config, params = _random_params("tiny3")
    out = save_checkpoint(tmp_path / "c", params, config, source="old")
    with pytest.raises(CheckpointError, match=r"already exists.*force=True \(--force\)") as e:
        save_checkpoint(out, _cast(params, np.float16), config, source="new")
    assert str(out) in str(e.value)
    assert read_manifest(out)["source"] == "old" and _siblings(out) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_force_overwrites(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    config, params = _random_params("tiny3")
    out = save_checkpoint(tmp_path / "c", params, config, source="old")
    (out / "stray.txt").write_text("from the old checkpoint")
    new_config, new_params = _random_params("tiny3", True, np.float16)
    save_checkpoint(out, new_params, new_config, source="new", force=True)
    assert not (out / "stray.txt").exists()
    assert read_manifest(out)["source"] == "new"
    loaded_config, loaded = load_checkpoint(out)
    assert loaded_config == new_config
    _assert_bitwise_equal(new_params, loaded)
    assert _siblings(out) == []


def test_empty_directory_is_fine_but_foreign_content_is_never_deleted(tmp_path):
    config, params = _random_params("tiny3")
    (tmp_path / "empty").mkdir()
    assert is_checkpoint(save_checkpoint(tmp_path / "empty", params, config))
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(CheckpointError, match="not a minimind-jax checkpoint; refusing to delete it even with force"):
        save_checkpoint(foreign, params, config, force=True)
    assert (foreign / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a directory"):
        save_checkpoint(tmp_path / "file", params, config, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "home"]


# ---------------------------------------------------------------------------------------------- atomicity
class Crash(Exception):
    pass


def _crash(*args, **kwargs):
    raise Crash("simulated crash")


def test_crash_while_writing_params_leaves_nothing(tmp_path, monkeypatch):
    config, params = _random_params("tiny3")
    real_save = ckpt._save_params

    def half_then_crash(directory, tree):
        real_save(directory, tree)  # the params are fully on disk in the scratch dir ...
        raise Crash("after orbax")  # ... and then the process "dies"

    monkeypatch.setattr(ckpt, "_save_params", half_then_crash)
    with pytest.raises(Crash):
        save_checkpoint(tmp_path / "c", params, config)
    assert list(tmp_path.iterdir()) == []  # no OUT, no scratch


def test_crash_at_final_rename_leaves_nothing(tmp_path, monkeypatch):
    config, params = _random_params("tiny3")
    monkeypatch.setattr(ckpt, "_rename", _crash)
    with pytest.raises(Crash):
        save_checkpoint(tmp_path / "c", params, config)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["_save_params", "_exchange"])
def test_crash_during_forced_save_keeps_old_checkpoint(tmp_path, monkeypatch, where):
    config, params = _random_params("tiny3")
    out = save_checkpoint(tmp_path / "c", params, config, source="old")
    monkeypatch.setattr(ckpt, where, _crash)
    with pytest.raises(Crash):
        save_checkpoint(out, _cast(params, np.float16), config, source="new", force=True)
    assert read_manifest(out)["source"] == "old"
    _assert_bitwise_equal(params, load_checkpoint(out)[1])
    assert _siblings(out) == []


def test_crash_between_the_two_renames_puts_old_back(tmp_path, monkeypatch):
    """Without renameat2: OUT -> .OUT.old-*, then scratch -> OUT; the second rename fails."""
    config, params = _random_params("tiny3")
    out = save_checkpoint(tmp_path / "c", params, config, source="old")
    monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    real_rename, calls = ckpt._rename, []

    def second_fails(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            assert not out.exists()  # the moment OUT is briefly absent
            raise Crash("between renames")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt, "_rename", second_fails)
    with pytest.raises(Crash):
        save_checkpoint(out, _cast(params, np.float16), config, source="new", force=True)
    assert calls[0][0] == "c" and calls[0][1].startswith(".c.old-") and calls[1][1] == "c"
    assert read_manifest(out)["source"] == "old"
    _assert_bitwise_equal(params, load_checkpoint(out)[1])
    assert _siblings(out) == []


def test_another_writer_wins_the_race(tmp_path, monkeypatch):
    """OUT appears (non-empty) between the pre-flight check and the final rename: nothing is replaced."""
    config, params = _random_params("tiny3")
    out, real_rename = tmp_path / "c", ckpt._rename

    def someone_else_first(src, dst):
        out.mkdir()
        (out / "theirs").write_text("x")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt, "_rename", someone_else_first)
    with pytest.raises(CheckpointError, match="appeared .not empty. while this checkpoint was being written"):
        save_checkpoint(out, params, config)
    assert [p.name for p in out.iterdir()] == ["theirs"] and _siblings(out) == []


def test_failing_to_put_old_back_never_deletes_it(tmp_path, monkeypatch):
    """Second and third renames fail: the previous checkpoint is left at .c.old-*, not deleted."""
    config, params = _random_params("tiny3")
    out = save_checkpoint(tmp_path / "c", params, config, source="old")
    monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    real_rename, calls = ckpt._rename, []

    def only_first_works(src, dst):
        calls.append(dst)
        if len(calls) > 1:
            raise Crash("rename")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt, "_rename", only_first_works)
    with pytest.raises(Crash):
        save_checkpoint(out, params, config, source="new", force=True)
    (kept,) = [tmp_path / n for n in _siblings(out)]
    assert kept.name.startswith(".c.old-") and not out.exists() and not is_checkpoint(kept)
    assert read_manifest(kept)["source"] == "old"  # recoverable by hand: mv .c.old-* c


_KILL_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import jax
jax.config.update("jax_platforms", "cpu")
from minimind_jax import checkpoint as ckpt
from test_checkpoint import _random_params, _cast
import numpy as np
config, params = _random_params("tiny3")
ckpt._exchange = lambda a, b: os._exit(9)   # SIGKILL-like: no cleanup, no finally blocks
ckpt._rename = lambda a, b: os._exit(9)
ckpt.save_checkpoint({out!r}, _cast(params, np.float16), config, source="new", force=True)
"""


def test_hard_kill_leaves_old_checkpoint_and_an_ignored_scratch_dir(tmp_path):
    config, params = _random_params("tiny3")
    out = save_checkpoint(tmp_path / "c", params, config, source="old")
    script = _KILL_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    assert read_manifest(out)["source"] == "old"
    _assert_bitwise_equal(params, load_checkpoint(out)[1])
    (scratch,) = [tmp_path / n for n in _siblings(out)]
    assert scratch.name.startswith(".c.tmp-")
    assert (scratch / "manifest.json").exists()  # complete inside, yet never taken for a checkpoint
    assert not is_checkpoint(scratch)
    with pytest.raises(CheckpointError, match="scratch directory left by an interrupted save"):
        load_checkpoint(scratch)
    # the next save is unaffected
    save_checkpoint(out, params, config, source="again", force=True)
    assert read_manifest(out)["source"] == "again"


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture
def saved(tmp_path):
    config, params = _random_params("tiny3")
    return save_checkpoint(tmp_path / "c", params, config), params


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory") as e:
        load_checkpoint(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "f")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a minimind-jax checkpoint"):
        load_checkpoint(tmp_path / "hf")
    assert not is_checkpoint(tmp_path / "hf") and not is_checkpoint(tmp_path / "nope")
    (tmp_path / "hf" / "manifest.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(CheckpointError, match="not a minimind-jax checkpoint manifest.*something-else"):
        load_checkpoint(tmp_path / "hf")
    (tmp_path / "hf" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        read_manifest(tmp_path / "hf")


def test_newer_version_and_incomplete_manifest(saved):
    out, _ = saved
    manifest = read_manifest(out)
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    with pytest.raises(CheckpointError, match="version 2 is newer"):
        load_checkpoint(out)
    del manifest["checksum"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"lacks \['checksum'\]"):
        load_checkpoint(out)


@pytest.mark.parametrize("missing", ["config.json", "params"])
def test_missing_part(saved, missing):
    out, _ = saved
    target = out / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert not is_checkpoint(out)
    with pytest.raises(CheckpointError, match=f"incomplete checkpoint, missing {missing}") as e:
        load_checkpoint(out)
    assert str(out) in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip", "delete-metadata", "truncate-metadata"])
def test_corrupt_params(saved, damage):
    out, _ = saved
    if damage == "truncate":
        with open(_largest_params_file(out), "r+b") as f:
            f.truncate(100)
    elif damage == "delete":
        _largest_params_file(out).unlink()
    elif damage == "flip":  # tensorstore does not notice this one: the manifest's checksum does
        file = _largest_params_file(out)
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0x40
        file.write_bytes(bytes(data))
    elif damage == "delete-metadata":
        (out / "params" / "_METADATA").unlink()
    else:
        with open(out / "params" / "manifest.ocdbt", "r+b") as f:
            f.truncate(10)
    with pytest.raises(CheckpointError, match="corrupt checkpoint") as e:
        load_checkpoint(out)
    assert str(out) in str(e.value)


def test_checksum_mismatch_and_verify_false(saved):
    out, params = saved
    manifest = read_manifest(out)
    (out / "manifest.json").write_text(json.dumps({**manifest, "checksum": "0" * 64}))
    with pytest.raises(CheckpointError, match="checksum mismatch.*corrupt checkpoint") as e:
        load_checkpoint(out)
    assert str(out) in str(e.value)
    _assert_bitwise_equal(params, load_checkpoint(out, verify=False)[1])


def test_layout_mismatch_on_load(saved):
    """A per-layer checkpoint whose config.json claims scan_layers (the classic resume failure)."""
    out, _ = saved
    raw = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**raw, "scan_layers": True}))
    with pytest.raises(CheckpointError, match="param layout mismatch.*scan_layers=True.*'per-layer'"):
        load_checkpoint(out)
    # even with the manifest edited to agree, the stored tree itself is checked (before reading data)
    (out / "manifest.json").write_text(json.dumps({**read_manifest(out), "param_layout": "scanned"}))
    with pytest.raises(CheckpointError, match=r"params are in the per-layer layout.*scan_layers=True[\s\S]*"
                                              r"missing param\(s\): layers/"):
        load_checkpoint(out)


def test_wrong_config_on_load(saved):
    out, _ = saved
    raw = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**raw, "hidden_size": 128, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing param\(s\): layers_2/[\s\S]*shape mismatch") as e:
        load_checkpoint(out)
    assert str(out) in str(e.value)
    (out / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="bad config.json"):
        load_checkpoint(out)


# ---------------------------------------------------------------------------------------------- validation
def test_save_validates_params_against_config(tmp_path):
    config, params = _random_params("tiny3")
    scanned_config, scanned = _random_params("tiny3", True)
    out = tmp_path / "c"
    with pytest.raises(CheckpointError, match=r"params are in the scanned layout.*scan_layers=False"):
        save_checkpoint(out, scanned, config)
    with pytest.raises(CheckpointError, match=r"params are in the per-layer layout.*scan_layers=True"):
        save_checkpoint(out, params, scanned_config)
    broken = jax.tree.map(np.copy, params)
    del broken["layers_1"]["mlp"]["up_proj"]
    broken["layers_0"]["self_attn"]["q_proj"]["kernel"] = np.zeros((3, 3), np.float32)
    broken["layers_0"]["self_attn"]["extra"] = np.zeros(2, np.float32)
    broken["norm"]["weight"] = broken["norm"]["weight"].astype(np.int32)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(out, broken, config)
    message = str(e.value)
    assert str(out) in message
    assert "missing param(s): layers_1/mlp/up_proj/kernel" in message
    assert "unexpected param(s): layers_0/self_attn/extra" in message
    assert "layers_0/self_attn/q_proj/kernel: (3, 3) (expected (64, 64))" in message
    assert "non-floating param(s): norm/weight: int32" in message
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- dtype on load
@pytest.mark.parametrize("stored", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("asked", ["float32", "bfloat16", jnp.float16, np.float32, ml_dtypes.bfloat16])
def test_dtype_cast_on_load(tmp_path, stored, asked):
    config, params = _random_params("tiny3", False, stored)
    out = save_checkpoint(tmp_path / "c", params, config)
    _, loaded = load_checkpoint(out, dtype=asked)
    want = np.dtype(jnp.dtype(asked))
    _assert_bitwise_equal(_cast(params, want), loaded)  # numpy's cast: round to nearest even


def test_bad_dtype(saved):
    out, _ = saved
    with pytest.raises(CheckpointError, match="floating type"):
        load_checkpoint(out, dtype="int32")
    with pytest.raises(CheckpointError, match="float32, bfloat16 or float16"):
        load_checkpoint(out, dtype="nonsense")
