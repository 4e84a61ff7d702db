"""The PyTorch <-> JAX converter (``convert``): CLI and API, end to end.

* torch -> jax -> torch is bitwise identical for every tiny architecture and dtype (MiniMind and HF layouts);
* dtypes: ``--dtype auto`` follows the source config (float32 experts in a bfloat16 MoE come out bfloat16 and
  the report names them), float16 range check / ``--clip-fp16``, bf16 / fp16 rounding equal to torch's bits;
* validation: missing / unexpected keys and shapes, non-float tensors, truncated / corrupt files -> a clean
  ``error: ...`` with exit code 2; atomic writes (interrupted conversions leave nothing), ``--force``;
* MiniMind trainer ``.pth`` files (fp16, tied lm_head) with and without a config;
* ``hf`` exports load in ``transformers.AutoModelForCausalLM`` and give our logits; sharded HF directories;
* ``inspect`` output; ``load_torch`` (dtype, scan layout, logits);
* memory: the safetensors reader (plain file reads, equal to the library's), in-place casts and a state
  dict consumed tensor by tensor into contiguous leaves (``python scripts/bench.py convert`` measures it).

Params are random numpy arrays in the exact tree ``expected_param_shapes`` describes (no init to compile);
every model call is jitted once per (config, policy) and reused.
"""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import convert.api
import convert.io
from _util import tiny
from convert import MappingError, load_torch, save_torch
from convert.cli import main
from convert.dtypes import CastLog, DTypeError, cast_all
from convert.mapping import expected_param_shapes, params_to_torch, torch_to_params
from minimind_jax import MiniMindLM
from minimind_jax.checkpoint import flatten_params, load_checkpoint, save_checkpoint

TINY_PRESETS = ["tiny3", "tiny3-moe", "tiny2", "tiny2-moe"]
DTYPES = ["float32", "bfloat16", "float16"]
HF_PRESETS = ["tiny3", "tiny3-moe", "tiny2"]
IDS = np.random.RandomState(0).randint(3, 256, (2, 16)).astype(np.int32)


# ------------------------------------------------------------------------------------------- helpers
def _tree(flat):
    tree = {}
    for path, value in flat:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


@functools.lru_cache(maxsize=None)
def _random_params(config, seed):
    rng = np.random.RandomState(seed)
    flat = []
    for path, shape in sorted(expected_param_shapes(config).items()):
        scale = (1.0, 0.3) if "norm" in "/".join(path) else (0.0, 0.05)  # norms ~ 1 + 0.3 N(0, 1)
        flat.append((path, (scale[0] + scale[1] * rng.randn(*shape)).astype(np.float32)))
    return flat


def random_params(config, seed=0):
    """Fresh dict tree (mutable) over cached arrays (never mutate them in place: copy first)."""
    return _tree(_random_params(config, seed))


@functools.lru_cache(maxsize=None)
def _logits_fn(config, policy="fp32"):
    return jax.jit(lambda p, x: MiniMindLM(config, policy).apply({"params": p}, x).logits)


def logits(config, params, ids=IDS):
    return np.asarray(_logits_fn(config)(params, jnp.asarray(ids)))


def flat(params):
    return {path: np.asarray(x) for path, x in flatten_params(params)}


def assert_params_equal(a, b):
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        assert fa[k].shape == fb[k].shape, k
        assert fa[k].tobytes() == fb[k].tobytes(), k


def read_st(file):
    """name -> numpy array straight from the safetensors library (not the converter's reader)."""
    with safe_open(os.fspath(file), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_tensors_identical(src, out):
    assert sorted(src) == sorted(out)
    for k in src:
        assert src[k].dtype == out[k].dtype, f"{k}: {src[k].dtype} != {out[k].dtype}"
        assert src[k].shape == out[k].shape, k
        assert src[k].tobytes() == out[k].tobytes(), f"{k}: bytes differ"


def run_cli(capsys, *argv):
    code = main([os.fspath(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, *needles):
    assert code == 2, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def no_scratch(folder):
    """save scratch directories are hidden siblings '.NAME.tmp-*' / '.NAME.old-*'."""
    return [p.name for p in folder.iterdir() if re.match(r"^\..+\.(tmp|old)-", p.name)]


def torch_bits(array_f32, torch_dtype):
    torch = pytest.importorskip("torch")

    t = torch.from_numpy(np.ascontiguousarray(array_f32)).to(torch_dtype)
    return t.view(torch.int16).numpy().view(np.uint16)


# ------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_minimind_round_trip_is_bitwise(preset, dtype, tmp_path, capsys):
    config = tiny(preset)
    src = save_torch(random_params(config), config, tmp_path / "src", format="minimind", dtype=dtype)
    code, out, err = run_cli(capsys, "to-jax", src, tmp_path / "jax", "--dtype", "auto")
    assert code == 0, err
    assert f"target dtype: {dtype} (auto: the source config's torch_dtype)" in out
    assert "no casts" in out
    cfg, params = load_checkpoint(tmp_path / "jax", as_numpy=True)
    assert cfg == config
    assert {np.dtype(x.dtype).name for x in flat(params).values()} == {dtype}
    code, out, err = run_cli(capsys, "to-torch", tmp_path / "jax", tmp_path / "back", "--format", "minimind",
                             "--dtype", dtype)
    assert code == 0, err
    assert_tensors_identical(read_st(src / "model.safetensors"), read_st(tmp_path / "back" / "model.safetensors"))
    assert json.loads((src / "config.json").read_text()) == json.loads((tmp_path / "back/config.json").read_text())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", HF_PRESETS)
def test_hf_round_trip_is_bitwise(preset, dtype, tmp_path, capsys):
    config = tiny(preset)
    src = save_torch(random_params(config), config, tmp_path / "src", format="hf", dtype=dtype)
    assert run_cli(capsys, "to-jax", src, tmp_path / "jax", "--dtype", "auto")[0] == 0
    cfg, _ = load_checkpoint(tmp_path / "jax", as_numpy=True)
    assert cfg == config
    code, _, err = run_cli(capsys, "to-torch", tmp_path / "jax", tmp_path / "back", "--format", "hf", "--dtype", dtype)
    assert code == 0, err
    assert_tensors_identical(read_st(src / "model.safetensors"), read_st(tmp_path / "back" / "model.safetensors"))
    assert json.loads((src / "config.json").read_text()) == json.loads((tmp_path / "back/config.json").read_text())


@pytest.mark.torch
def test_to_torch_from_scanned_checkpoint_and_pth_export(tmp_path, capsys):
    """--scan-layers stores the scanned layout; exporting it gives the same torch tensors (plus a .pth)."""
    torch = pytest.importorskip("torch")
    config = tiny("tiny2-moe")
    src = save_torch(random_params(config), config, tmp_path / "src", dtype="bfloat16")
    assert run_cli(capsys, "to-jax", src, tmp_path / "jax", "--dtype", "auto", "--scan-layers")[0] == 0
    cfg, params = load_checkpoint(tmp_path / "jax", as_numpy=True)
    assert cfg.scan_layers and "layers" in params and "layers_0" not in params
    code, out, err = run_cli(capsys, "to-torch", tmp_path / "jax", tmp_path / "back", "--dtype", "bfloat16", "--pth")
    assert code == 0, err
    source = read_st(src / "model.safetensors")
    assert_tensors_identical(source, read_st(tmp_path / "back" / "model.safetensors"))
    pth = torch.load(tmp_path / "back" / "full_sft_64_moe.pth", weights_only=True)
    assert set(pth) == set(source) | {"lm_head.weight"}
    for k, v in pth.items():
        ref = source["model.embed_tokens.weight" if k == "lm_head.weight" else k]
        assert v.dtype == torch.bfloat16 and v.view(torch.int16).numpy().tobytes() == ref.tobytes(), k


# ------------------------------------------------------------------------------------------- dtypes
def _mixed_moe_source(tmp_path, config):
    """A MoE safetensors file whose experts are float32 and everything else bfloat16; config says bf16."""
    sd = params_to_torch(random_params(config), config)
    mixed = {k: (v if ".experts." in k else v.astype(ml_dtypes.bfloat16)) for k, v in sd.items()}
    src = tmp_path / "mixed"
    src.mkdir()
    save_file(mixed, os.fspath(src / "model.safetensors"))
    raw = config.to_dict()
    raw["torch_dtype"] = "bfloat16"
    (src / "config.json").write_text(json.dumps(raw))
    return src, sd


def test_auto_dtype_casts_float32_experts_to_config_dtype(tmp_path, capsys):
    config = tiny("tiny3-moe")
    src, sd = _mixed_moe_source(tmp_path, config)
    code, out, err = run_cli(capsys, "to-jax", src, tmp_path / "jax", "--dtype", "auto")
    assert code == 0, err
    assert "stored dtypes: bfloat16 x20, float32 x24" in out
    assert "target dtype: bfloat16 (auto: the source config's torch_dtype)" in out
    cast_lines = [line for line in out.splitlines() if line.startswith("cast ")]
    assert len(cast_lines) == 1 and cast_lines[0].startswith("cast 24 tensor(s) float32 -> bfloat16: ")
    listed = cast_lines[0].split(": ", 1)[1].split(" ... ")[0].split(", ")
    assert len(listed) == 8 and all(re.fullmatch(r"model\.layers\.\d\.mlp\.experts\.\d\.\w+_proj\.weight", n)
                                    for n in listed), listed
    assert cast_lines[0].endswith("(16 more)")
    cfg, params = load_checkpoint(tmp_path / "jax", as_numpy=True)
    leaves = flat(params)
    assert {k: x.dtype for k, x in leaves.items()} == {k: np.dtype(ml_dtypes.bfloat16) for k in leaves}
    # The cast is float32 -> bfloat16 round-to-nearest-even, as torch's .to(torch.bfloat16).
    got = leaves["layers_1/mlp/experts/down_proj"][2]  # (inter, hidden): torch's weight transposed
    want = sd["model.layers.1.mlp.experts.2.down_proj.weight"].astype(ml_dtypes.bfloat16)
    assert np.ascontiguousarray(got.T).tobytes() == want.tobytes()  # bits vs torch: the rounding test
    manifest = json.loads((tmp_path / "jax" / "manifest.json").read_text())
    assert manifest["dtypes"] == {"bfloat16": len(leaves)}

    # The API says the same; an explicit dtype wins over the config; dtype=None is float32 for training.
    report = convert.Report()
    _, p_auto = load_torch(src, dtype="auto", report=report)
    assert {np.dtype(x.dtype).name for x in flat(p_auto).values()} == {"bfloat16"}
    assert report.dtype == "bfloat16"
    assert list(report.casts.casts) == [("float32", "bfloat16")]
    assert sorted(report.casts.casts["float32", "bfloat16"]) == sorted(k for k in sd if ".experts." in k)
    _, p16 = load_torch(src, dtype="float16")
    assert {np.dtype(x.dtype).name for x in flat(p16).values()} == {"float16"}
    _, p32 = load_torch(src)
    assert {np.dtype(x.dtype).name for x in flat(p32).values()} == {"float32"}

    # One expert bank in three dtypes (numpy cannot even stack float16 with bfloat16): cast per tensor.
    odd = {k: (v.astype(np.float16) if ".experts.0." in k else v.astype(ml_dtypes.bfloat16) if ".experts.1." in k
               else v) for k, v in sd.items()}
    save_file(odd, os.fspath(src / "model.safetensors"))
    code, out, err = run_cli(capsys, "to-jax", src, tmp_path / "jax3", "--dtype", "auto")
    assert code == 0, err
    assert re.search(r"^cast 6 tensor\(s\) float16 -> bfloat16: ", out, re.M)
    assert re.search(r"^cast 32 tensor\(s\) float32 -> bfloat16: ", out, re.M)
    leaves = flat(load_checkpoint(tmp_path / "jax3", as_numpy=True)[1])
    assert {x.dtype for x in leaves.values()} == {np.dtype(ml_dtypes.bfloat16)}
    want = sd["model.layers.0.mlp.experts.0.up_proj.weight"].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(leaves["layers_0/mlp/experts/up_proj"][0].T,
                                  want.astype(ml_dtypes.bfloat16))


@pytest.mark.torch
def test_bf16_and_fp16_export_rounding_matches_torch_bitwise(tmp_path):
    torch = pytest.importorskip("torch")

    config = tiny("tiny3")
    params = random_params(config)
    shape = params["embed_tokens"].shape
    rng = np.random.RandomState(7)
    n = int(np.prod(shape))
    bits = rng.randint(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    exponent = (bits >> 23) & 0xFF
    bits = np.where(exponent == 0xFF, bits & 0xBFFFFFFF, bits)  # no NaN / inf from the random part
    special = [0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000,  # exact ties: round to even, down and up
               0x3F807FFF, 0x3F808001, 0x3F80FFFF, 0x3FFF8000, 0x477FFFFF,
               0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF,  # ties / overflow at the top of the range -> inf
               0x00008000, 0x00018000, 0x007FFFFF, 0x807F8000, 0x00000001, 0x80000001,  # subnormals
               0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x00800000, 0x3F800000]
    bits[: len(special)] = special
    values = bits.view(np.float32).reshape(shape)
    params["embed_tokens"] = values
    save_torch(params, config, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(os.fspath(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        exported = f.get_tensor("model.embed_tokens.weight")
    assert exported.dtype == torch.bfloat16
    ours = exported.view(torch.int16).numpy().view(np.uint16)
    ref = torch_bits(values, torch.bfloat16)
    assert np.array_equal(ours, ref), np.flatnonzero(ours != ref)[:10]

    # float16: values inside the range, with fp16 ties and subnormals; also float16 -> bfloat16.
    h = np.clip(rng.randn(*shape) * np.exp2(rng.randint(-26, 14, shape)), -65504, 65504).astype(np.float32)
    h.reshape(-1)[:6] = [1 + 2**-11, 1 + 3 * 2**-11, 2**-25, 3 * 2**-25, 65504.0, -65503.0]
    params["embed_tokens"] = h
    save_torch(params, config, tmp_path / "f16", dtype="float16")
    got = read_st(tmp_path / "f16" / "model.safetensors")["model.embed_tokens.weight"]
    assert got.dtype == np.float16 and np.array_equal(got.view(np.uint16), torch_bits(h, torch.float16))
    params["embed_tokens"] = got  # stored float16, exported bfloat16 (through float32, as torch does)
    save_torch(params, config, tmp_path / "f16-bf16", dtype="bfloat16")
    with safe_open(os.fspath(tmp_path / "f16-bf16" / "model.safetensors"), framework="pt") as f:
        b = f.get_tensor("model.embed_tokens.weight").view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(b, torch.from_numpy(got).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))


def test_float16_export_refuses_out_of_range_values_unless_clipped(tmp_path, capsys):
    config = tiny("tiny3")
    params = random_params(config)
    kernel = params["layers_1"]["mlp"]["gate_proj"]["kernel"].copy()  # (hidden, inter)
    kernel[3, 5] = 70000.0
    params["layers_1"]["mlp"]["gate_proj"]["kernel"] = kernel
    emb = params["embed_tokens"].copy()
    emb[0, 0] = -1e6
    params["embed_tokens"] = emb
    save_checkpoint(tmp_path / "ckpt", params, config)

    with pytest.raises(DTypeError, match="model.layers.1.mlp.gate_proj.weight"):
        save_torch(params, config, tmp_path / "api", dtype="float16")
    assert not (tmp_path / "api").exists()

    code, out, err = run_cli(capsys, "to-torch", tmp_path / "ckpt", tmp_path / "out", "--dtype", "float16")
    assert_clean_error(code, err, "model.layers.1.mlp.gate_proj.weight", "model.embed_tokens.weight",
                       "--clip-fp16", "2 tensor(s)")
    assert not (tmp_path / "out").exists() and not no_scratch(tmp_path)

    code, out, err = run_cli(capsys, "to-torch", tmp_path / "ckpt", tmp_path / "out", "--dtype", "float16",
                             "--clip-fp16")
    assert code == 0, err
    assert "clipped 2 tensor(s) to the float16 range" in out and "model.layers.1.mlp.gate_proj.weight" in out
    got = read_st(tmp_path / "out" / "model.safetensors")
    assert got["model.layers.1.mlp.gate_proj.weight"][5, 3] == 65504.0
    assert got["model.embed_tokens.weight"][0, 0] == -65504.0
    assert all(np.isfinite(v).all() and v.dtype == np.float16 for v in got.values())
    # Values in range are cast as torch does, unclipped.
    ref = params_to_torch(params, config)["model.layers.0.mlp.up_proj.weight"]
    assert np.array_equal(got["model.layers.0.mlp.up_proj.weight"], ref.astype(np.float16))
    # bfloat16 holds 70000 (no range error).
    assert run_cli(capsys, "to-torch", tmp_path / "ckpt", tmp_path / "bf", "--dtype", "bfloat16")[0] == 0


# ------------------------------------------------------------------------------------------- validation
def test_mapping_errors_are_listed_by_load_torch_and_the_cli(tmp_path, capsys):
    config = tiny("tiny3-moe")
    sd = params_to_torch(random_params(config), config)
    del sd["model.layers.1.mlp.gate.weight"]
    sd["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    sd["model.norm.weight"] = np.ones(5, np.float32)
    src = tmp_path / "src"
    src.mkdir()
    save_file(sd, os.fspath(src / "model.safetensors"))
    config.to_json(src / "config.json")
    with pytest.raises(MappingError) as info:
        load_torch(src)
    msg = str(info.value)
    assert "1 missing tensor(s): model.layers.1.mlp.gate.weight" in msg
    assert "1 unexpected tensor(s): model.layers.0.mlp.extra.weight" in msg
    assert "model.norm.weight: (5,) (expected (64,))" in msg
    code, _, err = run_cli(capsys, "to-jax", src, tmp_path / "out")
    assert_clean_error(code, err, "model.layers.1.mlp.gate.weight", "model.layers.0.mlp.extra.weight",
                       "model.norm.weight: (5,)")
    assert not (tmp_path / "out").exists() and not no_scratch(tmp_path)
    # A config that does not fit the tensors (wrong --config) is the same clean error.
    other = tmp_path / "other.json"
    tiny("tiny2").to_json(other)
    sd_ok = params_to_torch(random_params(config), config)
    save_file(sd_ok, os.fspath(src / "model.safetensors"))
    code, _, err = run_cli(capsys, "to-jax", src, tmp_path / "out", "--config", other)
    assert_clean_error(code, err, "q_norm")


def test_non_float_tensor_is_a_clear_error(tmp_path, capsys):
    config = tiny("tiny3")
    sd = params_to_torch(random_params(config), config)
    sd["model.layers.0.self_attn.rotary.inv_freq_ids"] = np.arange(8, dtype=np.int64)
    src = tmp_path / "src"
    src.mkdir()
    save_file(sd, os.fspath(src / "model.safetensors"))
    for argv in (("to-jax", src, tmp_path / "out"), ("inspect", src),
                 ("to-torch", src, tmp_path / "out")):
        code, _, err = run_cli(capsys, *argv)
        assert_clean_error(code, err, "model.layers.0.self_attn.rotary.inv_freq_ids", "int64",
                           os.fspath(src / "model.safetensors"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="inv_freq_ids"):
        load_torch(src)


@pytest.mark.torch
def test_truncated_and_corrupt_files_are_clear_errors(tmp_path, capsys):
    torch = pytest.importorskip("torch")

    config = tiny("tiny3")
    sd = params_to_torch(random_params(config), config)
    good = tmp_path / "good.safetensors"
    save_file(sd, os.fspath(good))
    data = good.read_bytes()
    cases = {}
    for name, blob in (("half.safetensors", data[: len(data) // 2]), ("head.safetensors", data[:6]),
                       ("cut-header.safetensors", data[:40]), ("empty.safetensors", b"")):
        (tmp_path / name).write_bytes(blob)
        cases[name] = tmp_path / name
    (tmp_path / "garbage.pth").write_bytes(np.random.RandomState(0).bytes(4096))
    cases["garbage.pth"] = tmp_path / "garbage.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "full.pth")
    blob = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(blob[: len(blob) * 2 // 3])
    cases["cut.pth"] = tmp_path / "cut.pth"
    for name, path in cases.items():
        code, _, err = run_cli(capsys, "to-jax", path, tmp_path / "out")
        assert_clean_error(code, err, os.fspath(path))
        code, _, err = run_cli(capsys, "inspect", path)
        assert_clean_error(code, err, os.fspath(path))
    assert not (tmp_path / "out").exists() and not no_scratch(tmp_path)
    code, _, err = run_cli(capsys, "to-jax", tmp_path / "nothing-here", tmp_path / "out")
    assert_clean_error(code, err, "no such file")
    (tmp_path / "weights.npz").write_bytes(b"x")
    assert_clean_error(*run_cli(capsys, "to-jax", tmp_path / "weights.npz", tmp_path / "out")[::2], "unsupported")


class Boom(Exception):
    """A simulated interruption (not one of the CLI's expected errors: it propagates)."""


def test_interrupted_to_torch_leaves_nothing(tmp_path, capsys, monkeypatch):
    config = tiny("tiny3-moe")
    params = random_params(config)
    save_checkpoint(tmp_path / "ckpt", params, config)
    writes = []

    def half_write(file, tensors, metadata=None):  # writes part of the file, then dies
        writes.append(file)
        file.write_bytes(b"\0" * 100)
        raise Boom("disk pulled")

    monkeypatch.setattr(convert.api, "write_safetensors", half_write)
    with pytest.raises(Boom):
        main(["to-torch", os.fspath(tmp_path / "ckpt"), os.fspath(tmp_path / "out")])
    assert writes and not (tmp_path / "out").exists()
    assert not no_scratch(tmp_path), no_scratch(tmp_path)

    # Dying after the weights (while writing config.json), replacing an existing OUT with --force: OUT stays.
    monkeypatch.undo()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")

    def boom_json(file, data):
        raise Boom("killed")

    monkeypatch.setattr(convert.api, "write_json", boom_json)
    with pytest.raises(Boom):
        main(["to-torch", os.fspath(tmp_path / "ckpt"), os.fspath(tmp_path / "out"), "--force"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    assert not no_scratch(tmp_path)

    # An OSError (disk full) is a clean error, same guarantees.
    def full(file, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert.api, "write_json", full)
    code, _, err = run_cli(capsys, "to-torch", tmp_path / "ckpt", tmp_path / "out2")
    assert_clean_error(code, err, "No space left on device")
    assert not (tmp_path / "out2").exists() and not no_scratch(tmp_path)


def test_interrupted_to_jax_leaves_nothing(tmp_path, capsys, monkeypatch):
    import minimind_jax.checkpoint as ckpt

    config = tiny("tiny3")
    src = save_torch(random_params(config), config, tmp_path / "src")
    real_save = ckpt._save_params
    calls = []

    def save_then_die(directory, params):  # the params are on disk, the config / manifest are not
        real_save(directory, params)
        calls.append(directory)
        raise Boom("killed mid-way")

    monkeypatch.setattr(ckpt, "_save_params", save_then_die)
    with pytest.raises(Boom):
        main(["to-jax", os.fspath(src), os.fspath(tmp_path / "jax")])
    assert calls and not (tmp_path / "jax").exists()
    assert not no_scratch(tmp_path), no_scratch(tmp_path)

    # Over an existing checkpoint with --force: the old one survives the interruption intact.
    monkeypatch.undo()
    assert run_cli(capsys, "to-jax", src, tmp_path / "jax")[0] == 0
    before = flat(load_checkpoint(tmp_path / "jax", as_numpy=True)[1])
    monkeypatch.setattr(ckpt, "_save_params", save_then_die)
    with pytest.raises(Boom):
        main(["to-jax", os.fspath(src), os.fspath(tmp_path / "jax"), "--force", "--dtype", "bfloat16"])
    after = flat(load_checkpoint(tmp_path / "jax", as_numpy=True)[1])
    assert all(after[k].dtype == np.float32 and after[k].tobytes() == before[k].tobytes() for k in before)
    assert not no_scratch(tmp_path)


def test_failed_final_rename_restores_the_previous_out(tmp_path, capsys, monkeypatch):
    """With --force the old OUT is moved aside first; if the new one cannot be renamed in, the old comes back."""
    config = tiny("tiny3")
    src = save_torch(random_params(config), config, tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    real_replace = os.replace

    def failing_replace(a, b):
        if os.path.basename(os.fspath(a)).startswith(".out.tmp-"):
            raise OSError(18, "Invalid cross-device link")
        return real_replace(a, b)

    monkeypatch.setattr(convert.io.os, "replace", failing_replace)
    code, _, err = run_cli(capsys, "to-torch", src, tmp_path / "out", "--force")
    assert_clean_error(code, err, "Invalid cross-device link")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    assert not no_scratch(tmp_path), no_scratch(tmp_path)


def test_tokenizer_is_copied(tmp_path, capsys):
    config = tiny("tiny3")
    save_checkpoint(tmp_path / "ckpt", random_params(config), config)
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tok / name).write_text(json.dumps({"name": name}))
    code, out, err = run_cli(capsys, "to-torch", tmp_path / "ckpt", tmp_path / "out", "--tokenizer", tok,
                             "--dtype", "bfloat16")
    assert code == 0, err
    assert "target dtype: bfloat16 (requested)" in out
    assert re.search(r"^cast 24 tensor\(s\) float32 -> bfloat16", out, re.M)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_text() == (tok / name).read_text()
    code, _, err = run_cli(capsys, "to-torch", tmp_path / "ckpt", tmp_path / "out2", "--tokenizer", tmp_path / "src")
    assert_clean_error(code, err, "tokenizer.json")
    assert not (tmp_path / "out2").exists() and not no_scratch(tmp_path)


def test_existing_out_needs_force(tmp_path, capsys):
    config = tiny("tiny3")
    src = save_torch(random_params(config), config, tmp_path / "src")
    # to-torch: refused without --force (nothing touched), replaced with it.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    code, _, err = run_cli(capsys, "to-torch", src, tmp_path / "out")
    assert_clean_error(code, err, "--force", os.fspath(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    code, _, err = run_cli(capsys, "to-torch", src, tmp_path / "out", "--force", "--dtype", "bfloat16")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert {v.dtype for v in read_st(tmp_path / "out" / "model.safetensors").values()} == {
        np.dtype(ml_dtypes.bfloat16)}
    assert not no_scratch(tmp_path)
    # to-jax: the same.
    assert run_cli(capsys, "to-jax", src, tmp_path / "jax")[0] == 0
    code, _, err = run_cli(capsys, "to-jax", src, tmp_path / "jax", "--dtype", "bfloat16")
    assert_clean_error(code, err, "--force")
    assert {x.dtype for x in flat(load_checkpoint(tmp_path / "jax", as_numpy=True)[1]).values()} == {
        np.dtype(np.float32)}
    code, _, err = run_cli(capsys, "to-jax", src, tmp_path / "jax", "--dtype", "bfloat16", "--force")
    assert code == 0, err
    assert {x.dtype for x in flat(load_checkpoint(tmp_path / "jax", as_numpy=True)[1]).values()} == {
        np.dtype(ml_dtypes.bfloat16)}
    assert not no_scratch(tmp_path)


# ------------------------------------------------------------------------------------------- MiniMind .pth
def _trainer_pth(path, params, config):
    """As MiniMind's trainer saves: half precision, the tied lm_head.weight included."""
    torch = pytest.importorskip("torch")

    state = params_to_torch(params, config, include_lm_head=True)
    assert "lm_head.weight" in state
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)).half() for k, v in state.items()}, path)


def _fp16_rounded(params):
    return jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), params)


@pytest.mark.torch
def test_trainer_pth_with_config(tmp_path, capsys):
    config = tiny("tiny3")
    params = random_params(config)
    _trainer_pth(tmp_path / "full_sft_64.pth", params, config)
    config.to_json(tmp_path / "minimind_config.json")
    code, out, err = run_cli(capsys, "to-jax", tmp_path / "full_sft_64.pth", tmp_path / "jax", "--config",
                             tmp_path / "minimind_config.json")
    assert code == 0, err
    assert f"config: --config {tmp_path / 'minimind_config.json'}" in out
    assert "stored dtypes: float16 x25" in out and "target dtype: float32 (requested)" in out
    assert re.search(r"^cast 25 tensor\(s\) float16 -> float32: ", out, re.M)  # the stored lm_head copy too
    cfg, loaded = load_checkpoint(tmp_path / "jax", as_numpy=True)
    assert cfg == config
    expected = _fp16_rounded(params)
    assert_params_equal(loaded, expected)
    np.testing.assert_array_equal(logits(cfg, loaded), logits(config, expected))
    # inspect sees the duplicated head; to-jax --dtype auto keeps float16 (the dtype it is stored in).
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "full_sft_64.pth")
    assert code == 0 and "embeddings: tied (lm_head.weight duplicates model.embed_tokens.weight)" in out
    code, out, err = run_cli(capsys, "to-jax", tmp_path / "full_sft_64.pth", tmp_path / "jax16", "--config",
                             tmp_path / "minimind_config.json", "--dtype", "auto")
    assert code == 0, err
    assert "no casts" in out
    assert {x.dtype for x in flat(load_checkpoint(tmp_path / "jax16", as_numpy=True)[1]).values()} == {
        np.dtype(np.float16)}


@pytest.mark.torch
@pytest.mark.parametrize("preset,overrides,assumption", [
    ("tiny2", dict(num_attention_heads=8), "num_attention_heads=8"),
    ("tiny3-moe", dict(num_experts_per_tok=1), "num_experts_per_tok=1"),
])
def test_trainer_pth_without_config_is_inferred(preset, overrides, assumption, tmp_path, capsys):
    config = tiny(preset, **overrides)
    params = random_params(config)
    folder = tmp_path / "run"
    folder.mkdir()
    _trainer_pth(folder / "pretrain.pth", params, config)
    code, out, err = run_cli(capsys, "to-jax", folder / "pretrain.pth", tmp_path / "jax")
    assert code == 0, err
    assert "config: inferred from tensor shapes" in out
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert any(assumption in n and "--config" in n for n in notes), notes
    cfg, loaded = load_checkpoint(tmp_path / "jax", as_numpy=True)
    # Shapes fix the architecture; max_position_embeddings (not in any shape) takes the default.
    assert cfg.replace(max_position_embeddings=config.max_position_embeddings) == config
    expected = _fp16_rounded(params)
    assert_params_equal(loaded, expected)
    if preset == "tiny2":
        np.testing.assert_allclose(logits(cfg, loaded), logits(config, expected), atol=1e-5, rtol=0)
    # A directory holding the single .pth is the same source.
    cfg2, loaded2 = load_torch(folder)
    assert cfg2 == cfg
    assert_params_equal(loaded2, expected)


@pytest.mark.torch
# ------------------------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("preset,tied,cls", [("tiny3", True, "Qwen3ForCausalLM"),
                                             ("tiny3-moe", True, "Qwen3MoeForCausalLM"),
                                             ("tiny2", True, "LlamaForCausalLM"),
                                             ("tiny2", False, "LlamaForCausalLM")])
def test_hf_export_loads_in_transformers_with_same_logits(preset, tied, cls, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = tiny(preset, tie_word_embeddings=tied)
    params = random_params(config)
    save_checkpoint(tmp_path / "ckpt", params, config)
    code, out, err = run_cli(capsys, "to-torch", tmp_path / "ckpt", tmp_path / "hf", "--format", "hf")
    assert code == 0, err
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(model).__name__ == cls
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings == tied
    assert ("lm_head.weight" in read_st(tmp_path / "hf" / "model.safetensors")) == (not tied)
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(IDS).long()).logits.numpy()
    ours = logits(config, params)
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()
    # What transformers itself saves converts back to exactly the same params.
    model.save_pretrained(tmp_path / "resaved")
    cfg, back = load_torch(tmp_path / "resaved")
    assert cfg == config
    assert_params_equal(back, params)
    # transformers 5 records the dtype as "dtype" (no "torch_dtype"): --dtype auto follows it.
    model.to(torch.bfloat16).save_pretrained(tmp_path / "resaved16")
    report = convert.Report()
    _, back16 = load_torch(tmp_path / "resaved16", dtype="auto", report=report)
    assert report.dtype == "bfloat16" and "no casts" in report.lines()[-1]
    assert_params_equal(back16, jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params))


def test_minimind2_moe_to_hf_points_to_minimind_format(tmp_path, capsys):
    config = tiny("tiny2-moe")
    save_checkpoint(tmp_path / "ckpt", random_params(config), config)
    code, _, err = run_cli(capsys, "to-torch", tmp_path / "ckpt", tmp_path / "hf", "--format", "hf")
    assert_clean_error(code, err, "--format minimind", "minimind2 MoE")
    assert not (tmp_path / "hf").exists() and not no_scratch(tmp_path)
    with pytest.raises(ValueError, match="--format minimind"):
        save_torch(random_params(config), config, tmp_path / "hf", format="hf")


def test_sharded_hf_directory_loads(tmp_path, capsys):
    config = tiny("tiny3-moe")
    params = random_params(config)
    single = save_torch(params, config, tmp_path / "single", format="hf", dtype="bfloat16")
    tensors = read_st(single / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, os.fspath(sharded / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    (sharded / "config.json").write_text((single / "config.json").read_text())

    cfg, loaded = load_torch(sharded, dtype="auto")
    assert cfg == config
    _, from_single = load_torch(single, dtype="auto")
    assert_params_equal(loaded, from_single)
    code, out, err = run_cli(capsys, "to-jax", sharded, tmp_path / "jax", "--dtype", "auto")
    assert code == 0, err
    assert "target dtype: bfloat16 (auto: the source config's torch_dtype)" in out
    assert run_cli(capsys, "to-torch", tmp_path / "jax", tmp_path / "back", "--format", "hf",
                   "--dtype", "bfloat16")[0] == 0
    assert_tensors_identical(tensors, read_st(tmp_path / "back" / "model.safetensors"))
    code, out, _ = run_cli(capsys, "inspect", sharded)
    assert code == 0 and f"{len(names)} tensors" in out
    # A shard gone missing is a clean error naming it.
    (sharded / "model-00002-of-00002.safetensors").unlink()
    code, _, err = run_cli(capsys, "to-jax", sharded, tmp_path / "jax2")
    assert_clean_error(code, err, "model-00002-of-00002.safetensors")


# ------------------------------------------------------------------------------------------- inspect
_ROW = re.compile(r"^(\S+)\s+(\([\d, ]*\))\s+(\w+)\s+(\S+)$")


def _table(out):
    rows = {}
    for line in out.splitlines():
        m = _ROW.match(line)
        if m and m.group(1) != "name":
            rows[m.group(1)] = (m.group(2), m.group(3), float(m.group(4)))
    return rows


def test_inspect_table_summary_and_tied_embeddings(tmp_path, capsys):
    config = tiny("tiny3-moe")
    src, sd = _mixed_moe_source(tmp_path, config)
    code, out, err = run_cli(capsys, "inspect", src)
    assert code == 0, err
    tensors = read_st(src / "model.safetensors")
    rows = _table(out)
    assert sorted(rows) == sorted(tensors)
    for name, arr in tensors.items():
        shape, dtype, peak = rows[name]
        assert shape == str(tuple(arr.shape)) and dtype == np.dtype(arr.dtype).name, name
        assert peak == pytest.approx(float(np.abs(arr.astype(np.float32)).max()), rel=1e-3), name
    assert re.search(r"^\s+bfloat16\s+20 tensors", out, re.M) and re.search(r"^\s+float32\s+24 tensors", out, re.M)
    assert re.search(r"^\s+total\s+44 tensors", out, re.M)
    assert "embeddings: tied (no lm_head.weight)" in out
    assert "no warnings" in out

    untied = tiny("tiny3", tie_word_embeddings=False)
    save_torch(random_params(untied), untied, tmp_path / "untied")
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "untied" / "model.safetensors")
    assert code == 0 and "embeddings: untied (lm_head.weight differs from the embedding)" in out
    assert "lm_head.weight" in _table(out)

    # This project's checkpoints are inspected too.
    save_checkpoint(tmp_path / "ckpt", random_params(untied), untied)
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "ckpt")
    assert code == 0 and "minimind-jax checkpoint" in out and "untied (lm_head present)" in out
    assert "layers_1/mlp/down_proj/kernel" in _table(out)


def test_inspect_warns_about_float16_range_and_compares_precision(tmp_path, capsys):
    config = tiny("tiny3")
    params = random_params(config)
    src = save_torch(params, config, tmp_path / "src")
    code, out, err = run_cli(capsys, "inspect", src, "--compare-precision")
    assert code == 0, err
    assert re.search(r"^  bf16: mean \|logit diff\| \S+, max \S+, argmax agreement \S+%$", out, re.M), out
    assert re.search(r"^  fp16: mean \|logit diff\| \S+, max \S+, argmax agreement \S+%$", out, re.M), out
    assert "WARNING" not in out

    sd = params_to_torch(params, config)
    big = sd["model.layers.0.mlp.down_proj.weight"].copy()
    big[1, 2] = 70000.0
    sd["model.layers.0.mlp.down_proj.weight"] = big
    save_file(sd, os.fspath(tmp_path / "big.safetensors"))
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "big.safetensors")
    assert code == 0
    warning = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert len(warning) == 1 and "float16 range" in warning[0]
    assert "model.layers.0.mlp.down_proj.weight (7e+04)" in warning[0]
    assert _table(out)["model.layers.0.mlp.down_proj.weight"][2] == 70000.0


# ------------------------------------------------------------------------------------------- load_torch API
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_load_torch_reproduces_logits(preset, tmp_path):
    config = tiny(preset)
    params = random_params(config)
    src = save_torch(params, config, tmp_path / "src", format="minimind", dtype="float32")
    report = convert.Report()
    cfg, loaded = load_torch(src, report=report)
    assert cfg == config and report.dtype == "float32" and "no casts" in report.lines()[-1]
    assert all(isinstance(x, np.ndarray) for x in flat(loaded).values())
    assert_params_equal(loaded, params)
    np.testing.assert_array_equal(logits(cfg, loaded), logits(config, params))

    # Stored bfloat16: dtype=None is float32 whatever is stored; values are the bf16 ones.
    src16 = save_torch(params, config, tmp_path / "bf16", dtype="bfloat16")
    _, up = load_torch(src16)
    want = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    assert_params_equal(up, want)

    if preset == "tiny3-moe":  # the scanned layout gives the same model
        cfg_s, scanned = load_torch(src, scan_layers=True)
        assert cfg_s == config.replace(scan_layers=True)
        assert "layers" in scanned and not any(k.startswith("layers_") for k in scanned)
        for path, x in flat(scanned["layers"]).items():
            for i in range(config.num_hidden_layers):
                np.testing.assert_array_equal(x[i], flat(params[f"layers_{i}"])[path])
        np.testing.assert_allclose(logits(cfg_s, scanned), logits(config, params), atol=1e-5, rtol=0)
        # ... and exports back to the same tensors.
        save_torch(scanned, cfg_s, tmp_path / "back")
        assert_tensors_identical(read_st(src / "model.safetensors"), read_st(tmp_path / "back/model.safetensors"))


# ------------------------------------------------------------------------------------------- one copy at a time
def test_safetensors_reader_equals_the_library(tmp_path):
    rng = np.random.RandomState(0)
    sd = {"a": rng.randn(3, 5).astype(np.float32), "b": rng.randn(7).astype(ml_dtypes.bfloat16),
          "c": rng.randn(2, 3, 4).astype(np.float16), "d": np.zeros((0, 4), np.float32)}
    save_file(sd, os.fspath(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    got = convert.io.read_tensors(tmp_path / "x.safetensors")
    assert_tensors_identical(read_st(tmp_path / "x.safetensors"), got)
    assert all(x.flags.c_contiguous and x.flags.writeable for x in got.values())  # not views of a mmap


def test_cast_all_in_place_replaces_each_entry():
    tensors = {"a": np.full(3, 1.5, np.float32), "b": np.full(2, 2.5, np.float16),
               "c": np.ones(2, ml_dtypes.bfloat16)}
    log = CastLog()
    assert cast_all(tensors, "bfloat16", log, in_place=True) is tensors
    assert {k: v.dtype for k, v in tensors.items()} == dict.fromkeys("abc", np.dtype(ml_dtypes.bfloat16))
    assert log.casts == {("float32", "bfloat16"): ["a"], ("float16", "bfloat16"): ["b"]}
    assert tensors["a"].astype(np.float32).tolist() == [1.5] * 3


@pytest.mark.parametrize("scan", [False, True], ids=["per-layer", "scanned"])
@pytest.mark.parametrize("preset", ["tiny3-moe", "tiny2-moe"])
def test_torch_to_params_consumes_the_state_dict(preset, scan):
    """consume=True empties the state dict (each tensor dropped once placed) and gives the same params;
    every leaf is C-contiguous (orbax and the checksum then read each in place, without a copy)."""
    config = tiny(preset, scan_layers=scan)
    sd = params_to_torch(random_params(config.replace(scan_layers=False)), config.replace(scan_layers=False),
                         include_lm_head=True)
    want = torch_to_params(dict(sd), config)
    source = dict(sd)
    got = torch_to_params(source, config, consume=True)
    assert source == {}
    assert_params_equal(got, want)
    assert all(x.flags.c_contiguous for x in flat(got).values())
    assert all(x.flags.c_contiguous for x in flat(want).values())


def test_stacking_tensors_of_two_dtypes_is_an_error_not_a_cast():
    config = tiny("tiny3-moe")
    sd = params_to_torch(random_params(config), config)
    name = "model.layers.1.mlp.experts.1.up_proj.weight"
    sd[name] = sd[name].astype(ml_dtypes.bfloat16)
    with pytest.raises(MappingError, match=r"experts\.1\.up_proj\.weight is bfloat16 but "
                                           r"model\.layers\.1\.mlp\.experts\.0\.up_proj\.weight.* is float32"):
        torch_to_params(sd, config)
