"""The GPU path stays alive without a GPU: the train step and the decode loop lower for CUDA on this CPU
(``jax.export`` with ``platforms=("cuda",)``, ``kernels=auto`` resolved as on a GPU, bf16 policy), and the
exported modules hold nothing CPU-only: no host callbacks, no ``optimization_barrier`` (the XLA:CPU
transposes), and for MoE a grouped matmul (``ragged_dot``) over tokens sorted by expert. On a CUDA host the
attention of the train step and the prefill is cuDNN flash attention, lowered here as it would be there."""

import re

import jax
import jax.numpy as jnp
import pytest
from jax._src.cudnn import fused_attention_stablehlo  # the cuDNN version probe the flash-attention test stands in for

from minimind_jax import ModelConfig, init_params
from minimind_jax.generate import SamplingParams, _decode, _make_rows, _prefill
from minimind_jax.model import attention
from minimind_jax.precision import get_policy
from minimind_jax.training.stages import get_stage
from minimind_jax.training.step import init_train_state, make_optimizer, make_train_step

PRESETS = [("minimind3", {}), ("minimind3-moe", {}), ("minimind3-moe", {"scan_layers": True, "remat_policy": "dots"})]
CPU_ONLY = ("optimization_barrier", "callback", "xla_python")
# cuDNN's fused attention has no serialisation guarantee: an export made on a CUDA host must allow it
CUDNN_CALLS = [jax.export.DisabledSafetyCheck.custom_call(f"__cudnn$fmha{name}") for name in
               ("Softmax", "SoftmaxBackward", "ScaleBiasSoftmax", "ScaleBiasSoftmaxBackward")]


def _config(name, overrides):
    return ModelConfig.preset(name, **overrides)


def _abstract_train_step(config, seq):
    tx, schedule = make_optimizer(5e-4, 10)
    step = make_train_step(get_stage("pretrain"), config, "bf16", tx, schedule)
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0), "bf16"))
    state = jax.eval_shape(lambda p: init_train_state(config, tx, seed=0, policy="bf16", params=p)[0], params)
    batch = {k: jax.ShapeDtypeStruct((1, 2, seq), jnp.int32) for k in ("input_ids", "labels")}
    return step, state, batch


def _assert_gpu_clean(text, config):
    for construct in CPU_ONLY:
        assert construct not in text, f"the CUDA export contains {construct!r}"
    if config.use_moe:
        assert "ragged_dot" in text, "the MoE experts are not a grouped matmul"


@pytest.mark.parametrize("name, overrides", PRESETS)
def test_train_step_exports_for_cuda(name, overrides):
    config = _config(name, overrides)
    step, state, batch = _abstract_train_step(config, 128)
    exported = jax.export.export(jax.jit(step, donate_argnums=0), platforms=("cuda",),
                                 disabled_checks=CUDNN_CALLS)(state, batch)
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
    exported = jax.export.export(decode, platforms=("cuda",), disabled_checks=CUDNN_CALLS)(params, state, rows,
                                                                                         jnp.int32(16))
    _assert_gpu_clean(exported.mlir_module(), config)


def _scores(text, seq):
    """The lines of a lowered module where a matmul or an exp computes a float32 (..., seq, seq) tensor:
    attention scores or probabilities. (Under autodiff ``platform_dependent`` gives every branch slots for
    the other branches' residuals, zero-filled broadcasts in the module that XLA removes when it compiles
    the one branch; they compute nothing and are not counted.)"""
    shape = re.compile(rf"-> tensor<(?:\d+x)*{seq}x{seq}xf32>")
    return [line.strip()[:160] for line in text.splitlines()
            if ("dot_general" in line or "exponential" in line) and shape.search(line)]


@pytest.mark.parametrize("name", ["minimind3", "minimind3-moe"])
def test_attention_is_cudnn_flash_on_a_cuda_host(name, monkeypatch):
    """As lowered for CUDA on a host with cuDNN (stood in for: tracing the cuDNN branch asks JAX's CUDA plugin
    for its version), the bf16 train step's attention is cuDNN flash attention, forward and backward, with the
    causal mask as a mask type: no float32 (seq, seq) tensor is left in the module. The prefill writes a KV
    cache (mask over the cache slots) and also runs on cuDNN; on the CPU the same step keeps the einsums.
    (Only the lowering is checked: no GPU was at hand to run it.)"""
    config = _config(name, {})
    seq = 256
    step, state, batch = _abstract_train_step(config, seq)
    cpu_text = jax.jit(step).trace(state, batch).lower(lowering_platforms=("cpu",)).as_text()
    assert _scores(cpu_text, seq), "the CPU einsum path should hold (seq, seq) float32 scores"
    monkeypatch.setattr(attention, "cudnn_available", lambda: True)
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
    step, state, batch = _abstract_train_step(config, seq)  # a new function: JAX caches the first trace
    text = jax.jit(step).trace(state, batch).lower(lowering_platforms=("cuda",)).as_text()
    assert "@__cudnn$fmhaSoftmax(" in text and "@__cudnn$fmhaSoftmaxBackward(" in text
    assert not _scores(text, seq), f"float32 (seq, seq) tensors in the CUDA train step: {_scores(text, seq)[:3]}"
    _assert_gpu_clean(text, config)

    policy = get_policy("bf16-params")
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0), policy))
    rows = _make_rows([SamplingParams(temperature=0.8, top_p=0.9)] * 2, [16, 16], [2])
    prompt = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    # max_len 48, not the decode test's 64: _prefill is jitted, and a trace cached without cuDNN would be reused
    prefill = jax.jit(lambda p, ids, m: _prefill(p, ids, m, rows, config=config, policy=policy, max_len=48))
    prefill_text = prefill.trace(params, prompt, prompt).lower(lowering_platforms=("cuda",)).as_text()
    assert "@__cudnn$fmhaScaleBiasSoftmax(" in prefill_text
