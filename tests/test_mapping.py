"""The torch <-> params name mapping (``convert/mapping.py``).

* bitwise round trips both ways, every tiny preset, both layouts, float32 / bfloat16 / float16;
* the exported names, shapes and transposes, checked against an independent derivation from the model's
  own param tree (and the import checked against the model's param tree for both layouts);
* compatibility with real ``transformers`` models: Qwen3 / Llama state-dict names, shapes and logits,
  and a Qwen3-MoE checkpoint written from our params that ``from_pretrained`` loads without missing keys;
* every error path raises ``MappingError`` naming the problem;
* value-correctness: imported params (across layouts) give the same logits as the originals.
"""

import functools
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _util import VOCAB, random_ids, tiny

from convert.mapping import (MappingError, expected_param_shapes, expected_torch_shapes, params_to_torch,
                             torch_to_params)
from minimind_jax import MiniMindLM, ModelConfig

PRESETS = ["tiny3", "tiny3-moe", "tiny2", "tiny2-moe"]
DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]
DTYPE_IDS = ["float32", "bfloat16", "float16"]


# ---------------------------------------------------------------------------------------------- helpers
@functools.partial(jax.jit, static_argnums=0)
def _logits(config, params, ids):
    return MiniMindLM(config).apply({"params": params}, ids).logits


def _config(name: str, scan: bool = False, **overrides) -> ModelConfig:
    return tiny(name, scan_layers=scan, **overrides)


@functools.lru_cache(maxsize=None)
def _base_params(name: str):
    """Non-scanned float32 numpy params of a preset with the model's exact tree (from ``jax.eval_shape`` of its
    init, so nothing is compiled) and random values: matrices N(0, 0.05^2), norm weights 1 + N(0, 0.1^2), so no
    two tensors are equal (the model's init would set every norm to ones)."""
    rng = np.random.RandomState(0)
    flat = {}
    for path, shape in _model_param_shapes(_config(name)).items():
        noise = rng.standard_normal(shape).astype(np.float32)
        flat[path] = 1 + 0.1 * noise if path.endswith("norm/weight") else 0.05 * noise
    return _unflatten(flat)


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        *parents, last = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree


def _scan_np(params, config: ModelConfig):
    """Non-scanned -> scanned layout with numpy (keeps dtypes, e.g. ml_dtypes.bfloat16)."""
    layers = [params[f"layers_{i}"] for i in range(config.num_hidden_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return out


def _params(name: str, scan: bool, dtype=np.float32):
    params = jax.tree.map(lambda x: x.astype(dtype), _base_params(name))
    return _scan_np(params, _config(name)) if scan else params


def _random_state_dict(config: ModelConfig, dtype=np.float32, seed: int = 0, include_lm_head: bool = False):
    rng = np.random.RandomState(seed)
    sd = {k: rng.standard_normal(shape).astype(dtype)
          for k, shape in expected_torch_shapes(config, include_lm_head).items()}
    if config.tie_word_embeddings and "lm_head.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].copy()
    return sd


def _flat(tree) -> dict[str, object]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_identical(a, b):
    """Same keys; every array the same shape, dtype and bytes (bitwise: -0.0 != 0.0, NaN payloads count)."""
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype, (k, x.dtype, y.dtype)
        assert x.shape == y.shape, (k, x.shape, y.shape)
        assert np.array_equal(x, y), k
        assert np.ascontiguousarray(x).tobytes() == np.ascontiguousarray(y).tobytes(), k


@functools.lru_cache(maxsize=None)
def _model_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The model's own param tree (path -> shape), traced without compiling."""
    import flax.linen as nn

    abstract = jax.eval_shape(MiniMindLM(config).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    return {k: tuple(v.shape) for k, v in _flat(nn.unbox(abstract["params"])).items()}


def _reference_export(params) -> dict[str, np.ndarray]:
    """An independent derivation of the torch state dict from a non-scanned param tree.

    Walks the model's actual leaves: ``layers_{i}/a/b/kernel`` -> ``model.layers.{i}.a.b.weight`` transposed,
    the router ``mlp/gate`` -> ``mlp.gate.weight`` transposed, each stacked expert bank leaf ``mlp/{bank}/{proj}``
    -> one ``mlp.{bank}.{e}.{proj}.weight`` per expert, transposed; norms and the embedding as they are.
    """
    out = {}
    for path, leaf in _flat(params).items():
        leaf = np.asarray(leaf)
        parts = path.split("/")
        if parts == ["embed_tokens"]:
            out["model.embed_tokens.weight"] = leaf
        elif parts == ["norm", "weight"]:
            out["model.norm.weight"] = leaf
        elif parts == ["lm_head"]:
            out["lm_head.weight"] = leaf.T
        elif parts[0].startswith("layers_"):
            prefix = "model.layers." + parts[0][len("layers_"):]
            rest = parts[1:]
            if rest[-1] == "kernel":
                out[".".join([prefix, *rest[:-1], "weight"])] = leaf.T
            elif rest == ["mlp", "gate"]:
                out[f"{prefix}.mlp.gate.weight"] = leaf.T
            elif rest[:2] in (["mlp", "experts"], ["mlp", "shared_experts"]):
                for e in range(leaf.shape[0]):
                    out[f"{prefix}.mlp.{rest[1]}.{e}.{rest[2]}.weight"] = leaf[e].T
            else:
                assert rest[-1] == "weight", path
                out[".".join([prefix, *rest])] = leaf
        else:
            raise AssertionError(f"unknown param {path}")
    return out


# ---------------------------------------------------------------------------------------------- 1. round trips
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scan", [False, True], ids=["plain", "scan"])
@pytest.mark.parametrize("name", PRESETS)
def test_params_torch_params_round_trip_is_bitwise(name, scan, dtype):
    config = _config(name, scan)
    params = _params(name, scan, dtype)
    sd = params_to_torch(params, config)
    for k, v in sd.items():
        assert isinstance(v, np.ndarray) and v.dtype == np.dtype(dtype), (k, type(v), v.dtype)
        assert v.flags.c_contiguous, k
    back = torch_to_params(sd, config)
    _assert_identical(back, params)
    # ... and the imported tree is exactly the model's param tree for this layout.
    assert {k: tuple(v.shape) for k, v in _flat(back).items()} == _model_param_shapes(config)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scan", [False, True], ids=["plain", "scan"])
@pytest.mark.parametrize("name", PRESETS)
def test_torch_params_torch_round_trip_is_bitwise(name, scan, dtype):
    config = _config(name, scan)
    sd = _random_state_dict(config, dtype)
    params = torch_to_params(sd, config)
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == np.dtype(dtype)
    assert {k: tuple(v.shape) for k, v in _flat(params).items()} == _model_param_shapes(config)
    _assert_identical(params_to_torch(params, config), sd)


@pytest.mark.parametrize("name", PRESETS)
def test_scanned_and_plain_layouts_export_the_same_state_dict(name):
    """Layer i of the scanned stack is exported as ``model.layers.{i}`` (not a shuffled or reversed order)."""
    plain = _base_params(name)
    _assert_identical(params_to_torch(_scan_np(plain, _config(name)), _config(name, True)),
                      params_to_torch(plain, _config(name)))
    # Distinct layers really are distinct, so the check above can tell them apart.
    sd = params_to_torch(plain, _config(name))
    assert not np.array_equal(sd["model.layers.0.input_layernorm.weight"], sd["model.layers.1.input_layernorm.weight"])


# ---------------------------------------------------------------------------------------------- 2. names / shapes
@pytest.mark.parametrize("name", PRESETS)
def test_exported_names_shapes_and_transposes(name):
    config = _config(name)
    params = _base_params(name)
    sd = params_to_torch(params, config)
    assert {k: v.shape for k, v in sd.items()} == expected_torch_shapes(config)
    # Independent oracle: every leaf of the model's param tree, renamed and transposed by hand.
    _assert_identical(sd, _reference_export(params))

    h, layer = config.hidden_size, params["layers_1"]
    assert "lm_head.weight" not in sd  # tied by default
    assert sd["model.embed_tokens.weight"].shape == (VOCAB, h)
    q = sd["model.layers.1.self_attn.q_proj.weight"]
    assert q.shape == (config.num_attention_heads * config.head_dim, h)  # torch Linear: (out, in)
    np.testing.assert_array_equal(q, layer["self_attn"]["q_proj"]["kernel"].T)
    np.testing.assert_array_equal(sd["model.layers.1.self_attn.k_proj.weight"],
                                  layer["self_attn"]["k_proj"]["kernel"].T)
    assert sd["model.layers.1.self_attn.k_proj.weight"].shape == (config.num_key_value_heads * config.head_dim, h)

    norm_names = {f"model.layers.{i}.self_attn.{n}.weight" for i in range(2) for n in ("q_norm", "k_norm")}
    if config.generation == "minimind3":
        assert config.qk_norm and norm_names <= set(sd)
        np.testing.assert_array_equal(sd["model.layers.1.self_attn.q_norm.weight"],
                                      layer["self_attn"]["q_norm"]["weight"])
        assert sd["model.layers.0.self_attn.k_norm.weight"].shape == (config.head_dim,)
    else:
        assert not config.qk_norm and not any("_norm." in k and "self_attn" in k for k in sd)

    if not config.use_moe:
        gate = sd["model.layers.1.mlp.gate_proj.weight"]
        assert gate.shape == (config.intermediate_size, h)
        np.testing.assert_array_equal(gate, layer["mlp"]["gate_proj"]["kernel"].T)
        np.testing.assert_array_equal(sd["model.layers.1.mlp.down_proj.weight"], layer["mlp"]["down_proj"]["kernel"].T)
        assert not any(".experts." in k or ".mlp.gate.weight" in k for k in sd)
        return
    assert not any(k.endswith("mlp.gate_proj.weight") for k in sd)
    router = sd["model.layers.1.mlp.gate.weight"]
    assert router.shape == (config.num_experts, h)
    np.testing.assert_array_equal(router, layer["mlp"]["gate"].T)
    inter = config.moe_intermediate_size
    for e in range(config.num_experts):
        for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            t = sd[f"model.layers.1.mlp.experts.{e}.{proj}.weight"]
            assert t.shape == shape
            np.testing.assert_array_equal(t, layer["mlp"]["experts"][proj][e].T)
    assert f"model.layers.0.mlp.experts.{config.num_experts}.gate_proj.weight" not in sd
    shared = sorted(k for k in sd if ".shared_experts." in k)
    assert len(shared) == 3 * config.num_hidden_layers * config.n_shared_experts
    for s in range(config.n_shared_experts):
        np.testing.assert_array_equal(sd[f"model.layers.0.mlp.shared_experts.{s}.up_proj.weight"],
                                      params["layers_0"]["mlp"]["shared_experts"]["up_proj"][s].T)


def test_tied_embeddings_and_include_lm_head():
    config = _config("tiny3")
    params = _params("tiny3", False)
    assert "lm_head.weight" not in params_to_torch(params, config)
    assert "lm_head.weight" not in expected_torch_shapes(config)
    sd = params_to_torch(params, config, include_lm_head=True)
    assert set(sd) == set(expected_torch_shapes(config, include_lm_head=True))
    np.testing.assert_array_equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    # A MiniMind .pth (tied copy included) and an HF safetensors file (tied copy dropped) import the same.
    _assert_identical(torch_to_params(sd, config), params)
    _assert_identical(torch_to_params(params_to_torch(params, config), config), params)
    # The scanned layout too.
    _assert_identical(torch_to_params(sd, _config("tiny3", True)), _scan_np(params, config))


@pytest.mark.parametrize("scan", [False, True], ids=["plain", "scan"])
def test_untied_lm_head_exports_and_imports(scan):
    config = _config("tiny2-moe", scan, tie_word_embeddings=False)
    assert "lm_head.weight" in expected_torch_shapes(config)
    sd = _random_state_dict(config)
    params = torch_to_params(sd, config)
    assert params["lm_head"].shape == (config.hidden_size, VOCAB)  # ours is (in, out)
    np.testing.assert_array_equal(params["lm_head"], sd["lm_head.weight"].T)
    assert not np.array_equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    assert {k: tuple(v.shape) for k, v in _flat(params).items()} == _model_param_shapes(config)
    out = params_to_torch(params, config)
    assert out["lm_head.weight"].shape == (VOCAB, config.hidden_size)
    _assert_identical(out, sd)
    _assert_identical(params_to_torch(params, config, include_lm_head=True), sd)


# ---------------------------------------------------------------------------------------------- 3. transformers
def _hf_common(**kw):
    """A small HF config describing the same model as the tiny presets (vocab 256, hidden 64, 2 layers ...)."""
    return dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, max_position_embeddings=512, rope_theta=1e6, **kw)


# Fields that do not change the tensors or the logits of a short sequence.
_NOT_ARCHITECTURE = ("pad_token_id", "bos_token_id", "eos_token_id", "router_aux_loss_coef", "initializer_range",
                     "max_position_embeddings")


def _as_preset(config: ModelConfig, preset: ModelConfig) -> ModelConfig:
    """Check that the config read from an HF file is the preset's model, and return the preset (whose jitted
    forward the other tests compile already)."""
    assert config.replace(**{f: getattr(preset, f) for f in _NOT_ARCHITECTURE}) == preset
    return preset


def _perturb_norms(model, torch):
    """HF inits RMSNorm weights to ones; make them distinct so swapped norms would change the logits."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _hf_logits(model, torch, ids):
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.float().numpy()


@pytest.mark.parametrize("arch,tied", [("qwen3", True), ("qwen3", False), ("llama", True), ("llama", False)])
def test_names_and_values_match_transformers_dense_models(arch, tied):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if arch == "qwen3":
        hf_config = transformers.Qwen3Config(**_hf_common(
            rms_norm_eps=1e-6, intermediate_size=128, tie_word_embeddings=tied))
        cls, preset = transformers.Qwen3ForCausalLM, _config("tiny3", tie_word_embeddings=tied)
    else:
        hf_config = transformers.LlamaConfig(**_hf_common(
            rms_norm_eps=1e-5, intermediate_size=192, tie_word_embeddings=tied))
        cls, preset = transformers.LlamaForCausalLM, _config("tiny2", tie_word_embeddings=tied)
    config = ModelConfig.from_json(hf_config.to_dict())
    assert config.generation == ("minimind3" if arch == "qwen3" else "minimind2")
    assert config.tie_word_embeddings == tied and config.qk_norm == (arch == "qwen3") and not config.use_moe
    preset = _as_preset(config, preset)

    torch.manual_seed(0)
    model = cls._from_config(hf_config)
    _perturb_norms(model, torch)
    hf_sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    hf_names = set(hf_sd) - ({"lm_head.weight"} if tied else set())

    ours = expected_torch_shapes(config)
    assert set(ours) == hf_names
    assert {k: tuple(hf_sd[k].shape) for k in hf_names} == ours

    # HF's state_dict() carries the tied lm_head copy; the import accepts it (it equals the embedding).
    params = torch_to_params(hf_sd, config)
    exported = params_to_torch(params, config)
    assert set(exported) == hf_names
    _assert_identical(exported, {k: hf_sd[k] for k in hf_names})
    _assert_identical(params_to_torch(params, config, include_lm_head=True), hf_sd)

    # Value check: square q_proj / o_proj weights would pass every shape check if left untransposed.
    ids = np.random.RandomState(0).randint(3, VOCAB, (2, 9))
    ref = _hf_logits(model, torch, ids)
    out = np.asarray(_logits(preset, params, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)

    # And the other direction: our export loads strictly into a fresh HF model.
    fresh = cls._from_config(hf_config)
    result = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=False)
    assert list(result.unexpected_keys) == []
    assert list(result.missing_keys) == (["lm_head.weight"] if tied else [])
    np.testing.assert_array_equal(_hf_logits(fresh, torch, ids), ref)


def test_qwen3_moe_checkpoint_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    hf_config = transformers.Qwen3MoeConfig(**_hf_common(
        rms_norm_eps=1e-6, intermediate_size=128, tie_word_embeddings=True, moe_intermediate_size=128,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]))
    config = ModelConfig.from_json(hf_config.to_dict())
    assert config.use_moe and config.num_experts == 4 and config.num_experts_per_tok == 2
    assert config.n_shared_experts == 0 and config.qk_norm
    preset = _as_preset(config, _config("tiny3-moe"))  # so the preset's params serve as the source
    params = _base_params("tiny3-moe")
    sd = params_to_torch(params, config)
    assert "lm_head.weight" not in sd

    safetensors_numpy.save_file(sd, os.fspath(tmp_path / "model.safetensors"))
    hf_config.save_pretrained(tmp_path)
    try:
        model, info = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    except TypeError:  # pragma: no cover - a transformers without output_loading_info
        model, info = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path), {}
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(key), (key, info.get(key))
    hf_sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for i in range(config.num_hidden_layers):
        router = hf_sd[f"model.layers.{i}.mlp.gate.weight"]
        assert router.shape == (config.num_experts, config.hidden_size)
        np.testing.assert_array_equal(router, sd[f"model.layers.{i}.mlp.gate.weight"])
        np.testing.assert_array_equal(hf_sd[f"model.layers.{i}.self_attn.q_norm.weight"],
                                      sd[f"model.layers.{i}.self_attn.q_norm.weight"])
    np.testing.assert_array_equal(hf_sd["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    # The experts (fused in memory by transformers 5) are right if the logits agree.
    ids = np.random.RandomState(0).randint(3, VOCAB, (2, 9))
    ref = _hf_logits(model, torch, ids)
    out = np.asarray(_logits(preset, params, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- 4. errors
def _error(sd, config) -> str:
    with pytest.raises(MappingError) as info:
        torch_to_params(sd, config)
    return str(info.value)


def test_mapping_error_is_a_value_error():
    assert issubclass(MappingError, ValueError)


@pytest.mark.parametrize("scan", [False, True], ids=["plain", "scan"])
def test_missing_tensor(scan):
    config = _config("tiny2-moe", scan)
    sd = _random_state_dict(config)
    del sd["model.layers.1.mlp.experts.3.down_proj.weight"]
    msg = _error(sd, config)
    assert "1 missing tensor(s)" in msg and "model.layers.1.mlp.experts.3.down_proj.weight" in msg
    assert "unexpected" not in msg and "shape" not in msg


def test_missing_untied_lm_head():
    config = _config("tiny3", tie_word_embeddings=False)
    sd = _random_state_dict(config)
    del sd["lm_head.weight"]
    msg = _error(sd, config)
    assert "missing" in msg and "lm_head.weight" in msg


def test_unexpected_tensor():
    config = _config("tiny3")
    sd = _random_state_dict(config)
    sd["model.layers.2.self_attn.q_proj.weight"] = sd["model.layers.1.self_attn.q_proj.weight"]
    sd["model.rotary_emb.inv_freq"] = np.zeros(8, np.float32)
    msg = _error(sd, config)
    assert "2 unexpected tensor(s)" in msg
    assert "model.layers.2.self_attn.q_proj.weight" in msg and "model.rotary_emb.inv_freq" in msg
    assert "missing" not in msg


def test_extra_expert_is_unexpected():
    config = _config("tiny3-moe")
    sd = _random_state_dict(config)
    sd["model.layers.0.mlp.experts.4.gate_proj.weight"] = sd["model.layers.0.mlp.experts.3.gate_proj.weight"]
    msg = _error(sd, config)
    assert "unexpected" in msg and "model.layers.0.mlp.experts.4.gate_proj.weight" in msg


def test_wrong_shape_names_the_tensor_and_both_shapes():
    config = _config("tiny3")
    sd = _random_state_dict(config)
    sd["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)  # expected (32, 64)
    # An untransposed (in, out) kernel is caught too.
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"].T
    msg = _error(sd, config)
    assert "2 shape mismatch(es)" in msg
    assert "model.layers.0.self_attn.k_proj.weight: (64, 64) (expected (32, 64))" in msg
    assert "model.layers.1.mlp.up_proj.weight: (64, 128) (expected (128, 64))" in msg


def test_minimind3_checkpoint_with_minimind2_config():
    sd = _random_state_dict(_config("tiny3"))
    config = _config("tiny2", intermediate_size=128)  # same shapes, only qk_norm differs
    msg = _error(sd, config)
    assert "q_norm" in msg and "qk_norm=False" in msg
    assert "4 unexpected tensor(s)" in msg and "model.layers.0.self_attn.q_norm.weight" in msg


def test_minimind2_checkpoint_with_minimind3_config():
    sd = _random_state_dict(_config("tiny2", intermediate_size=128))
    config = _config("tiny3")
    msg = _error(sd, config)
    assert "q_norm" in msg and "qk_norm=True" in msg
    assert "4 missing tensor(s)" in msg and "model.layers.1.self_attn.k_norm.weight" in msg


def test_tied_config_with_a_different_lm_head():
    config = _config("tiny3")
    sd = _random_state_dict(config, include_lm_head=True)
    sd["lm_head.weight"] = sd["lm_head.weight"].copy()
    sd["lm_head.weight"][5, 3] += 1
    msg = _error(sd, config)
    assert "lm_head.weight" in msg and "tie_word_embeddings" in msg
    # The advertised remedy works.
    params = torch_to_params(sd, config.replace(tie_word_embeddings=False))
    np.testing.assert_array_equal(params["lm_head"].T, sd["lm_head.weight"])


def test_every_problem_is_listed_with_counts_and_long_lists_are_truncated():
    config = _config("tiny3")
    sd = _random_state_dict(config)
    dropped = sorted(k for k in sd if k.startswith("model.layers."))  # 2 layers x 11 tensors
    for k in dropped:
        del sd[k]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["model.norm.weight"] = np.zeros(7, np.float32)
    msg = _error(sd, config)
    assert f"{len(dropped)} missing tensor(s)" in msg and len(dropped) == 22
    assert "(10 more)" in msg  # 12 shown
    assert sum(k in msg for k in dropped) == 12
    assert "1 unexpected tensor(s): extra.weight" in msg
    assert "1 shape mismatch(es): model.norm.weight: (7,) (expected (64,))" in msg
    assert "minimind3" in msg and "hidden 64" in msg  # the config is described


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("scan", [False, True], ids=["plain", "scan"])
@pytest.mark.parametrize("name", PRESETS)
def test_expected_param_shapes_is_the_model_tree(name, scan, tied):
    config = _config(name, scan, tie_word_embeddings=tied)
    assert {"/".join(k): v for k, v in expected_param_shapes(config).items()} == _model_param_shapes(config)


def _export_error(params, config) -> str:
    with pytest.raises(MappingError) as info:
        params_to_torch(params, config)
    return str(info.value)


@pytest.mark.parametrize("scan", [False, True], ids=["plain", "scan"])
def test_export_refuses_params_with_more_layers_or_experts_than_the_config(scan):
    """Only the paths the config names are read, so a config that is too small would silently drop layers /
    experts from the exported checkpoint; it must be refused."""
    params = _params("tiny3-moe", scan)
    fewer_layers = _config("tiny3-moe", scan, num_hidden_layers=1)
    msg = _export_error(params, fewer_layers)
    assert ("unexpected param(s): layers_1/" in msg) if not scan else ("shape mismatch" in msg and "(2, 64)" in msg)
    msg = _export_error(params, _config("tiny3-moe", scan, num_experts=2))
    assert "shape mismatch" in msg and "experts/gate_proj" in msg
    assert ("(4, 64, 128) (expected (2, 64, 128))" if not scan else "(2, 4, 64, 128) (expected (2, 2, 64, 128))") in msg


def test_export_refuses_the_wrong_layout_shapes_and_a_dropped_head():
    plain, scanned = _params("tiny2", False), _params("tiny2", True)
    msg = _export_error(scanned, _config("tiny2"))
    assert "scanned layout" in msg and "scan_layers=False" in msg and "missing param(s): layers_0/" in msg
    msg = _export_error(plain, _config("tiny2", True))
    assert "per-layer layout" in msg and "scan_layers=True" in msg
    msg = _export_error(plain, _config("tiny2", hidden_size=128))
    assert "embed_tokens: (256, 64) (expected (256, 128))" in msg
    # An untied head exported under a tied config would be lost.
    untied = torch_to_params(_random_state_dict(_config("tiny2", tie_word_embeddings=False)),
                             _config("tiny2", tie_word_embeddings=False))
    msg = _export_error(untied, _config("tiny2"))
    assert "1 unexpected param(s): lm_head" in msg
    msg = _export_error(plain, _config("tiny2", tie_word_embeddings=False))
    assert "1 missing param(s): lm_head" in msg


# ---------------------------------------------------------------------------------------------- 5. values
@pytest.mark.parametrize("src_scan", [False, True], ids=["plain_to_scan", "scan_to_plain"])
@pytest.mark.parametrize("name", ["tiny3", "tiny2-moe"])
def test_imported_params_give_identical_logits(name, src_scan):
    plain, scanned = _config(name), _config(name, True)
    src_config, dst_config = (scanned, plain) if src_scan else (plain, scanned)
    params = _base_params(name)
    src = _scan_np(params, plain) if src_scan else params
    imported = torch_to_params(params_to_torch(src, src_config), dst_config)
    ids = random_ids((2, 11))
    ref = np.asarray(_logits(src_config, src, ids))
    out = np.asarray(_logits(dst_config, imported, ids))
    assert np.abs(ref).max() > 0.1  # not a degenerate all-zero model
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)
