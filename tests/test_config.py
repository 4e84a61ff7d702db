"""ModelConfig: presets and their parameter counts, generation defaults, reading MiniMind (both
generations) and Hugging Face config.json files, error messages, and the JSON round trip."""

import json
import math
import re

import jax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minimind_jax import ConfigError, ModelConfig, init_params, param_count
from minimind_jax.config import (
    PRESETS,
    minimind2_intermediate_size,
    minimind3_intermediate_size,
)

TINY_PRESETS = ["tiny3", "tiny3-moe", "tiny2", "tiny2-moe"]

# The bookkeeping keys a transformers PretrainedConfig writes next to the model's own keys
# (``to_dict()`` / ``save_pretrained(use_diff=False)``, transformers 4.x and 5.x mixed).
TRANSFORMERS_BOOKKEEPING = {
    "_name_or_path": "minimind",
    "architectures": ["MiniMindForCausalLM"],
    "model_type": "minimind",
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "return_dict": True,
    "output_hidden_states": False,
    "output_attentions": False,
    "torchscript": False,
    "torch_dtype": "bfloat16",
    "dtype": "bfloat16",
    "use_bfloat16": False,
    "chunk_size_feed_forward": 0,
    "is_encoder_decoder": False,
    "is_decoder": False,
    "add_cross_attention": False,
    "tie_encoder_decoder": False,
    "problem_type": None,
    "prefix": None,
    "sep_token_id": None,
    "decoder_start_token_id": None,
    "task_specific_params": None,
    "tokenizer_class": None,
    "transformers_version": "4.57.1",
    "flash_attn": True,
}

# MiniMind-3 (as its MiniMindConfig(PretrainedConfig) writes it): the MoE checkpoint.
MINIMIND3_JSON = {
    **TRANSFORMERS_BOOKKEEPING,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "dropout": 0.0,
    "hidden_act": "silu",
    "hidden_size": 768,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 6400,
    "head_dim": 96,
    "intermediate_size": 2432,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "inference_rope_scaling": True,
    "rope_scaling": {
        "beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 2048,
        "attention_factor": 1.0, "type": "yarn",
    },
    "use_moe": True,
    "num_experts": 4,
    "num_experts_per_tok": 1,
    "moe_intermediate_size": 2432,
    "norm_topk_prob": True,
    "router_aux_loss_coef": 0.0005,
}

# MiniMind2 (2025): the MoE checkpoint's config.json.
MINIMIND2_JSON = {
    **TRANSFORMERS_BOOKKEEPING,
    "aux_loss_alpha": 0.05,
    "bos_token_id": 1,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 640,
    "intermediate_size": 1728,
    "max_position_embeddings": 32768,
    "n_routed_experts": 6,
    "n_shared_experts": 2,
    "norm_topk_prob": True,
    "num_attention_heads": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 8,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "inference_rope_scaling": False,
    "rope_scaling": None,
    "scoring_func": "softmax",
    "seq_aux": True,
    "use_moe": True,
    "vocab_size": 6400,
}


def base_dict(**kw):
    """The four shape keys plus num_key_value_heads, without any generation marker."""
    return {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 256, **kw}


# ============================================================================ presets / parameter counts
@pytest.mark.parametrize("name, total, active", [
    ("minimind3", 63_912_192, 63_912_192),
    ("minimind3-moe", 198_416_640, 63_936_768),
    ("minimind2-small", 25_829_888, 25_829_888),
    ("minimind2", 104_030_976, 104_030_976),
    ("minimind2-moe", 145_029_760, 91_945_600),
])
def test_published_param_counts(name, total, active):
    assert param_count(ModelConfig.preset(name)) == (total, active)


def n_elements(params):
    return sum(leaf.size for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("name", TINY_PRESETS)
def test_param_count_matches_init_params(name, scan):
    config = ModelConfig.preset(name).replace(scan_layers=scan)
    # init_params traced abstractly: the very same function and shapes, without compiling the model.
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    total, active = param_count(config)
    assert n_elements(params) == total
    if config.use_moe:
        assert active < total
    else:
        assert active == total
    if scan:  # the stacked layout really is the scanned one
        assert "layers" in params and "layers_0" not in params
        assert all(leaf.shape[0] == config.num_hidden_layers for leaf in jax.tree.leaves(params["layers"]))
    else:
        assert "layers_0" in params and "layers" not in params


def test_param_count_matches_real_init_params():
    """One real (compiled) init_params, to tie the abstract counts above to actual arrays."""
    config = ModelConfig.preset("tiny3", scan_layers=True)  # the quickest to compile
    params = init_params(config, jax.random.key(0))
    assert n_elements(params) == param_count(config)[0]
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(lambda a: (a.shape, a.dtype), abstract)


def test_param_count_untied_head_and_qk_norm():
    c = ModelConfig.preset("tiny3")
    untied = c.replace(tie_word_embeddings=False)
    assert param_count(untied)[0] - param_count(c)[0] == c.vocab_size * c.hidden_size
    no_qk = c.replace(qk_norm=False)
    assert param_count(c)[0] - param_count(no_qk)[0] == c.num_hidden_layers * 2 * c.head_dim


def test_preset_overrides_and_unknown_preset():
    c = ModelConfig.preset("tiny3", vocab_size=256, use_moe=True, num_experts=8)
    assert (c.vocab_size, c.use_moe, c.num_experts, c.hidden_size) == (256, True, 8, 64)
    with pytest.raises(ConfigError, match=r"unknown preset 'minimind4'.*known presets: .*minimind3"):
        ModelConfig.preset("minimind4")


def test_every_preset_is_valid_and_resolved():
    for name in PRESETS:
        c = ModelConfig.preset(name)
        for field in ("rms_norm_eps", "qk_norm", "num_experts_per_tok", "n_shared_experts",
                      "router_aux_loss_coef", "seq_aux"):
            assert getattr(c, field) is not None, (name, field)
        assert c.head_dim > 0 and c.intermediate_size > 0 and c.moe_intermediate_size > 0
        assert c.num_attention_heads % c.num_key_value_heads == 0


# ============================================================================ generation defaults
def test_minimind3_defaults():
    c = ModelConfig.preset("minimind3")
    assert c.generation == "minimind3"
    assert c.rms_norm_eps == 1e-6
    assert c.qk_norm is True
    assert c.intermediate_size == 2432 == math.ceil(math.pi * 768 / 64) * 64
    assert c.moe_intermediate_size == c.intermediate_size
    assert c.n_shared_experts == 0
    assert c.num_experts_per_tok == 1
    assert c.seq_aux is False
    assert c.router_aux_loss_coef == 5e-4
    assert c.head_dim == 96 and c.num_kv_groups == 2
    assert c.num_routed_experts == 0
    assert ModelConfig.preset("minimind3-moe").num_routed_experts == 4


@pytest.mark.parametrize("hidden, expected", [(512, 1408), (768, 2048), (640, 1728)])
def test_minimind2_intermediate_rule(hidden, expected):
    assert minimind2_intermediate_size(hidden) == expected
    assert expected == 64 * math.ceil(int(8 * hidden / 3) / 64)
    assert ModelConfig(generation="minimind2", hidden_size=hidden).intermediate_size == expected


@pytest.mark.parametrize("hidden", [64, 128, 256, 512, 640, 768, 1024, 96, 200])
def test_minimind3_intermediate_rule(hidden):
    assert minimind3_intermediate_size(hidden) == math.ceil(hidden * math.pi / 64) * 64
    assert ModelConfig(generation="minimind3", hidden_size=hidden, num_attention_heads=4,
                       num_key_value_heads=2).intermediate_size == minimind3_intermediate_size(hidden)


def test_minimind2_defaults():
    c = ModelConfig.preset("minimind2")
    assert c.generation == "minimind2"
    assert c.rms_norm_eps == 1e-5
    assert c.qk_norm is False
    assert c.intermediate_size == 2048
    assert c.num_experts_per_tok == 2
    assert c.n_shared_experts == 1
    assert c.seq_aux is True
    assert c.router_aux_loss_coef == 0.1
    assert ModelConfig.preset("minimind2-small").intermediate_size == 1408
    assert ModelConfig.preset("minimind2-moe").intermediate_size == 1728


def test_explicit_values_beat_generation_defaults():
    # False / 0 are real values, not "unset": only None takes the generation's default.
    c3 = ModelConfig(generation="minimind3", qk_norm=False, seq_aux=True, n_shared_experts=2, rms_norm_eps=1e-5)
    assert (c3.qk_norm, c3.seq_aux, c3.n_shared_experts, c3.rms_norm_eps) == (False, True, 2, 1e-5)
    c2 = ModelConfig(generation="minimind2", qk_norm=True, seq_aux=False, n_shared_experts=0,
                     router_aux_loss_coef=0.0, intermediate_size=100, head_dim=32)
    assert (c2.qk_norm, c2.seq_aux, c2.n_shared_experts, c2.router_aux_loss_coef) == (True, False, 0, 0.0)
    assert (c2.intermediate_size, c2.head_dim, c2.moe_intermediate_size) == (100, 32, 100)


def test_replace_keeps_resolved_values_and_revalidates():
    c = ModelConfig.preset("tiny3")
    assert c.replace(scan_layers=True).scan_layers is True
    with pytest.raises(ConfigError, match="remat_policy"):
        c.replace(remat_policy="sometimes")


@pytest.mark.parametrize("kwargs, match", [
    (dict(generation="minimind4"), "generation must be one of"),
    (dict(hidden_size=100, num_attention_heads=8), "not divisible by num_attention_heads"),
    (dict(num_attention_heads=8, num_key_value_heads=3), r"multiple of num_key_value_heads \(3\)"),
    (dict(head_dim=33), "head_dim must be even"),
    (dict(vocab_size=0), "vocab_size must be positive"),
    (dict(num_hidden_layers=-1), "num_hidden_layers must be positive"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(dropout=1.0), "dropout"),
    (dict(use_moe=True, num_experts=0), "num_experts must be positive"),
    (dict(use_moe=True, num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(use_moe=True, n_shared_experts=-1), "n_shared_experts"),
    (dict(moe_impl="fancy"), "moe_impl"),
    (dict(remat_policy="everything"), "remat_policy"),
])
def test_constructor_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kwargs)


def test_moe_checks_are_skipped_for_dense():
    ModelConfig(use_moe=False, num_experts=0, num_experts_per_tok=9)  # no error


# ============================================================================ from_json: MiniMind files
def test_from_json_minimind3_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MINIMIND3_JSON))
    for source in (path, str(path), tmp_path, MINIMIND3_JSON):
        c = ModelConfig.from_json(source)
        assert c.generation == "minimind3"
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (768, 8, 8, 4)
        assert (c.vocab_size, c.head_dim, c.intermediate_size) == (6400, 96, 2432)
        assert c.use_moe and c.num_experts == 4 and c.num_experts_per_tok == 1
        assert c.moe_intermediate_size == 2432 and c.router_aux_loss_coef == 5e-4
        assert c.n_shared_experts == 0 and c.seq_aux is False and c.qk_norm is True
        assert c.rms_norm_eps == 1e-6 and c.rope_theta == 1e6 and c.tie_word_embeddings
        assert c.inference_rope_scaling is True
        assert (c.rope_scaling_factor, c.rope_scaling_original_max) == (16.0, 2048)
        assert (c.rope_scaling_beta_fast, c.rope_scaling_beta_slow, c.rope_scaling_attention_factor) == (32, 1, 1)
        assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (0, 1, 2)
    # The published MoE model is the minimind3-moe preset.
    assert ModelConfig.from_json(MINIMIND3_JSON, inference_rope_scaling=False) == ModelConfig.preset("minimind3-moe")


def test_from_json_minimind3_custom_rope_scaling():
    raw = dict(MINIMIND3_JSON, rope_scaling=dict(MINIMIND3_JSON["rope_scaling"], factor=4,
                                                 original_max_position_embeddings=8192, beta_fast=16))
    c = ModelConfig.from_json(raw)
    assert (c.rope_scaling_factor, c.rope_scaling_original_max, c.rope_scaling_beta_fast) == (4.0, 8192, 16.0)
    assert isinstance(c.rope_scaling_factor, float) and isinstance(c.rope_scaling_original_max, int)


def test_from_json_minimind2_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MINIMIND2_JSON))
    c = ModelConfig.from_json(tmp_path)
    assert c.generation == "minimind2"
    assert c.use_moe and c.num_experts == 6 and c.num_routed_experts == 6
    assert c.n_shared_experts == 2 and c.router_aux_loss_coef == 0.05 and c.seq_aux is True
    assert c.num_experts_per_tok == 2 and c.norm_topk_prob is True
    assert c.qk_norm is False and c.rms_norm_eps == 1e-5
    assert c.head_dim == 80 and c.intermediate_size == 1728 and c.moe_intermediate_size == 1728
    assert c.inference_rope_scaling is False
    # The published MoE model is the minimind2-moe preset.
    published = dict(MINIMIND2_JSON, n_routed_experts=4, n_shared_experts=1, aux_loss_alpha=0.1)
    assert ModelConfig.from_json(published) == ModelConfig.preset("minimind2-moe")


def test_from_json_minimind2_dense_defaults():
    raw = {k: v for k, v in MINIMIND2_JSON.items() if k not in ("use_moe", "intermediate_size")}
    raw.update(hidden_size=768, num_hidden_layers=16, use_moe=False, aux_loss_alpha=0.1,
               n_routed_experts=4, n_shared_experts=1)
    assert ModelConfig.from_json(raw) == ModelConfig.preset("minimind2")


def test_from_json_overrides_and_generation_argument(tmp_path):
    c = ModelConfig.from_json(MINIMIND3_JSON, scan_layers=True, moe_impl="sorted", num_hidden_layers=2)
    assert (c.scan_layers, c.moe_impl, c.num_hidden_layers) == (True, "sorted", 2)
    assert ModelConfig.from_json(MINIMIND3_JSON, generation="minimind3").generation == "minimind3"
    with pytest.raises(ConfigError, match="generation='minimind2' was asked for but the file's keys say 'minimind3'"):
        ModelConfig.from_json(MINIMIND3_JSON, generation="minimind2")
    with pytest.raises(ConfigError, match="remat_policy must be one of"):
        ModelConfig.from_json(MINIMIND3_JSON, remat_policy="bad")


def test_from_json_does_not_mutate_its_input():
    raw = json.loads(json.dumps(MINIMIND2_JSON))
    ModelConfig.from_json(raw, scan_layers=True)
    assert raw == MINIMIND2_JSON


def test_from_json_without_markers_needs_generation(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(base_dict(model_type="minimind", rms_norm_eps=1e-5)))
    with pytest.raises(ConfigError, match=r"cannot tell the MiniMind generation.*pass generation="):
        ModelConfig.from_json(path)
    c2 = ModelConfig.from_json(path, generation="minimind2")
    assert c2.generation == "minimind2" and c2.qk_norm is False and c2.n_shared_experts == 1
    assert c2.intermediate_size == minimind2_intermediate_size(64)
    c3 = ModelConfig.from_json(path, generation="minimind3")
    assert c3.generation == "minimind3" and c3.qk_norm is True and c3.rms_norm_eps == 1e-5
    with pytest.raises(ConfigError, match="generation must be one of"):
        ModelConfig.from_json(path, generation="minimind1")


# ============================================================================ from_json: errors
def test_missing_hidden_size():
    raw = {k: v for k, v in MINIMIND3_JSON.items() if k != "hidden_size"}
    with pytest.raises(ConfigError, match=r"missing model-shape field.*hidden_size"):
        ModelConfig.from_json(raw)


def test_missing_num_key_value_heads_in_minimind_file():
    raw = {k: v for k, v in MINIMIND2_JSON.items() if k != "num_key_value_heads"}
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ModelConfig.from_json(raw)


def test_contradictory_expert_counts():
    raw = base_dict(num_experts=4, n_routed_experts=8)
    with pytest.raises(ConfigError, match="contradictory generation keys"):
        ModelConfig.from_json(raw)
    # Naming the generation, as the message suggests, settles the generation but not the disagreement.
    with pytest.raises(ConfigError, match=r"num_experts \(4\) and n_routed_experts \(8\) disagree"):
        ModelConfig.from_json(raw, generation="minimind3")


def test_contradictory_aux_coefficients():
    raw = base_dict(router_aux_loss_coef=1e-3, aux_loss_alpha=0.1)
    with pytest.raises(ConfigError, match=r"router_aux_loss_coef \(0.001\) and aux_loss_alpha \(0.1\) disagree"):
        ModelConfig.from_json(raw, generation="minimind2")


def test_minimind3_and_minimind2_markers_in_one_file():
    raw = dict(MINIMIND3_JSON, seq_aux=True, aux_loss_alpha=5e-4)
    with pytest.raises(ConfigError, match=r"contradictory generation keys.*num_experts.*seq_aux"):
        ModelConfig.from_json(raw)


def test_mixed_markers_with_explicit_generation():
    # A file carrying both generations' names for the same values is readable once the generation is named.
    raw = base_dict(num_experts=4, n_routed_experts=4, router_aux_loss_coef=0.1, aux_loss_alpha=0.1,
                    use_moe=True)
    c = ModelConfig.from_json(raw, generation="minimind2")
    assert (c.generation, c.num_experts, c.router_aux_loss_coef) == ("minimind2", 4, 0.1)
    # The project's own "generation" key settles it as well (that is how to_json writes mixed switches).
    c3 = ModelConfig.from_json(dict(raw, generation="minimind3"))
    assert c3.generation == "minimind3"


def test_non_json_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("hidden_size: 64\nnot json at all\n")
    with pytest.raises(ConfigError, match=r"not valid JSON") as info:
        ModelConfig.from_json(path)
    assert str(path) in str(info.value)


def test_json_that_is_not_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="expected a JSON object, got list") as info:
        ModelConfig.from_json(path)
    assert str(path) in str(info.value)


def test_missing_file_and_directory_without_config(tmp_path):
    with pytest.raises(ConfigError, match="no such config file") as info:
        ModelConfig.from_json(tmp_path / "nope.json")
    assert "nope.json" in str(info.value)
    with pytest.raises(ConfigError, match="no such config file") as info:
        ModelConfig.from_json(tmp_path)  # a directory with no config.json
    assert str(tmp_path / "config.json") in str(info.value)


def test_error_message_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(MINIMIND3_JSON, num_key_value_heads=3)))
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_json(path)
    assert str(info.value).startswith(str(path) + ":")


def test_heads_not_divisible_by_kv_heads():
    with pytest.raises(ConfigError, match=r"num_attention_heads \(8\) must be a multiple of num_key_value_heads \(3\)"):
        ModelConfig.from_json(dict(MINIMIND3_JSON, num_key_value_heads=3))


@pytest.mark.parametrize("key, value", [
    ("hidden_size", "768"),
    ("hidden_size", 768.5),
    ("hidden_size", True),
    ("vocab_size", "6400"),
    ("num_hidden_layers", [8]),
    ("num_key_value_heads", "four"),
    ("num_key_value_heads", "4"),
    ("head_dim", "96"),
    ("intermediate_size", "big"),
    ("num_experts", "4"),
    ("num_experts_per_tok", "one"),
    ("moe_intermediate_size", 1.5),
    ("max_position_embeddings", "32k"),
    ("bos_token_id", "1"),
])
def test_string_where_int_expected(key, value):
    with pytest.raises(ConfigError, match=re.escape(f"{key} must be an integer, got {value!r}")):
        ModelConfig.from_json(dict(MINIMIND3_JSON, **{key: value}))


@pytest.mark.parametrize("text", ["Infinity", "NaN"])
def test_non_finite_int_is_a_config_error(tmp_path, text):
    # Python's json accepts these; int(inf) would raise OverflowError, not a ConfigError.
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MINIMIND3_JSON).replace('"num_hidden_layers": 8', f'"num_hidden_layers": {text}'))
    with pytest.raises(ConfigError, match="num_hidden_layers must be an integer"):
        ModelConfig.from_json(path)


def test_zero_one_are_accepted_as_bools():
    c = ModelConfig.from_json(dict(MINIMIND3_JSON, use_moe=0, tie_word_embeddings=1, qk_norm=0))
    assert (c.use_moe, c.tie_word_embeddings, c.qk_norm) == (False, True, False)
    with pytest.raises(ConfigError, match="use_moe must be true or false, got 2"):
        ModelConfig.from_json(dict(MINIMIND3_JSON, use_moe=2))


def test_minimind2_int_keys_are_checked():
    for key in ("n_routed_experts", "n_shared_experts"):
        with pytest.raises(ConfigError, match=rf"{key} must be an integer"):
            ModelConfig.from_json(dict(MINIMIND2_JSON, **{key: "x"}))


@pytest.mark.parametrize("key, value", [("rms_norm_eps", "1e-6"), ("rope_theta", "big"), ("dropout", "0.1"),
                                        ("router_aux_loss_coef", [0.1])])
def test_string_where_float_expected(key, value):
    with pytest.raises(ConfigError, match=rf"{key} must be a number"):
        ModelConfig.from_json(dict(MINIMIND3_JSON, **{key: value}))


@pytest.mark.parametrize("key", ["use_moe", "tie_word_embeddings", "inference_rope_scaling", "norm_topk_prob",
                                 "qk_norm", "scan_layers"])
def test_string_where_bool_expected(key):
    # bool("false") is True: a string must be refused, not silently read as "on".
    with pytest.raises(ConfigError, match=rf"{key} must be true or false"):
        ModelConfig.from_json(dict(MINIMIND3_JSON, **{key: "false"}))


def test_integral_floats_are_accepted_as_ints():
    c = ModelConfig.from_json(dict(MINIMIND3_JSON, hidden_size=768.0, num_hidden_layers=8.0))
    assert c.hidden_size == 768 and isinstance(c.hidden_size, int)
    assert c.num_hidden_layers == 8 and isinstance(c.num_hidden_layers, int)


def test_ints_are_accepted_as_floats():
    c = ModelConfig.from_json(dict(MINIMIND3_JSON, rope_theta=10000, rms_norm_eps=1, dropout=0))
    assert c.rope_theta == 10000.0 and isinstance(c.rope_theta, float)
    assert c.rms_norm_eps == 1.0 and isinstance(c.rms_norm_eps, float)


@pytest.mark.parametrize("key,value", [("rms_norm_eps", 0), ("rms_norm_eps", -1e-6), ("rms_norm_eps", float("nan")),
                                       ("rope_theta", 0), ("rope_theta", float("inf")), ("rope_theta", -1.0)])
def test_norm_eps_and_rope_theta_must_be_positive_finite(key, value):
    with pytest.raises(ConfigError, match=rf"{key} must be a positive finite number"):
        ModelConfig.from_json(dict(MINIMIND3_JSON, **{key: value}))
    with pytest.raises(ConfigError, match=rf"{key} must be a positive finite number"):
        ModelConfig.preset("tiny3", **{key: value})


@pytest.mark.parametrize("key,value,message", [("intermediate_size", -4, "must be positive"),
                                               ("head_dim", -2, "must be positive"),
                                               ("intermediate_size", 64.5, "must be an integer")])
def test_shape_fields_rejected(key, value, message):
    with pytest.raises(ConfigError, match=rf"{key} {message}"):
        ModelConfig.preset("tiny3", **{key: value})


@pytest.mark.parametrize("model_type", ["gpt2", "mixtral", "qwen2"])
def test_unsupported_model_type(model_type):
    with pytest.raises(ConfigError, match=rf"unsupported model_type '{model_type}'"):
        ModelConfig.from_json(dict(MINIMIND3_JSON, model_type=model_type))
    # Also without any MiniMind marker (a real foreign file): still named as the problem.
    with pytest.raises(ConfigError, match=rf"unsupported model_type '{model_type}'"):
        ModelConfig.from_json(base_dict(model_type=model_type))


def test_unsupported_scoring_func():
    with pytest.raises(ConfigError, match="scoring_func 'sigmoid'"):
        ModelConfig.from_json(dict(MINIMIND2_JSON, scoring_func="sigmoid"))


def test_unknown_keys_are_ignored():
    c = ModelConfig.from_json(dict(MINIMIND3_JSON, some_future_key=[1, 2], another={"a": 1}))
    assert c == ModelConfig.from_json(MINIMIND3_JSON)


# ============================================================================ from_json: Hugging Face files
def hf_roundtrip(config, tmp_path):
    """save_pretrained, then read the directory back with both transformers and from_json."""
    transformers = pytest.importorskip("transformers")
    config.save_pretrained(tmp_path)
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    return ModelConfig.from_json(tmp_path), theirs


def hf_rope_theta(hf_config):
    params = getattr(hf_config, "rope_parameters", None)  # transformers 5
    if params and "rope_theta" in params:
        return params["rope_theta"]
    return hf_config.rope_theta  # transformers 4


def check_common(ours, theirs):
    assert ours.vocab_size == theirs.vocab_size
    assert ours.hidden_size == theirs.hidden_size
    assert ours.num_hidden_layers == theirs.num_hidden_layers
    assert ours.num_attention_heads == theirs.num_attention_heads
    assert ours.num_key_value_heads == theirs.num_key_value_heads
    assert ours.head_dim == theirs.head_dim
    assert ours.intermediate_size == theirs.intermediate_size
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.rope_theta == hf_rope_theta(theirs)
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.inference_rope_scaling is False


def test_hf_qwen3(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3Config(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        max_position_embeddings=4096, bos_token_id=5, eos_token_id=7)
    ours, theirs = hf_roundtrip(hf, tmp_path)
    check_common(ours, theirs)
    assert ours.generation == "minimind3" and ours.qk_norm is True
    assert ours.head_dim == 32 != 64 // 4
    assert ours.rope_theta == 500000.0 and ours.tie_word_embeddings is True
    assert ours.use_moe is False
    assert (ours.bos_token_id, ours.eos_token_id) == (5, 7)


def test_hf_qwen3_untied_default(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    ours, theirs = hf_roundtrip(hf, tmp_path)
    check_common(ours, theirs)
    assert ours.tie_word_embeddings is False


def test_hf_qwen3_moe(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3MoeConfig(
        vocab_size=320, hidden_size=64, intermediate_size=160, moe_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, router_aux_loss_coef=0.01, rope_theta=1e6, rms_norm_eps=1e-6)
    ours, theirs = hf_roundtrip(hf, tmp_path)
    check_common(ours, theirs)
    assert ours.generation == "minimind3" and ours.qk_norm is True
    assert ours.use_moe is True
    assert ours.num_experts == theirs.num_experts == 8
    assert ours.num_experts_per_tok == 2 and ours.moe_intermediate_size == 48
    assert ours.norm_topk_prob is True and ours.router_aux_loss_coef == 0.01
    assert ours.n_shared_experts == 0 and ours.seq_aux is False
    assert ours.tie_word_embeddings is False


def test_hf_qwen3_moe_norm_topk_false(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_experts=3, num_experts_per_tok=3,
        norm_topk_prob=False)
    ours, theirs = hf_roundtrip(hf, tmp_path)
    assert ours.norm_topk_prob is False and ours.num_experts == 3 and ours.num_experts_per_tok == 3


@pytest.mark.parametrize("kw, match", [
    (dict(mlp_only_layers=[0]), "mlp_only_layers"),
    (dict(decoder_sparse_step=2), "decoder_sparse_step"),
])
def test_hf_qwen3_moe_unsupported_layouts(tmp_path, kw, match):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, **kw)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_json(tmp_path)


def test_hf_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=2048)
    ours, theirs = hf_roundtrip(hf, tmp_path)
    check_common(ours, theirs)
    assert ours.generation == "minimind2" and ours.qk_norm is False
    assert ours.head_dim == 16 and ours.use_moe is False
    assert ours.tie_word_embeddings is False
    assert ours.rope_theta == 1e6 and ours.rms_norm_eps == 1e-5
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)


def test_hf_llama_eos_list(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2, eos_token_id=[5, 6, 7])
    ours, _ = hf_roundtrip(hf, tmp_path)
    assert ours.eos_token_id == 5
    assert ModelConfig.from_json(base_dict(model_type="llama", eos_token_id=[])).eos_token_id == 2  # default
    with pytest.raises(ConfigError, match="eos_token_id must be an integer"):
        ModelConfig.from_json(base_dict(model_type="llama", eos_token_id=["</s>"]))


@pytest.mark.parametrize("kw, match", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope scaling"),
    (dict(attention_bias=True), "bias"),
    (dict(mlp_bias=True), "bias"),
])
def test_hf_llama_unsupported(tmp_path, kw, match):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2, **kw)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_json(tmp_path)


def test_hf_hand_written_files():
    # Files written by hand or by older tools: rope_theta at the top, absent kv heads / head_dim / tie.
    llama = dict(base_dict(model_type="llama", intermediate_size=128, rope_theta=10000.0, rope_scaling=None))
    del llama["num_key_value_heads"]
    c = ModelConfig.from_json(llama)
    assert c.num_key_value_heads == c.num_attention_heads == 4  # HF: absent means multi-head attention
    assert (c.generation, c.head_dim, c.tie_word_embeddings, c.rope_theta) == ("minimind2", 16, False, 1e4)
    qwen3 = base_dict(model_type="qwen3", head_dim=16, intermediate_size=128)
    assert ModelConfig.from_json(qwen3).tie_word_embeddings is False
    with pytest.raises(ConfigError, match="generation='minimind2' was asked for"):
        ModelConfig.from_json(qwen3, generation="minimind2")


def test_hf_param_count_matches_torch_model(tmp_path):
    """Our parameter count for an HF file equals the parameter count of transformers' own model."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    for hf in (
        transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 tie_word_embeddings=True),
        transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=8, num_experts=4, num_experts_per_tok=2),
        transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1),
    ):
        model = transformers.AutoModelForCausalLM.from_config(hf)
        n_torch = sum(p.numel() for p in model.parameters())
        hf.save_pretrained(tmp_path / hf.model_type)
        assert param_count(ModelConfig.from_json(tmp_path / hf.model_type))[0] == n_torch, hf.model_type


def test_minimind3_saved_by_transformers(tmp_path):
    """MiniMind-3's own config class (a PretrainedConfig), saved by the installed transformers; with YaRN on,
    transformers 5 moves ``rope_scaling`` into ``rope_parameters``."""
    transformers = pytest.importorskip("transformers")

    class MiniMindConfig(transformers.PretrainedConfig):
        model_type = "minimind"

        def __init__(self, hidden_size=768, num_hidden_layers=8, use_moe=False, **kwargs):
            super().__init__(**kwargs)
            self.hidden_size, self.num_hidden_layers, self.use_moe = hidden_size, num_hidden_layers, use_moe
            self.dropout = kwargs.get("dropout", 0.0)
            self.vocab_size = kwargs.get("vocab_size", 6400)
            self.bos_token_id = kwargs.get("bos_token_id", 1)
            self.eos_token_id = kwargs.get("eos_token_id", 2)
            self.flash_attn = kwargs.get("flash_attn", True)
            self.num_attention_heads = kwargs.get("num_attention_heads", 8)
            self.num_key_value_heads = kwargs.get("num_key_value_heads", 4)
            self.head_dim = kwargs.get("head_dim", self.hidden_size // self.num_attention_heads)
            self.hidden_act = kwargs.get("hidden_act", "silu")
            self.intermediate_size = kwargs.get("intermediate_size", math.ceil(hidden_size * math.pi / 64) * 64)
            self.max_position_embeddings = kwargs.get("max_position_embeddings", 32768)
            self.rms_norm_eps = kwargs.get("rms_norm_eps", 1e-6)
            self.rope_theta = kwargs.get("rope_theta", 1e6)
            self.tie_word_embeddings = kwargs.get("tie_word_embeddings", True)
            self.inference_rope_scaling = kwargs.get("inference_rope_scaling", False)
            self.rope_scaling = {
                "beta_fast": 32, "beta_slow": 1, "factor": kwargs.get("yarn_factor", 16),
                "original_max_position_embeddings": 2048, "attention_factor": 1.0, "type": "yarn",
            } if self.inference_rope_scaling else None
            self.num_experts = kwargs.get("num_experts", 4)
            self.num_experts_per_tok = kwargs.get("num_experts_per_tok", 1)
            self.moe_intermediate_size = kwargs.get("moe_intermediate_size", self.intermediate_size)
            self.norm_topk_prob = kwargs.get("norm_topk_prob", True)
            self.router_aux_loss_coef = kwargs.get("router_aux_loss_coef", 5e-4)

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers 5: "rope_scaling is deprecated"
        MiniMindConfig(use_moe=True).save_pretrained(tmp_path / "moe")
        MiniMindConfig(inference_rope_scaling=True, yarn_factor=8).save_pretrained(tmp_path / "yarn")
    assert ModelConfig.from_json(tmp_path / "moe") == ModelConfig.preset("minimind3-moe")
    yarn = ModelConfig.from_json(tmp_path / "yarn")
    assert yarn == ModelConfig.preset("minimind3", inference_rope_scaling=True, rope_scaling_factor=8.0)


# ============================================================================ round trip
VARIANTS = [
    ("minimind3", dict(scan_layers=True)),
    ("minimind3", dict(remat_policy="full")),
    ("minimind3", dict(remat_policy="dots", scan_layers=True)),
    ("minimind3-moe", dict(moe_impl="sorted")),
    ("minimind3", dict(inference_rope_scaling=True)),
    ("minimind3", dict(inference_rope_scaling=True, rope_scaling_factor=4.0, rope_scaling_beta_fast=16.0)),
    ("minimind3", dict(rope_scaling_original_max=4096)),  # YaRN off, custom value kept
    ("minimind2", dict(dropout=0.1)),
    ("minimind3-moe", dict(seq_aux=True)),
    ("minimind3-moe", dict(n_shared_experts=1, qk_norm=False)),
    ("minimind3", dict(tie_word_embeddings=False, initializer_range=0.01)),
    ("minimind2", dict(qk_norm=True)),
    ("minimind2-moe", dict(seq_aux=False, n_shared_experts=0, router_aux_loss_coef=0.0)),
    ("minimind2-moe", dict(moe_intermediate_size=256, head_dim=32)),
    ("minimind2", dict(intermediate_size=1024, rms_norm_eps=1e-6, rope_theta=1e4)),
    ("tiny3", dict(vocab_size=256, pad_token_id=3, bos_token_id=4, eos_token_id=5, max_position_embeddings=64)),
    ("tiny2-moe", dict(norm_topk_prob=False, num_experts=8, num_experts_per_tok=3)),
]
ROUND_TRIP_CASES = [(name, {}) for name in PRESETS] + VARIANTS


@pytest.mark.parametrize("name, changes", ROUND_TRIP_CASES,
                         ids=[f"{n}-{'-'.join(map(str, c.items())) or 'preset'}" for n, c in ROUND_TRIP_CASES])
def test_json_round_trip(name, changes, tmp_path):
    c = ModelConfig.preset(name).replace(**changes)
    for k, v in changes.items():
        assert getattr(c, k) == v
    text = c.to_json()
    assert ModelConfig.from_json(json.loads(text)) == c
    path = tmp_path / "config.json"
    assert c.to_json(path) == text
    assert path.read_text(encoding="utf-8") == text
    assert ModelConfig.from_json(path) == c
    assert ModelConfig.from_json(tmp_path) == c
    assert ModelConfig.from_json(str(path)) == c
    assert json.loads(text) == c.to_dict()


def test_to_dict_minimind2_key_names():
    d = ModelConfig.preset("minimind2-moe").to_dict()
    assert d["n_routed_experts"] == 4 and d["n_shared_experts"] == 1
    assert d["aux_loss_alpha"] == 0.1 and d["seq_aux"] is True
    assert d["scoring_func"] == "softmax"
    for key in ("num_experts", "router_aux_loss_coef", "head_dim", "qk_norm", "moe_intermediate_size"):
        assert key not in d, key
    assert d["generation"] == "minimind2" and d["model_type"] == "minimind"
    assert d["architectures"] == ["MiniMindForCausalLM"]
    assert d["rope_scaling"] is None and d["inference_rope_scaling"] is False
    # A non-default head_dim / qk_norm is written so that it survives the trip.
    d = ModelConfig.preset("minimind2", head_dim=64, qk_norm=True).to_dict()
    assert d["head_dim"] == 64 and d["qk_norm"] is True


def test_to_dict_minimind3_key_names():
    d = ModelConfig.preset("minimind3-moe").to_dict()
    assert d["num_experts"] == 4 and d["router_aux_loss_coef"] == 5e-4 and d["head_dim"] == 96
    assert d["moe_intermediate_size"] == 2432
    for key in ("n_routed_experts", "aux_loss_alpha", "seq_aux", "n_shared_experts", "scoring_func", "qk_norm"):
        assert key not in d, key
    assert d["generation"] == "minimind3"
    d = ModelConfig.preset("minimind3", inference_rope_scaling=True).to_dict()
    assert d["rope_scaling"] == {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 16.0,
                                 "original_max_position_embeddings": 2048, "attention_factor": 1.0,
                                 "type": "yarn"}


def test_to_dict_is_read_by_minimind_without_our_keys():
    """Without the project's extra keys (generation, scan_layers ...) the file still reads as the same
    model: MiniMind's own key names alone say the generation."""
    ours = ("generation", "scan_layers", "remat_policy", "moe_impl", "initializer_range")
    for name in ("minimind3", "minimind3-moe", "minimind2", "minimind2-moe", "tiny2"):
        c = ModelConfig.preset(name)
        d = {k: v for k, v in c.to_dict().items() if k not in ours}
        assert ModelConfig.from_json(d) == c, name


# ============================================================================ property test
@st.composite
def configs(draw):
    generation = draw(st.sampled_from(["minimind3", "minimind2"]))
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2, 3, 4]))
    head_dim = 2 * draw(st.integers(1, 32))
    kw = dict(generation=generation, num_attention_heads=heads, num_key_value_heads=kv,
              hidden_size=heads * head_dim, vocab_size=draw(st.integers(1, 70000)),
              num_hidden_layers=draw(st.integers(1, 48)),
              max_position_embeddings=draw(st.integers(1, 1 << 20)))
    if draw(st.booleans()):  # an explicit head_dim, possibly != hidden / heads
        kw["head_dim"] = 2 * draw(st.integers(1, 64))
        if draw(st.booleans()):
            kw["hidden_size"] = draw(st.integers(1, 4096))
    if draw(st.booleans()):
        kw["intermediate_size"] = draw(st.integers(1, 10000))
    unit = st.floats(0.0, 1.0, allow_nan=False, exclude_max=True)
    positive = st.floats(1e-9, 1e9, allow_nan=False)
    optional = lambda s: st.none() | s  # noqa: E731  (None: the generation's default)
    kw.update(
        rms_norm_eps=draw(optional(st.floats(1e-12, 1e-2))),
        rope_theta=draw(positive),
        inference_rope_scaling=draw(st.booleans()),
        rope_scaling_factor=draw(st.sampled_from([16.0, 2.0, 4.5])),
        rope_scaling_original_max=draw(st.sampled_from([2048, 512, 8192])),
        rope_scaling_beta_fast=draw(st.sampled_from([32.0, 16.0])),
        rope_scaling_beta_slow=draw(st.sampled_from([1.0, 0.5])),
        rope_scaling_attention_factor=draw(st.sampled_from([1.0, 1.2])),
        qk_norm=draw(optional(st.booleans())),
        tie_word_embeddings=draw(st.booleans()),
        dropout=draw(unit),
        pad_token_id=draw(st.integers(0, 10)), bos_token_id=draw(st.integers(0, 10)),
        eos_token_id=draw(st.integers(0, 10)),
        norm_topk_prob=draw(st.booleans()),
        router_aux_loss_coef=draw(optional(unit)),
        seq_aux=draw(optional(st.booleans())),
        scan_layers=draw(st.booleans()),
        remat_policy=draw(st.sampled_from(["none", "full", "dots"])),
        moe_impl=draw(st.sampled_from(["dense", "sorted"])),
        initializer_range=draw(st.floats(1e-4, 1.0)),
    )
    kw["use_moe"] = draw(st.booleans())
    kw["num_experts"] = draw(st.integers(1, 16))
    kw["num_experts_per_tok"] = draw(optional(st.integers(1, kw["num_experts"])))
    if kw["num_experts_per_tok"] is None and kw["num_experts"] < 2:
        kw["num_experts_per_tok"] = 1  # minimind2's default top-2 needs two experts
    kw["n_shared_experts"] = draw(optional(st.integers(0, 3)))
    if draw(st.booleans()):
        kw["moe_intermediate_size"] = draw(st.integers(1, 4096))
    return ModelConfig(**kw)


@settings(max_examples=50, deadline=None)
@given(configs())
def test_json_round_trip_property(c):
    assert ModelConfig.from_json(json.loads(c.to_json())) == c
    # MiniMind's key names for the generation, never the other generation's.
    d = c.to_dict()
    if c.generation == "minimind2":
        assert "n_routed_experts" in d and "num_experts" not in d and "router_aux_loss_coef" not in d
    else:
        assert "num_experts" in d and "n_routed_experts" not in d and "aux_loss_alpha" not in d
    # The parameter count is a function of the architecture only.
    assert param_count(c) == param_count(c.replace(scan_layers=not c.scan_layers, moe_impl="dense"))
