"""LoRA as a pure function of (base params, adapter params): zero-init identity, merge == adapted, targets,
MiniMind's adapter files both ways, and scripts/merge_lora.py (tiny models; no training here: the training
side is in tests/test_stages.py)."""

import jax
import numpy as np
import pytest
from _util import cached_params, random_ids, tiny

from minimind_jax import lora
from minimind_jax.model.transformer import MiniMindLM


def _params(cfg):
    return jax.tree.map(np.asarray, cached_params(cfg))


def _trained_like(adapters, seed=1, std=0.05):
    """Adapters as training leaves them: B no longer zero."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + np.float32(std) * rng.standard_normal(x.shape).astype(np.float32), adapters)


@pytest.mark.parametrize("preset, scan", [("tiny3", False), ("tiny3", True), ("tiny3-moe", False), ("tiny2", True)])
def test_zero_init_is_the_base_and_merged_equals_adapted(preset, scan):
    cfg = tiny(preset, scan_layers=scan)
    base = _params(cfg)
    lc = lora.LoraConfig(rank=4, alpha=8.0, targets="all")  # scale 2: alpha is applied
    adapters = lora.init_adapters(cfg, lc, seed=0)
    for _, ab in lora._leaves(adapters):
        assert not np.any(ab["lora_B"]) and np.std(ab["lora_A"]) == pytest.approx(0.02, rel=0.2)
    model = MiniMindLM(cfg, "fp32")
    ids = random_ids((2, 12))
    ref = np.asarray(model.apply({"params": base}, ids).logits)
    zero = np.asarray(lora.adapted_apply(model, base, adapters, lc.scale, ids).logits)
    np.testing.assert_array_equal(zero, ref)  # B = 0: exactly the base model

    trained = _trained_like(adapters)
    adapted = np.asarray(lora.adapted_apply(model, base, trained, lc.scale, ids).logits)
    assert np.max(np.abs(adapted - ref)) > 1e-2  # the adapters do change the model
    merged = np.asarray(model.apply({"params": lora.merge(base, trained, lc.scale)}, ids).logits)
    np.testing.assert_allclose(merged, adapted, atol=1e-5, rtol=0)  # fp32: W x + s B A x == (W + s A B) x
    # the base tree is never modified by injecting or merging
    jax.tree.map(np.testing.assert_array_equal, base, _params(cfg))


def test_targets():
    cfg = tiny("tiny3")  # hidden 64 = 4 heads x 16: q_proj and o_proj are square, k/v (32) and the MLP are not
    assert {p[-2] for p in lora.target_paths(cfg, "minimind")} == {"q_proj", "o_proj"}
    assert len(lora.target_paths(cfg, "minimind")) == 2 * cfg.num_hidden_layers
    assert {p[-2] for p in lora.target_paths(cfg, "attention")} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert {p[-2] for p in lora.target_paths(cfg, "q_proj, mlp")} == {"q_proj", "gate_proj", "up_proj", "down_proj"}
    moe = tiny("tiny3-moe")
    experts = lora.target_paths(moe, "experts")
    assert experts and all(p[-2] == "experts" for p in experts)
    assert not any(p[-2] == "experts" for p in lora.target_paths(moe, "minimind"))  # hidden -> moe_inter: not square
    with pytest.raises(lora.LoraError, match="unknown 'qproj'"):
        lora.target_paths(cfg, "qproj")
    with pytest.raises(lora.LoraError, match=r"no projection of this model \(minimind3, hidden 64, dense\) matches"):
        lora.target_paths(tiny("tiny3", head_dim=8), "minimind")  # q: 64 -> 32, o: 32 -> 64
    with pytest.raises(lora.LoraError, match="no projection"):
        lora.target_paths(cfg, "experts")  # a dense model has no experts


def test_minimind_adapter_files_both_ways(tmp_path):
    torch = pytest.importorskip("torch")
    cfg = tiny("tiny3")
    base = _params(cfg)
    lc = lora.LoraConfig(rank=4)  # MiniMind: alpha = rank, no scaling
    adapters = _trained_like(lora.init_adapters(cfg, lc, seed=0))
    out = lora.save_adapters(tmp_path / "adapter", adapters, cfg, lc, pth="lora_identity_64.pth")
    sd = torch.load(out / "lora_identity_64.pth", weights_only=True)
    modules = [f"model.layers.{i}.self_attn.{m}" for i in range(cfg.num_hidden_layers) for m in ("q_proj", "o_proj")]
    assert set(sd) == {f"{m}.lora.{p}.weight" for m in modules for p in "AB"}
    assert all(v.dtype == torch.float16 for v in sd.values())
    a, b = sd["model.layers.1.self_attn.q_proj.lora.A.weight"], sd["model.layers.1.self_attn.q_proj.lora.B.weight"]
    assert tuple(a.shape) == (4, 64) and tuple(b.shape) == (64, 4)  # nn.Linear(in, r).weight, nn.Linear(r, out).weight

    # MiniMind's forward, layer1(x) + B(A(x)), with the exported tensors == our adapted projection
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    w = base["layers_1"]["self_attn"]["q_proj"]["kernel"]  # (in, out)
    xt = torch.from_numpy(x)
    torch_y = (xt @ torch.from_numpy(np.array(w)) + (xt @ a.float().T) @ b.float().T).numpy()
    back16, lc16 = lora.load_adapters(out / "lora_identity_64.pth", cfg)
    ab = back16["layers_1"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_allclose(x @ w + (x @ ab["lora_A"]) @ ab["lora_B"], torch_y, atol=1e-5)
    assert (lc16.rank, lc16.scale) == (4, 1.0)
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, atol=1e-3), back16, adapters)  # float16 rounding
    # the adapter directory keeps float32 exactly, and its rank / alpha / targets
    back, lc_back = lora.load_adapters(out, cfg)
    jax.tree.map(np.testing.assert_array_equal, back, adapters)
    assert lc_back == lora.LoraConfig(rank=4, alpha=4, targets="minimind")
    # a scanned model reads the same file
    scanned, _ = lora.load_adapters(out, tiny("tiny3", scan_layers=True))
    np.testing.assert_array_equal(scanned["layers"]["self_attn"]["q_proj"]["kernel"]["lora_A"][1],
                                  back["layers_1"]["self_attn"]["q_proj"]["kernel"]["lora_A"])

    # DDP's "module." prefix is accepted; bad files are named with the key
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pth")
    lora.load_adapters(tmp_path / "ddp.pth", cfg)
    missing = dict(sd)
    del missing["model.layers.0.self_attn.o_proj.lora.B.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(lora.LoraError, match=r"missing.pth: model.layers.0.self_attn.o_proj.lora.B.weight is missing"):
        lora.load_adapters(tmp_path / "missing.pth", cfg)
    torch.save({**sd, "model.layers.7.self_attn.q_proj.lora.A.weight": a}, tmp_path / "extra.pth")
    with pytest.raises(lora.LoraError, match=r"'model.layers.7.self_attn.q_proj.lora.A.weight'.*no adaptable"):
        lora.load_adapters(tmp_path / "extra.pth", cfg)


@pytest.mark.parametrize("fmt", ["jax", "minimind"])
def test_merge_lora_script_exports_the_adapted_model(tmp_path, fmt):
    import importlib.util
    from pathlib import Path

    from minimind_jax.checkpoint import save_checkpoint

    cfg = tiny("tiny3")
    base = _params(cfg)
    save_checkpoint(tmp_path / "base", base, cfg)
    lc = lora.LoraConfig(rank=4, alpha=2.0, targets="attention")
    adapters = _trained_like(lora.init_adapters(cfg, lc, seed=3))
    lora.save_adapters(tmp_path / "adapter", adapters, cfg, lc)
    script = Path(__file__).resolve().parents[1] / "scripts" / "merge_lora.py"
    spec = importlib.util.spec_from_file_location("merge_lora", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "merged"
    assert mod.main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                     "--format", fmt]) == 0
    if fmt == "jax":
        from minimind_jax.checkpoint import load_checkpoint

        mcfg, merged = load_checkpoint(out, as_numpy=True)
    else:
        import convert

        mcfg, merged = convert.load_torch(out)
    model = MiniMindLM(cfg, "fp32")
    ids = random_ids((2, 10))
    adapted = np.asarray(lora.adapted_apply(model, base, adapters, lc.scale, ids).logits)
    got = np.asarray(MiniMindLM(mcfg, "fp32").apply({"params": merged}, ids).logits)
    np.testing.assert_allclose(got, adapted, atol=1e-5, rtol=0)
    assert mod.main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "nothing"), "--out",
                     str(tmp_path / "x")]) == 2
