"""The GPU path stays alive without a GPU: the train step and the decode loop lower for CUDA on this CPU
(``jax.export`` with ``platforms=("cuda",)``, ``kernels=auto`` resolved as on a GPU, bf16 policy), and the
exported modules hold nothing CPU-only: no host callbacks, no ``optimization_barrier`` (the XLA:CPU
transposes), and for MoE a grouped matmul (``ragged_dot``) over tokens sorted by expert."""

import jax
import jax.numpy as jnp
import pytest

from minimind_jax import ModelConfig, init_params
from minimind_jax.generate import SamplingParams, _decode, _make_rows, _prefill
from minimind_jax.precision import get_policy
from minimind_jax.training.stages import get_stage
from minimind_jax.training.step import init_train_state, make_optimizer, make_train_step

PRESETS = [("minimind3", {}), ("minimind3-moe", {}), ("minimind3-moe", {"scan_layers": True, "remat_policy": "dots"})]
CPU_ONLY = ("optimization_barrier", "callback", "xla_python")


def _config(name, overrides):
    return ModelConfig.preset(name, **overrides)


def _assert_gpu_clean(text, config):
    for construct in CPU_ONLY:
        assert construct not in text, f"the CUDA export contains {construct!r}"
    if config.use_moe:
        assert "ragged_dot" in text, "the MoE experts are not a grouped matmul"


@pytest.mark.parametrize("name, overrides", PRESETS)
def test_train_step_exports_for_cuda(name, overrides):
    config = _config(name, overrides)
    tx, schedule = make_optimizer(5e-4, 10)
    step = make_train_step(get_stage("pretrain"), config, "bf16", tx, schedule)
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0), "bf16"))
    state = jax.eval_shape(lambda p: init_train_state(config, tx, seed=0, policy="bf16", params=p)[0], params)
    batch = {k: jax.ShapeDtypeStruct((1, 2, 128), jnp.int32) for k in ("input_ids", "labels")}
    exported = jax.export.export(jax.jit(step, donate_argnums=0), platforms=("cuda",))(state, batch)
    _assert_gpu_clean(exported.mlir_module(), config)


@pytest.mark.parametrize("name, overrides", PRESETS)
def test_decode_loop_exports_for_cuda(name, overrides):
    config, policy = _config(name, overrides), get_policy("bf16-params")
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0), policy))
    rows = _make_rows([SamplingParams(temperature=0.8, top_p=0.9)] * 2, [16, 16], [2])
    prompt = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    state = jax.eval_shape(lambda p, ids, m: _prefill(p, ids, m, rows, config=config, policy=policy, max_len=64),
                           params, prompt, prompt)
    decode = jax.jit(lambda p, s, r, stop: _decode(p, s, r, stop, config=config, policy=policy))
    exported = jax.export.export(decode, platforms=("cuda",))(params, state, rows, jnp.int32(16))
    _assert_gpu_clean(exported.mlir_module(), config)
