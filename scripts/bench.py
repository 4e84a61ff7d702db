#!/usr/bin/env python
"""Benchmarks that print figures (never timed tests).

  python scripts/bench.py forward [--preset minimind3] [--batch 4] [--seq 256] [--policy fp32] [--iters 5]
      forward-pass latency, tokens/s and compile time of a preset under a policy
  python scripts/bench.py moe [--preset minimind3-moe] [--tokens 1024] [--policy fp32]
      the two exact MoE dispatch implementations (dense one-hot combine vs sorted grouped matmul),
      forward and forward+backward, on one MoE layer of the preset

  python scripts/bench.py convert [--preset minimind3-moe] [--dtype float32]
      the converter both ways on a full-size checkpoint with random weights (each direction in a fresh
      process): seconds and peak memory above the process's baseline (after imports and starting the
      XLA runtime)

  python scripts/bench.py data [--bench-mb 20] [--workers 2] [--batch 32] [--seq 512]
      pretrain data preparation (scripts/prepare_data.py) tokens/s next to raw tokenizers encode_batch, and
      pipeline batches/s reading the prepared format
  python scripts/bench.py data --stage sft|dpo|rlaif|agent [--bench-mb 4] [--workers 2] [--batch 16] [--seq 512]
      the same for a chat stage: preparation records/s and tokens/s vs raw encode_batch on the same rendered
      texts, and pipeline batches/s reading the prepared directory vs the jsonl file (augmentations on)
  python scripts/bench.py data --open-mb 1200 [--workers 2]
      opening a synthetic jsonl of that size: first open (newline scan) and cached open seconds and extra
      peak RSS, random-access records/s, and the full ``prepare_data.py --check`` time

  python scripts/bench.py loop [--steps 40] [--prefetch 2] [--repeats 2]
      the quickstart configuration (configs' default: 1.6M params, 16 x 128 tokens, fp32) on the bundled sample
      data: the bare jitted train step's steps/s (one batch on the devices, blocked on at the end) next to the
      training loop's (``train``'s run over the data, from its own tokens/s after the first step), and the ratio;
      repeated, each repeat a bare / loop pair

  python scripts/bench.py train [--preset minimind3] [--batch 4] [--seq 256] [--policy fp32 bf16] [--steps 10]
                                [--warmup 2] [--vs-torch] [--profile DIR]
      training steps (AdamW, clip 1.0, a fresh random batch each step, next-token cross-entropy): tokens/s
      (median step), model TFLOP/s and MFU against the measured matmul peak of the policy's dtype, peak RSS
      and compile time; ``--vs-torch`` runs transformers' Qwen3ForCausalLM (torch AdamW, fp32 and bf16
      autocast) on the same shapes and prints JAX / torch ratios. Every run is its own process, so each
      peak RSS belongs to one framework and one policy.

  python scripts/bench.py decode [--preset minimind3] [--batch 1 8] [--prompt 16] [--new 64] [--dtype float32 bfloat16]
                                 [--vs-torch]
      greedy KV-cache generation (scripts/generate.py's engine): decode tokens/s, first-token latency (the
      prefill), compile time, peak RSS and the weight-read bandwidth the decode achieves (every step reads all
      weights) against this machine's measured memory bandwidth; ``--vs-torch`` runs transformers' ``generate``
      (Qwen3ForCausalLM, the same weights, greedy) and prints the ratios and whether the greedy tokens match.

  python scripts/bench.py flops [--preset minimind3 minimind3-moe] [--batch 4] [--seq 256] [--kernels generic] [--memory]
      XLA's cost_analysis FLOPs of the compiled fp32 train step beside the analytical count (6 x active params x
      tokens + attention); for MoE also the count with every expert on every token (what XLA:CPU reports for
      ragged_dot); ``--memory`` adds XLA's memory analysis (temp / argument / output bytes)

  python scripts/bench.py serve [--preset tiny3] [--clients 1 4 16] [--requests 2] [--slots 8] [--prompt 8 60]
                                [--new 8 96] [--engines continuous batch]
      the server's engine without HTTP: N client threads, each sending its requests (mixed prompt lengths and
      max_tokens, sampled, no eos) one after another, against the continuous-batching engine (decode slots) and
      against batch-at-a-time scheduling over Generator.stream (the server's previous engine); requests/s,
      aggregate tokens/s, time to first token and inter-token latency (p50 / p95), after a warm-up run that
      compiles every shape; and whether both engines gave the same tokens for every seed

  python scripts/bench.py gpu [--steps 10] [--json gpu_check.json]
      on one GPU: minimind3 (bf16), minimind3-moe and a ~1B preset for a few steps each (tok/s, MFU against the
      GPU table's peak of the dtype, peak device memory, compile time), then decoding; writes one JSON
      (``scripts/gpu_check.sh`` runs it)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def timeit(fn, *args, iters: int = 5):
    """(compile + first run seconds, median seconds of ``iters`` further runs)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def bench_forward(args) -> None:
    from minimind_jax import MiniMindLM, ModelConfig, init_params, param_count

    config = ModelConfig.preset(args.preset, scan_layers=args.scan)
    params = init_params(config, jax.random.key(0), args.policy)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (args.batch, args.seq)), jnp.int32)
    fwd = jax.jit(lambda p, x: MiniMindLM(config, args.policy).apply({"params": p}, x).logits)
    first, t = timeit(fwd, params, ids, iters=args.iters)
    total, active = param_count(config)
    tokens = args.batch * args.seq
    flops = 2 * active * tokens  # matmul FLOPs of the weights (attention scores excluded)
    print(f"forward {args.preset} ({total / 1e6:.1f}M params, {active / 1e6:.1f}M active), policy {args.policy}, "
          f"batch {args.batch} x seq {args.seq}, scan={args.scan}, device {jax.devices()[0].platform}")
    print(f"  compile+first run {first:.2f} s | median {t * 1e3:.1f} ms | {tokens / t:,.0f} tokens/s | "
          f"{flops / t / 1e9:.1f} GFLOP/s (weights only)")


def bench_moe(args) -> None:
    import flax.linen as nn

    from minimind_jax import ModelConfig
    from minimind_jax.model.moe import MoE
    from minimind_jax.precision import get_policy

    base = ModelConfig.preset(args.preset)
    if not base.use_moe:
        raise SystemExit(f"preset {args.preset} is not a MoE model")
    x = jax.random.normal(jax.random.key(0), (1, args.tokens, base.hidden_size), jnp.float32)
    print(f"moe layer of {args.preset}: {base.num_experts} experts, top-{base.num_experts_per_tok}, "
          f"{base.n_shared_experts} shared, hidden {base.hidden_size}, inter {base.moe_intermediate_size}, "
          f"{args.tokens} tokens, policy {args.policy}, device {jax.devices()[0].platform}")
    params = None
    for impl in ("dense", "sorted"):
        config = base.replace(moe_impl=impl)
        layer = MoE(config, get_policy(args.policy), train=True)
        if params is None:
            params = nn.unbox(jax.jit(layer.init)(jax.random.key(1), x)["params"])
        fwd = jax.jit(lambda p, v, layer=layer: layer.apply({"params": p}, v)[0])

        def loss(p, v, layer=layer):
            y, aux = layer.apply({"params": p}, v)
            return jnp.mean(y.astype(jnp.float32) ** 2) + aux

        grad = jax.jit(jax.grad(loss))
        f_first, f_t = timeit(fwd, params, x, iters=args.iters)
        g_first, g_t = timeit(grad, params, x, iters=args.iters)
        print(f"  {impl:6s}: forward {f_t * 1e3:7.1f} ms | forward+backward {g_t * 1e3:7.1f} ms | "
              f"compile {f_first:.1f} + {g_first:.1f} s")


_CONVERT_CHILD = r"""
import json, os, sys, time
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
t_start = time.perf_counter()
# Imports and starting the XLA runtime (thread pools, allocator) are a fixed cost, not the conversion's.
import convert.cli, convert.api, minimind_jax.checkpoint, orbax.checkpoint, safetensors
import jax
jax.devices()
base = rss("VmRSS")
try:  # reset the high-water mark to the current RSS: the peak is then the conversion's alone
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:  # (an older kernel: VmHWM then also covers the imports, an upper bound)
    reset = False
t0, cpu0 = time.perf_counter(), os.times()
rc = convert.cli.main(sys.argv[1:])
t1, cpu1 = time.perf_counter(), os.times()
print(json.dumps({"rc": rc, "seconds": t1 - t0, "process_seconds": t1 - t_start, "base": base,
                  "cpu_seconds": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
                  "peak": rss("VmHWM"), "hwm_reset": reset}))
"""


def bench_convert(args) -> None:
    import json
    import subprocess
    import tempfile

    from convert.api import save_torch
    from minimind_jax import ModelConfig, init_params

    config = ModelConfig.preset(args.preset)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src, jx, back = f"{tmp}/hf", f"{tmp}/jax", f"{tmp}/back"
        fmt = "hf" if not (config.generation == "minimind2" and config.use_moe) else "minimind"
        save_torch(params, config, src, format=fmt, dtype=args.dtype)
        del params
        size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
        print(f"convert {args.preset}: source {fmt} directory, {args.dtype}, {size / 2**20:.0f} MiB "
              f"({size:,} bytes) of checkpoint; {os.cpu_count()} CPUs, load average "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (wall seconds grow with other work on the machine)")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for label, cmd in (("to-jax  ", ["to-jax", src, jx, "--dtype", "auto"]),
                           ("to-torch", ["to-torch", jx, back, "--format", fmt, "--dtype", args.dtype])):
            # Each direction in a fresh process: its peak RSS belongs to this conversion only.
            proc = subprocess.run([sys.executable, "-c", _CONVERT_CHILD, *cmd], capture_output=True, text=True,
                                  cwd=root)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
                raise SystemExit(f"{label.strip()} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            result = json.loads(lines[-1])
            if result["rc"] != 0:
                raise SystemExit(f"{label.strip()} failed (rc {result['rc']}):\n{proc.stderr[-4000:]}")
            extra = result["peak"] - result["base"]
            print(f"  {label}: {result['seconds']:5.1f} s (CPU {result['cpu_seconds']:4.1f} s; process "
                  f"{result['process_seconds']:4.1f} s with imports) | "
                  f"peak extra RSS {extra / 2**20:6.0f} MiB ({extra / size:.2f}x the checkpoint; "
                  f"baseline {result['base'] / 2**20:.0f} MiB{'' if result['hwm_reset'] else ', peak since start'})")


def bench_data(args) -> None:
    """scripts/prepare_data.py's benchmark (see ``python scripts/prepare_data.py --help``)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare_data.py")
    spec = importlib.util.spec_from_file_location("prepare_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if args.open_mb:
        module.bench_open(args.open_mb, args.workers)
    elif args.stage != "pretrain":
        module.bench_chat(args.stage, args.bench_mb or 4.0, args.workers, batch=args.batch or 16, seq=args.seq)
    else:
        module.bench_data(args.bench_mb or 20.0, args.workers, batch=args.batch or 32, seq=args.seq)


# ------------------------------------------------------------------------------------------------ train
# Dense peak TFLOP/s per device by device_kind substring: (float32 without tensor cores, as the fp32 policy
# runs at matmul precision "highest"; TF32 tensor cores, the tf32 policy; bf16). Looked up only on GPUs;
# CPUs are measured (there tf32 = fp32).
_GPU_PEAK_TFLOPS = {"H200": (67.0, 494.0, 989.0), "H100": (67.0, 494.0, 989.0), "A100": (19.5, 156.0, 312.0),
                    "L40S": (91.6, 183.0, 362.0), "L4": (30.3, 60.0, 121.0), "A10": (31.2, 62.5, 125.0),
                    "V100": (15.7, 15.7, 125.0)}


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_peak_tflops() -> dict[str, float]:
    """Peak matmul TFLOP/s of device 0 for float32 and bf16 (inputs bf16, float32 accumulation):
    the table above on GPUs, measured on CPUs (best of two square sizes, median of 5 jitted runs)."""
    device = jax.devices()[0]
    if device.platform == "gpu":
        for name, (fp32, tf32, bf16) in _GPU_PEAK_TFLOPS.items():
            if name in device.device_kind:
                return {"fp32": fp32, "tf32": tf32, "bf16": bf16, "source": f"table ({device.device_kind})"}
    peaks = {}
    for label, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        best = 0.0
        for n in (1024, 2048):
            a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
            dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
            _, t = timeit(dot, a, a, iters=5)
            best = max(best, 2 * n ** 3 / t / 1e12)
        peaks[label] = best
    peaks["tf32"] = peaks["fp32"]
    peaks["source"] = f"measured ({device.platform}, {os.cpu_count()} cores, jitted square matmuls)"
    return peaks


def peak_for_policy(peaks: dict, policy: str) -> float:
    """The matmul peak a policy's dots run at: fp32 (precision highest), tf32, else half precision (bf16)."""
    return peaks[policy if policy in ("fp32", "tf32") else "bf16"]


def train_flops_per_token(config, seq: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3x forward): 6 per matmul weight (the
    tied embedding counts once, as the LM head; an untied embedding is a lookup) plus the attention
    scores and mixing, 12 * layers * seq * heads * head_dim (the full square, as PaLM's MFU counts)."""
    from minimind_jax import param_count

    _, active = param_count(config)
    matmul_params = active - (0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size)
    attention = 12 * config.num_hidden_layers * seq * config.num_attention_heads * config.head_dim
    return 6 * matmul_params + attention


def _jax_train_step(config, policy, batch: int, seq: int):
    """(state, step_fn, batch_fn) for the JAX benchmark, built from the training engine itself
    (``minimind_jax.training.step``): ``step_fn(state, batch) -> (state, metrics)`` jitted on one device with
    the state donated (AdamW 5e-4, weight decay 0.01, clip 1.0, MiniMind's schedule, float32 params, the
    pretrain stage's next-token loss); ``batch_fn()`` a fresh random (1, batch, seq) batch each call.
    """
    from minimind_jax import sharding as shd
    from minimind_jax.training.stages import get_stage
    from minimind_jax.training.step import init_train_state, jit_train_step, make_optimizer, make_train_step

    tx, schedule = make_optimizer(5e-4, 1000)
    mesh = shd.make_mesh(None, devices=jax.devices()[:1])
    param_sharding = shd.param_shardings(config, mesh)
    state, state_sharding = init_train_state(config, tx, seed=0, policy=policy, mesh=mesh,
                                             param_sharding=param_sharding)
    batch_sharding = shd.batch_sharding(mesh, leading=1)
    step = jit_train_step(make_train_step(get_stage("pretrain"), config, policy, tx, schedule), state_sharding,
                          batch_sharding, mesh)
    rng = np.random.default_rng(0)

    def batch_fn():
        ids = rng.integers(0, config.vocab_size, (1, batch, seq)).astype(np.int32)
        return shd.shard_batch({"input_ids": ids, "labels": ids}, batch_sharding)

    def step_fn(state, b):
        state, metrics = step(state, b)
        return state, metrics["loss"]

    step_fn.lower = lambda state, b: _Lowered(step.lower(state, b))
    return state, step_fn, batch_fn


class _Lowered:
    """``step_fn.lower(...).compile()`` keeping the (state, loss) interface of ``_train_jax``."""

    def __init__(self, lowered):
        self.lowered = lowered

    def compile(self):
        compiled = self.lowered.compile()

        def run(state, b):
            state, metrics = compiled(state, b)
            return state, metrics["loss"]

        run.as_text = compiled.as_text
        return run


def _train_jax(config, policy: str, args) -> dict:
    state, step_fn, batch_fn = _jax_train_step(config, policy, args.batch, args.seq)
    ids = batch_fn()
    t0 = time.perf_counter()
    step_fn = step_fn.lower(state, ids).compile()
    compile_s = time.perf_counter() - t0
    times, loss = [], None
    for i in range(args.warmup + args.steps):
        ids = batch_fn()
        t0 = time.perf_counter()
        state, loss = step_fn(state, ids)
        jax.block_until_ready((state, loss))
        times.append(time.perf_counter() - t0)
    breakdown = None
    if args.profile:
        trace_dir = os.path.join(args.profile, f"jax-{policy}")
        with jax.profiler.trace(trace_dir):
            for _ in range(2):
                state, loss = step_fn(state, batch_fn())
            jax.block_until_ready((state, loss))
        breakdown = profile_breakdown(trace_dir, step_fn.as_text(), steps=2)
    return {"times": times[args.warmup:], "first_s": times[0], "compile_s": compile_s, "loss": float(loss),
            "breakdown": breakdown}


_MODULES = {"self_attn", "mlp", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "q_norm",
            "k_norm", "input_layernorm", "post_attention_layernorm", "norm", "experts", "shared_experts", "lm_head"}


def profile_breakdown(trace_dir: str, hlo_text: str, steps: int) -> list[tuple[str, float]]:
    """Milliseconds per step by (pass, module, op kind), from the newest profiler trace under ``trace_dir``:
    every profiled event named after an HLO instruction of the step is attributed through the
    instruction's ``op_name`` metadata (forward / backward / outside the model, and the model module:
    q_proj, mlp/down_proj, ...) and its kind (matmul, copy/transpose, other fusions). CPU thread time,
    so with two threads the total can exceed the wall time."""
    import collections
    import glob
    import re

    pb = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)[-1]
    op_names = dict(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', hlo_text, re.M))
    totals = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(pb).planes:
        for line in plane.lines:
            for event in line.events:
                op_name = op_names.get(event.name)
                if op_name is None:
                    continue
                name = event.name
                kind = ("matmul" if re.match(r"(ynn|dot|.*gemm|custom-call|.*matmul)", name)
                        else "copy/transpose" if ("copy" in name or "transpose" in name) else "other")
                if "MiniMindLM" not in op_name:
                    where = "outside the model (loss, optimizer)"
                else:
                    direction = "backward" if "transpose(jvp(" in op_name else "forward"
                    module = "/".join([p for p in op_name.split("/") if p in _MODULES][:2])
                    # The only matmul outside the blocks is the LM head (tied or not).
                    module = module or ("lm_head" if kind == "matmul" else "embedding/rope/mask")
                    where = f"{direction} {module}"
                totals[f"{where} [{kind}]"] += event.duration_ns / 1e6 / steps
    return totals.most_common()


def _train_torch(config, policy: str, args) -> dict:
    import contextlib

    import torch
    import torch.nn.functional as F
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from convert.api import hf_config

    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_flush_denormal(True)  # denormals made some steps take seconds
    torch.manual_seed(0)
    hf = hf_config(config, "float32")
    if hf["model_type"] != "qwen3":
        raise SystemExit(f"--vs-torch compares against Qwen3ForCausalLM; {config.generation} "
                         f"(moe={config.use_moe}) maps to {hf['model_type']}")
    hf = {k: v for k, v in hf.items() if k not in ("architectures", "model_type")}
    model = Qwen3ForCausalLM(Qwen3Config(**{**hf, "use_cache": False})).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    rng = np.random.default_rng(0)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if policy == "bf16" else contextlib.nullcontext()

    def step():
        ids = torch.from_numpy(rng.integers(0, config.vocab_size, (args.batch, args.seq + 1)))
        t0 = time.perf_counter()
        with autocast():
            logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, float(loss)

    times, loss = [], None
    for _ in range(args.warmup + args.steps):
        t, loss = step()
        times.append(t)
    return {"times": times[args.warmup:], "first_s": times[0], "compile_s": None, "loss": loss}


def _train_child(args) -> None:
    """One (framework, policy) run in this process; prints one JSON line."""
    import json

    from minimind_jax import ModelConfig

    framework, policy = args.child.split(":")
    config = ModelConfig.preset(args.preset, scan_layers=args.scan, remat_policy=args.remat)
    run = _train_jax if framework == "jax" else _train_torch
    result = run(config, policy, args)
    result["peak_rss"] = peak_rss_bytes()
    print(json.dumps(result))


def bench_train(args) -> None:
    import json
    import subprocess

    from minimind_jax import ModelConfig, param_count

    if args.child:
        return _train_child(args)
    config = ModelConfig.preset(args.preset, scan_layers=args.scan, remat_policy=args.remat)
    total, _ = param_count(config)
    tokens = args.batch * args.seq
    flops = train_flops_per_token(config, args.seq) * tokens
    peaks = matmul_peak_tflops()
    print(f"train {args.preset} ({total / 1e6:.1f}M params), batch {args.batch} x seq {args.seq}, "
          f"median of {args.steps} steps after {args.warmup} warm-up, scan={args.scan}, remat={args.remat}, "
          f"device {jax.devices()[0].device_kind}; {flops / tokens / 1e6:.0f} MFLOP/token")
    print(f"matmul peak: fp32 {peaks['fp32'] * 1e3:.0f} GFLOP/s, bf16->fp32 {peaks['bf16'] * 1e3:.0f} GFLOP/s "
          f"[{peaks['source']}]")
    runs = [("jax", p) for p in args.policy] + ([("torch", p) for p in args.policy] if args.vs_torch else [])
    passthrough = ["--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--remat", args.remat]
    passthrough += ["--scan"] if args.scan else []
    passthrough += ["--profile", args.profile] if args.profile else []
    print(f"  {'run':12s} {'tok/s':>7s} {'step ms':>8s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak RSS':>9s} "
          f"{'compile s':>9s} {'1st step s':>10s} {'loss':>6s}")
    results = {}
    for framework, policy in runs:
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "train", "--child",
                                   f"{framework}:{policy}", *passthrough], capture_output=True, text=True,
                                  timeout=args.timeout)
        except subprocess.TimeoutExpired:  # e.g. torch bf16 on a CPU without native bf16 matmuls
            print(f"  {framework + ' ' + policy:12s} did not finish {args.warmup + args.steps} steps in "
                  f"{args.timeout} s (--timeout)")
            continue
        if proc.returncode != 0:
            print(f"  {framework} {policy}: failed (rc {proc.returncode})\n{proc.stderr[-3000:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        t = float(np.median(r["times"]))
        r["tok_s"] = tokens / t
        tflops = flops / t / 1e12
        compile_s = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        print(f"  {framework + ' ' + policy:12s} {r['tok_s']:7.0f} {t * 1e3:8.0f} {tflops:8.3f} "
              f"{tflops / peaks[policy if policy in peaks else 'fp32']:6.1%} {r['peak_rss'] / 2**30:7.2f} GB "
              f"{compile_s:>9s} {r['first_s']:10.1f} {r['loss']:6.3f}")
        results[(framework, policy)] = r
        if r.get("breakdown"):
            total = sum(ms for _, ms in r["breakdown"])
            print(f"    profile ({args.profile}): {total:.0f} ms of thread time per step")
            for where, ms in r["breakdown"][:args.profile_top]:
                print(f"      {ms:8.1f} ms {ms / total:6.1%}  {where}")
    if args.vs_torch:
        pairs = [(("jax", p), ("torch", p)) for p in args.policy]
        jax_runs = [k for k in results if k[0] == "jax"]
        torch_runs = [k for k in results if k[0] == "torch"]
        best = (max(jax_runs, key=lambda k: results[k]["tok_s"]) if jax_runs else None,
                max(torch_runs, key=lambda k: results[k]["tok_s"]) if torch_runs else None)
        if None not in best and best not in pairs:  # best against best
            pairs.append(best)
        for a, b in pairs:
            if a in results and b in results:
                ra, rb = results[a], results[b]
                print(f"  {' '.join(a)} / {' '.join(b)}: tokens/s {ra['tok_s'] / rb['tok_s']:.2f}x, "
                      f"peak RSS {ra['peak_rss'] / rb['peak_rss']:.2f}x")


# ------------------------------------------------------------------------------------------------ decode
def _loop_config(out_dir: str, steps: int, prefetch: int):
    from minimind_jax.training import config as tconfig

    return tconfig.resolve(["--out_dir", out_dir, "--max_steps", str(steps + 1), "--log_interval", str(steps + 1),
                            "--save_interval", str(10 * steps), "--progress", "false", "--plot", "false",
                            "--tensorboard", "false", "--sample_prompt", "", "--prefetch_batches", str(prefetch)])


def _bare_steps_per_s(cfg, steps: int) -> float:
    """The loop's own jitted step on one fixed device batch, ``steps`` of them dispatched and blocked on once."""
    from minimind_jax import sharding as shd
    from minimind_jax.training import loop

    r = loop.setup(cfg)
    host = loop._next_batch(r.data_iter, cfg.accumulation_steps, r.stage.data_keys or r.stage.batch_keys)
    batch = shd.shard_batch(host, r.batch_sharding)
    state, _ = r.step_fn(r.state, batch)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = r.step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - t0
    r.manager.close()
    r.logger.close()
    return steps / elapsed


def _loop_steps_per_s(cfg) -> tuple[float, float]:
    """(steps/s, mean data_wait share) of the training loop after its first (compiling) step."""
    import json
    from pathlib import Path

    from minimind_jax.training import loop

    r = loop.setup(cfg)
    loop.run(r)
    rows = [json.loads(line) for line in (Path(r.run_dir) / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = cfg.batch_size * cfg.accumulation_steps * cfg.max_seq_len
    last = rows[-1]  # one read-back interval: steps 2..N, timed by the loop's wall clock between read-backs
    steps_per_s = last["tokens_per_s"] / tokens_per_step
    return steps_per_s, sum(row["data_wait"] for row in rows[1:]) * steps_per_s / (len(rows) - 1)


def bench_loop(args) -> None:
    import tempfile

    print(f"quickstart model, {args.steps} steps after the first, prefetch_batches {args.prefetch}, "
          f"{jax.device_count()} {jax.default_backend()} device(s)")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            bare = _bare_steps_per_s(_loop_config(os.path.join(tmp, f"bare{i}"), args.steps, args.prefetch),
                                     args.steps)
            looped, wait = _loop_steps_per_s(_loop_config(os.path.join(tmp, f"loop{i}"), args.steps, args.prefetch))
            print(f"repeat {i + 1}: bare step {bare:.2f} steps/s, loop {looped:.2f} steps/s, ratio "
                  f"{looped / bare:.3f} (target >= 0.95), data_wait {100 * wait:.1f}% of the loop's time")


def memory_bandwidth_gbs() -> dict[str, float]:
    """Measured memory bandwidth (GB/s) over 512 MiB of float32, best of 5 each: numpy's sum (one core, read
    only), numpy's copy (one core, counted as read + write) and a jitted sum (XLA's threads, read only)."""
    n = 128 * 2**20
    a = np.ones(n, np.float32)
    b = np.empty_like(a)

    def best(fn):
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return {"numpy_sum": 4 * n / best(lambda: a.sum()) / 1e9,
            "numpy_copy": 8 * n / best(lambda: np.copyto(b, a)) / 1e9,
            "jax_sum": 4 * n / best(lambda: total(x).block_until_ready()) / 1e9}


def _decode_prompts(config, batch: int, prompt: int) -> np.ndarray:
    return np.random.default_rng(batch).integers(3, config.vocab_size, (batch, prompt)).astype(np.int32)


def _decode_jax(config, dtype: str, args) -> dict:
    from minimind_jax import init_params
    from minimind_jax.generate import Generator, _prefill

    params = init_params(config, jax.random.key(0))
    gen = Generator(params, config, "fp32" if dtype == "float32" else "bf16-params", eos_ids=())
    del params
    out = {}
    for batch in args.batch:
        prompts = _decode_prompts(config, batch, args.prompt).tolist()
        t0 = time.perf_counter()
        first = gen.generate(prompts, args.new)
        first_s = time.perf_counter() - t0
        ids, mask, rows, max_len, _, _ = gen._prepare(prompts, args.new, None, ())

        def prefill():
            return _prefill(gen.params, ids, mask, rows, config=config, policy=gen.policy, max_len=max_len).out

        pre, totals = [], []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(prefill())
            pre.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            res = gen.generate(prompts, args.new)
            totals.append(time.perf_counter() - t0)
        assert [r.tokens for r in res] == [r.tokens for r in first]
        total = float(np.median(totals))
        out[batch] = {"total_s": total, "prefill_s": float(np.median(pre)), "compile_s": first_s - total,
                      "tokens": [r.tokens for r in res]}
    return out


def _decode_torch(config, dtype: str, args) -> dict:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    import convert
    from minimind_jax import init_params

    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as tmp:
        convert.save_torch(init_params(config, jax.random.key(0)), config, os.path.join(tmp, "hf"), format="hf",
                           dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "hf"), dtype=getattr(torch, dtype)).eval()
    out = {}
    for batch in args.batch:
        ids = torch.from_numpy(_decode_prompts(config, batch, args.prompt).astype(np.int64))
        mask = torch.ones_like(ids)

        def run(n):
            with torch.inference_mode():
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=config.pad_token_id)

        run(2)  # warm-up
        pre, totals = [], []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            run(1)
            pre.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            tokens = run(args.new)
            totals.append(time.perf_counter() - t0)
        out[batch] = {"total_s": float(np.median(totals)), "prefill_s": float(np.median(pre)), "compile_s": None,
                      "tokens": tokens[:, args.prompt:].tolist()}
    return out


def bench_decode(args) -> None:
    import json
    import subprocess

    from minimind_jax import ModelConfig, param_count

    config = ModelConfig.preset(args.preset)
    if args.child:
        framework, dtype = args.child.split(":")
        result = (_decode_jax if framework == "jax" else _decode_torch)(config, dtype, args)
        print(json.dumps({"runs": result, "peak_rss": peak_rss_bytes()}))
        return
    total, active = param_count(config)
    bw = memory_bandwidth_gbs()
    print(f"decode {args.preset} ({total / 1e6:.1f}M params), prompt {args.prompt}, {args.new} new tokens, greedy, "
          f"median of {args.iters}; device {jax.devices()[0].device_kind}")
    print(f"measured memory bandwidth: {bw['numpy_sum']:.1f} GB/s (numpy sum, read), {bw['numpy_copy']:.1f} GB/s "
          f"(numpy copy, read + write), {bw['jax_sum']:.1f} GB/s (jitted sum, read)")
    print(f"  {'run':18s} {'batch':>5s} {'decode tok/s':>12s} {'ms/step':>8s} {'weights GB/s':>12s} "
          f"{'1st token ms':>12s} {'compile s':>9s} {'peak RSS':>9s}")
    runs = [("jax", d) for d in args.dtype] + ([("torch", d) for d in args.dtype] if args.vs_torch else [])
    passthrough = ["--preset", args.preset, "--prompt", str(args.prompt), "--new", str(args.new),
                   "--iters", str(args.iters), "--batch", *map(str, args.batch)]
    results = {}
    for framework, dtype in runs:
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "decode", "--child",
                                   f"{framework}:{dtype}", *passthrough], capture_output=True, text=True,
                                  timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"  {framework} {dtype}: did not finish in {args.timeout} s (--timeout)")
            continue
        if proc.returncode != 0:
            print(f"  {framework} {dtype}: failed (rc {proc.returncode})\n{proc.stderr[-3000:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        weight_bytes = active * (4 if dtype == "float32" else 2)
        for batch, run in r["runs"].items():
            steps = args.new - 1
            decode_s = max(run["total_s"] - run["prefill_s"], 1e-9)
            run["tok_s"] = int(batch) * steps / decode_s
            compile_s = f"{run['compile_s']:.1f}" if run["compile_s"] is not None else "-"
            print(f"  {framework + ' ' + dtype:18s} {batch:>5s} {run['tok_s']:12.1f} {decode_s / steps * 1e3:8.1f} "
                  f"{weight_bytes * steps / decode_s / 1e9:12.2f} {run['prefill_s'] * 1e3:12.1f} {compile_s:>9s} "
                  f"{r['peak_rss'] / 2**30:7.2f} GB")
            results[(framework, dtype, batch)] = run
    for (framework, dtype, batch), run in results.items():
        ref = results.get(("torch", dtype, batch))
        if framework != "jax" or ref is None:
            continue
        same = sum(a == b for x, y in zip(run["tokens"], ref["tokens"]) for a, b in zip(x, y))
        count = sum(len(x) for x in ref["tokens"])
        print(f"  jax/torch {dtype} batch {batch}: decode tokens/s {run['tok_s'] / ref['tok_s']:.2f}x, "
              f"first token {ref['prefill_s'] / run['prefill_s']:.2f}x faster; greedy tokens equal: {same}/{count}")


def _timed_loglikelihood(lm) -> list[float]:
    """Wrap ``lm.loglikelihood`` so each call appends its seconds to the returned list (lm-eval's own task
    building and metrics are left out of the figure)."""
    seconds, inner = [], lm.loglikelihood

    def timed(requests, *a, **kw):
        t0 = time.perf_counter()
        try:
            return inner(requests, *a, **kw)
        finally:
            seconds.append(time.perf_counter() - t0)

    lm.loglikelihood = timed
    return seconds


def bench_eval(args) -> None:
    """lm-eval requests/s of the minimind-jax model vs lm-eval's hf model (transformers, fp32) on the same weights
    (a random-init preset exported by the converter) and the bundled offline multiple-choice samples."""
    import tempfile

    import convert
    from lm_eval.models.huggingface import HFLM  # optional: the eval extra

    from minimind_jax import ModelConfig, init_params
    from minimind_jax.evaluation.harness import MiniMindJaxLM
    from minimind_jax.evaluation.offline import evaluate
    from minimind_jax.tokenizer import DEFAULT_TOKENIZER_DIR

    config = ModelConfig.preset(args.preset)
    tasks = ["minimind_ceval", "minimind_cmmlu", "minimind_arc"]
    data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample", "eval")
    with tempfile.TemporaryDirectory() as root:
        tmp = os.path.join(root, "hf")
        convert.save_torch(init_params(config, jax.random.key(0)), config, tmp, format="hf", dtype="float32",
                           tokenizer=DEFAULT_TOKENIZER_DIR)
        models = {"minimind-jax": MiniMindJaxLM(pretrained=tmp, batch_size=args.batch),
                  "hf": HFLM(pretrained=tmp, batch_size=args.batch, dtype="float32", device="cpu")}
        figures = {}
        for name, lm in models.items():
            timed = _timed_loglikelihood(lm)
            for _ in range(1 + args.repeats):  # the first run of minimind-jax includes its compiles
                out = evaluate(lm, tasks, data_dir=data, log_samples=True)
            n = sum(len(s["resps"]) for samples in out["samples"].values() for s in samples)
            warm = float(np.median(timed[1:] or timed))
            figures[name] = n / warm
            print(f"{name:13s} {n} loglikelihood requests (time in the model's loglikelihood): first run "
                  f"{timed[0]:.2f} s, then median {warm:.2f} s -> {figures[name]:.1f} requests/s")
    print(f"minimind-jax / hf: {figures['minimind-jax'] / figures['hf']:.2f}x ({args.preset}, batch {args.batch})")


def _gpu_1b_config():
    """A ~1B-parameter minimind-3 (Qwen3-style) shape: hidden 2048, 24 layers, 16 heads, 8 kv heads."""
    from minimind_jax import ModelConfig

    return ModelConfig.preset("minimind3", hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                              num_key_value_heads=8, head_dim=128, intermediate_size=5632)


def _device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def bench_flops(args) -> None:
    """XLA's cost analysis of the compiled train step (``kernels=generic``: the plain einsums, no CPU-only
    VJPs) against the analytical model FLOPs of ``train_flops_per_token``; for MoE presets the analytical
    count is of the active experts, while XLA:CPU counts every expert of a ``ragged_dot``."""
    from minimind_jax import ModelConfig, param_count

    for preset in args.preset:
        config = ModelConfig.preset(preset, kernels=args.kernels)
        state, step_fn, batch_fn = _jax_train_step(config, "fp32", args.batch, args.seq)
        compiled = step_fn.lower(state, batch_fn()).lowered.compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla = float(cost.get("flops", float("nan")))
        tokens = args.batch * args.seq
        analytical = train_flops_per_token(config, args.seq) * tokens
        total, active = param_count(config)
        print(f"flops {preset} ({total / 1e6:.1f}M params, {active / 1e6:.1f}M active), kernels={args.kernels}, "
              f"batch {args.batch} x seq {args.seq}, fp32 train step, device {jax.devices()[0].platform}")
        print(f"  XLA cost_analysis {xla / 1e9:,.1f} GFLOP | analytical (6 x active params x tokens + attention) "
              f"{analytical / 1e9:,.1f} GFLOP | ratio {xla / analytical:.3f}")
        if config.use_moe:
            dense = analytical + 6 * tokens * (total - active)
            print(f"  MoE: analytical with every routed expert on every token {dense / 1e9:,.1f} GFLOP "
                  f"(XLA:CPU counts ragged_dot as that; a GPU's grouped matmul does the active count)")
        if args.memory:
            mem = compiled.memory_analysis()
            print(f"  memory_analysis: temp {mem.temp_size_in_bytes / 2**20:,.1f} MiB, arguments "
                  f"{mem.argument_size_in_bytes / 2**20:,.1f} MiB, output {mem.output_size_in_bytes / 2**20:,.1f} MiB")


def bench_grpo(args) -> None:
    """Memory (XLA's memory_analysis of the compiled step) and time of one GRPO / CISPO train step: the policy and
    the frozen reference both run forward on ``prompts x generations`` rollouts of ``prompt + new`` tokens, their
    log-probs through the chunked head; plus the rollouts' KV cache (analytical)."""
    from minimind_jax import ModelConfig, param_count
    from minimind_jax.precision import get_policy
    from minimind_jax.rl import grpo
    from minimind_jax.training.stages import Stage
    from minimind_jax.training.step import init_train_state, make_optimizer, make_train_step

    config = ModelConfig.preset(args.preset)
    rows, length = args.prompts * args.generations, args.prompt_len + args.new_tokens
    tx, _ = make_optimizer(3e-7, 100)
    settings = grpo.GRPOSettings(num_generations=args.generations)
    stage = Stage("grpo", "rlaif", grpo.make_stage_loss(settings, config, args.policy, config.eos_token_id),
                  grpo.count_sequences, grpo.BATCH_KEYS)
    state, _ = init_train_state(config, tx, seed=0, policy=args.policy)
    state = state.replace(frozen=jax.tree.map(jnp.array, state.params))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, (1, rows, length)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "completion_ids": ids[:, :, args.prompt_len:],
             "completion_pad": np.ones((1, rows, args.new_tokens), bool),
             "advantages": rng.standard_normal((1, rows)).astype(np.float32)}
    step = jax.jit(make_train_step(stage, config, args.policy, tx), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    step_s = time.perf_counter() - t0
    itemsize = np.dtype(get_policy(args.policy).compute_dtype).itemsize
    kv = 2 * config.num_hidden_layers * rows * length * config.num_key_value_heads * config.head_dim * itemsize
    total, _ = param_count(config)
    print(f"grpo step {args.preset} ({total / 1e6:.1f}M params), policy {args.policy}, {args.prompts} prompts x "
          f"{args.generations} rollouts x ({args.prompt_len} + {args.new_tokens}) tokens, device "
          f"{jax.devices()[0].platform}")
    print(f"  memory_analysis: temp {mem.temp_size_in_bytes / 2**20:,.1f} MiB, arguments "
          f"{mem.argument_size_in_bytes / 2**20:,.1f} MiB (policy, reference, optimizer state, batch); rollout "
          f"KV cache {kv / 2**20:,.1f} MiB; compile {compile_s:.1f} s, step {step_s:.2f} s")


# (name, config factory, policy, batch, seq) of the GPU check: a few steps each.
def _gpu_runs():
    from minimind_jax import ModelConfig

    return [("minimind3", lambda: ModelConfig.preset("minimind3"), "bf16", 16, 1024),
            ("minimind3-moe", lambda: ModelConfig.preset("minimind3-moe"), "bf16", 16, 1024),
            ("1b", _gpu_1b_config, "bf16", 8, 2048)]


def bench_gpu(args) -> None:
    """Training steps of minimind3 (bf16), minimind3-moe and a ~1B preset on device 0 (tok/s, MFU against
    the dtype's peak in the GPU table, peak device memory, compile time), then KV-cache decoding; all figures
    also written to ``args.json``. Meant for one NVIDIA GPU (``scripts/gpu_check.sh``)."""
    import json
    import types

    from minimind_jax import param_count

    peaks = matmul_peak_tflops()
    report = {"device": jax.devices()[0].device_kind, "peak_tflops": peaks, "train": [], "decode": {}}
    for name, make, policy, batch, seq in _gpu_runs():
        config = make()
        run_args = types.SimpleNamespace(batch=batch, seq=seq, steps=args.steps, warmup=2, profile=None)
        res = _train_jax(config, policy, run_args)
        step_s = float(np.median(res["times"]))
        tokens = batch * seq
        tflops = train_flops_per_token(config, seq) * tokens / step_s / 1e12
        peak = peak_for_policy(peaks, policy)
        row = {"name": name, "params_m": param_count(config)[0] / 1e6, "active_m": param_count(config)[1] / 1e6,
               "policy": policy, "batch": batch, "seq": seq, "tokens_per_s": tokens / step_s, "step_s": step_s,
               "model_tflops": tflops, "mfu": tflops / peak, "compile_s": res["compile_s"],
               "peak_device_bytes": _device_peak_bytes(), "loss": res["loss"]}
        report["train"].append(row)
        hbm = row["peak_device_bytes"]
        print(f"train {name:14s} {policy} {batch}x{seq}: {row['tokens_per_s']:,.0f} tok/s | MFU {row['mfu']:.1%} "
              f"({tflops:.0f} TFLOP/s of {peak:.0f}) | peak HBM {(hbm or 0) / 2**30:.1f} GiB | compile "
              f"{row['compile_s']:.1f} s", flush=True)
    from minimind_jax import ModelConfig

    dec_args = types.SimpleNamespace(batch=[1, 8], prompt=16, new=64, iters=3)
    for dtype in ("float32", "bfloat16"):
        res = _decode_jax(ModelConfig.preset("minimind3"), dtype, dec_args)
        for batch, r in res.items():
            decode_s = r["total_s"] - r["prefill_s"]
            tok_s = batch * (dec_args.new - 1) / decode_s
            report["decode"][f"{dtype}-b{batch}"] = {"tokens_per_s": tok_s, "prefill_s": r["prefill_s"],
                                                     "compile_s": r["compile_s"]}
            print(f"decode minimind3 {dtype} batch {batch}: {tok_s:,.0f} tok/s | prefill {r['prefill_s'] * 1e3:.1f} ms "
                  f"| compile {r['compile_s']:.1f} s", flush=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.json}")


class _BatchAtATime:
    """The scheduling the server had before its engine: a worker takes the first request waiting plus whatever
    else is queued (up to ``max_batch``, after a 5 ms wait), pads the batch to a power of two rows and runs it
    through ``Generator.stream`` until every row is done; requests arriving meanwhile wait for the next batch."""

    def __init__(self, generator, max_batch: int):
        import queue
        import threading

        self.generator, self.max_batch = generator, max_batch
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def submit(self, request) -> None:
        self.queue.put(request)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(60)

    def _run(self) -> None:
        import queue

        from minimind_jax.generate import SamplingParams

        while (first := self.queue.get()) is not None:
            batch, deadline = [first], time.monotonic() + 0.005
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            size = min(1 << (len(batch) - 1).bit_length(), self.max_batch)
            pad = size - len(batch)
            prompts = [r.prompt_ids for r in batch] + [batch[0].prompt_ids] * pad
            limits = [r.max_tokens for r in batch] + [1] * pad
            sampling = [r.sampling for r in batch] + [SamplingParams.make_greedy()] * pad
            for new in self.generator.stream(prompts, limits, sampling, eos_ids=(-1,), chunk=1):
                for r, tokens in zip(batch, new):
                    for t in tokens:
                        r.tokens.append(t)
                        r.on_token(t, False)
            for r in batch:
                r.finished.set()


def _serve_workload(args, seed: int) -> list[list[tuple[list[int], int]]]:
    """Per client, its requests: (prompt ids, max_tokens) of mixed lengths, the same for both engines."""
    rng = np.random.RandomState(seed)
    return [[(list(rng.randint(3, 6400, rng.randint(args.prompt[0], args.prompt[1] + 1))),
              int(rng.randint(args.new[0], args.new[1] + 1))) for _ in range(args.requests)]
            for _ in range(max(args.clients))]


def _serve_run(submit, workload, clients: int) -> dict:
    """``clients`` threads, each sending its requests one after the other; figures of the whole run."""
    import threading

    from minimind_jax.engine import Request
    from minimind_jax.generate import SamplingParams

    class Timed(Request):
        def on_token(self, token, is_eos):
            self.times.append(time.perf_counter())
            return False

    done: list = []

    def client(k: int) -> None:
        for j, (prompt, new) in enumerate(workload[k]):
            r = Timed(prompt, new, SamplingParams(temperature=1.0, top_p=0.9, seed=1000 * k + j))
            r.times, r.sent = [], time.perf_counter()
            submit(r)
            r.finished.wait()
            done.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r.times[0] - r.sent for r in done]
    itl = [b - a for r in done for a, b in zip(r.times, r.times[1:])]
    tokens = sum(len(r.tokens) for r in done)
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3 if xs else float("nan")  # noqa: E731
    return {"requests_s": len(done) / wall, "tokens_s": tokens / wall, "ttft_p50": pct(ttft, 50),
            "ttft_p95": pct(ttft, 95), "itl_p50": pct(itl, 50), "itl_p95": pct(itl, 95), "wall": wall,
            "tokens": [r.tokens for r in sorted(done, key=lambda r: r.sampling.seed)]}


def bench_serve(args) -> None:
    from minimind_jax import ModelConfig, init_params
    from minimind_jax.engine import Engine, SlotDecoder
    from minimind_jax.generate import Generator

    config = ModelConfig.preset(args.preset, vocab_size=6400)
    gen = Generator(init_params(config, jax.random.key(0)), config)
    cache_len = args.cache_len or config.max_position_embeddings
    workload = _serve_workload(args, seed=0)
    print(f"serve {args.preset} (random weights, fp32), {args.slots} slots / max batch, cache {cache_len}; per client "
          f"{args.requests} requests one after another, prompts {args.prompt[0]}-{args.prompt[1]} tokens, "
          f"{args.new[0]}-{args.new[1]} new tokens (sampled, no eos); device {jax.devices()[0].device_kind}")
    engine = Engine(SlotDecoder.for_generator(gen, slots=args.slots, cache_len=cache_len), eos_ids=(),
                    max_queue=max(args.clients) * args.requests, prefill_rows=args.prefill_rows)
    engine.start()
    batch = _BatchAtATime(gen, args.slots)
    engines = {"continuous": engine.submit, "batch": batch.submit}
    for name in args.engines:  # warm-up: the whole workload once, so no figure includes a compile
        t0 = time.perf_counter()
        for clients in args.clients:
            _serve_run(engines[name], workload, clients)
        print(f"  warm-up ({name}, every shape compiled): {time.perf_counter() - t0:.1f} s")
    print(f"  {'engine':11s} {'clients':>7s} {'req/s':>7s} {'tok/s':>8s} {'TTFT p50':>9s} {'p95 ms':>7s} "
          f"{'ITL p50':>8s} {'p95 ms':>7s}")
    results = {}
    for clients in args.clients:
        for name in args.engines:
            r = results[name, clients] = _serve_run(engines[name], workload, clients)
            print(f"  {name:11s} {clients:7d} {r['requests_s']:7.2f} {r['tokens_s']:8.1f} {r['ttft_p50']:9.1f} "
                  f"{r['ttft_p95']:7.1f} {r['itl_p50']:8.1f} {r['itl_p95']:7.1f}")
    engine.close()
    batch.close()
    for clients in args.clients:
        new, old = results.get(("continuous", clients)), results.get(("batch", clients))
        if new and old:
            print(f"  {clients} clients: continuous / batch tokens/s {new['tokens_s'] / old['tokens_s']:.2f}x, "
                  f"TTFT p95 {new['ttft_p95'] / old['ttft_p95']:.2f}x; same tokens per seed: "
                  f"{new['tokens'] == old['tokens']}")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def bench_soak(args) -> None:
    """The server under a flood: a 100 MB body, then ``--clients`` requests of ``--prompt-tokens`` at once; how
    long a normal request takes meanwhile, and the process's RSS before, during and after."""
    import concurrent.futures
    import http.client
    import json
    import threading

    import uvicorn

    from minimind_jax import ModelConfig, init_params
    from minimind_jax.generate import Generator
    from minimind_jax.server import create_app
    from minimind_jax.sse import listening_socket
    from minimind_jax.tokenizer import load_tokenizer

    tok = load_tokenizer()
    config = ModelConfig.preset(args.preset, vocab_size=len(tok), max_position_embeddings=args.context)
    gen = Generator(init_params(config, jax.random.key(0)), config)
    app = create_app(gen, tok, args.preset, max_batch=args.slots, warm_up=True)
    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()

    def post(path, body: bytes, timeout=3600):
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp.status, time.perf_counter() - t0

    normal = json.dumps({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}).encode()
    while not server.started:
        time.sleep(0.1)
    print(f"soak: {args.preset} (random weights, fp32), {args.slots} slots of {config.max_position_embeddings} "
          f"tokens; warming up (every decode and chunk shape compiles)")
    status, dt = post("/v1/chat/completions", normal)  # waits for the warm-up
    status, dt = post("/v1/chat/completions", normal)
    before = _rss_mb()
    print(f"  normal request alone: {status} in {dt:.2f} s; RSS {before:.0f} MB")
    status, dt = post("/v1/chat/completions", b"{" + b" " * (100 << 20) + b"}")
    print(f"  100 MB body: {status} in {dt:.2f} s; RSS {_rss_mb():.0f} MB")
    rng = np.random.RandomState(0)
    longs = [json.dumps({"prompt": [int(t) for t in rng.randint(3, len(tok), args.prompt_tokens)],
                         "max_tokens": 4}).encode() for _ in range(args.clients)]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        flood = [pool.submit(post, "/v1/completions", body) for body in longs]
        time.sleep(args.after)
        status, dt = post("/v1/chat/completions", normal)
        during = _rss_mb()
        print(f"  normal request {args.after:.0f} s into {args.clients} x {args.prompt_tokens}-token prompts: "
              f"{status} in {dt:.2f} s (target <= 5 s); RSS {during:.0f} MB")
        results = [f.result() for f in flood]
    codes = sorted({code for code, _ in results})
    print(f"  the {args.clients} long prompts: status {codes}, done in {time.perf_counter() - t0:.1f} s "
          f"(slowest {max(t for _, t in results):.1f} s)")
    status, dt = post("/v1/chat/completions", normal)
    after = _rss_mb()
    print(f"  normal request after: {status} in {dt:.2f} s; RSS {after:.0f} MB = {after / before:.2f}x of before "
          f"(target <= 1.20x)")
    server.should_exit = True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("forward", help="forward-pass latency of a preset")
    p.add_argument("--preset", default="minimind3")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--policy", default="fp32")
    p.add_argument("--scan", action="store_true", help="scan over layers")
    p.add_argument("--iters", type=int, default=5)
    p.set_defaults(fn=bench_forward)
    p = sub.add_parser("moe", help="MoE dispatch implementations")
    p.add_argument("--preset", default="minimind3-moe")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--policy", default="fp32")
    p.add_argument("--iters", type=int, default=5)
    p.set_defaults(fn=bench_moe)
    p = sub.add_parser("convert", help="checkpoint conversion both ways")
    p.add_argument("--preset", default="minimind3-moe")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--workdir", default=None, help="where to write the temporary checkpoints")
    p.set_defaults(fn=bench_convert)
    p = sub.add_parser("data", help="data preparation and prepared-pipeline throughput")
    p.add_argument("--stage", default="pretrain", choices=["pretrain", "sft", "dpo", "rlaif", "agent"])
    p.add_argument("--bench-mb", type=float, default=None, help="data size (default 20 pretrain, 4 chat)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="default 32 pretrain, 16 chat")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--open-mb", type=float, default=None,
                   help="instead: open / cached-open / random-access / --check figures on a synthetic jsonl this big")
    p.set_defaults(fn=bench_data)
    p = sub.add_parser("loop", help="the training loop's steps/s vs the bare jitted step (quickstart model)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prefetch", type=int, default=2, help="prefetch_batches of the loop")
    p.add_argument("--repeats", type=int, default=2)
    p.set_defaults(fn=bench_loop)
    p = sub.add_parser("train", help="training-step throughput, MFU and memory (optionally vs PyTorch)")
    p.add_argument("--preset", default="minimind3")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--policy", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--scan", action="store_true", help="scan over layers")
    p.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    p.add_argument("--vs-torch", action="store_true", help="also run transformers' Qwen3 with torch AdamW")
    p.add_argument("--profile", default=None, help="write a jax.profiler trace of two steps under DIR")
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed to each run (process)")
    p.add_argument("--profile-top", type=int, default=20, help="lines of the profile's breakdown")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one run per process
    p.set_defaults(fn=bench_train)
    p = sub.add_parser("eval", help="lm-eval requests/s: minimind-jax vs lm-eval's hf model (the eval extra)")
    p.add_argument("--preset", default="minimind3")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.set_defaults(fn=bench_eval)
    p = sub.add_parser("decode", help="KV-cache generation throughput (optionally vs transformers' generate)")
    p.add_argument("--preset", default="minimind3")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                   help="weight dtype: float32 (policy fp32) or bfloat16 (policy bf16-params; torch bf16 weights)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--vs-torch", action="store_true", help="also run transformers' generate on the same weights")
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed to each run (process)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.set_defaults(fn=bench_decode)
    p = sub.add_parser("flops", help="XLA cost-analysis FLOPs of the train step vs the analytical count")
    p.add_argument("--preset", nargs="+", default=["minimind3", "minimind3-moe"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--kernels", default="generic", choices=["auto", "xla_cpu", "generic"])
    p.add_argument("--memory", action="store_true", help="also print XLA's memory analysis of the step")
    p.set_defaults(fn=bench_flops)
    p = sub.add_parser("serve", help="the server's continuous-batching engine vs batch-at-a-time, N concurrent clients")
    p.add_argument("--preset", default="tiny3")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=2, help="requests per client, sent one after another")
    p.add_argument("--slots", type=int, default=8, help="decode slots (continuous) / max batch (batch-at-a-time)")
    p.add_argument("--prompt", type=int, nargs=2, default=[8, 60], help="prompt tokens: min max")
    p.add_argument("--new", type=int, nargs=2, default=[8, 96], help="new tokens: min max")
    p.add_argument("--cache-len", type=int, default=None, help="tokens per slot (default: the model's context)")
    p.add_argument("--engines", nargs="+", default=["continuous", "batch"], choices=["continuous", "batch"])
    p.add_argument("--prefill-rows", type=int, default=None,
                   help="the most waiting requests prefilled in one call (default: every free slot; 1: one at a time)")
    p.set_defaults(fn=bench_serve)
    p = sub.add_parser("soak", help="the HTTP server under a 100 MB body and many long prompts at once")
    p.add_argument("--preset", default="tiny3")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--prompt-tokens", type=int, default=30000)
    p.add_argument("--context", type=int, default=32768, help="the model's context = tokens per slot")
    p.add_argument("--after", type=float, default=5.0, help="seconds into the flood the normal request is sent")
    p.set_defaults(fn=bench_soak)
    p = sub.add_parser("grpo", help="memory and time of one GRPO / CISPO train step (policy + reference)")
    p.add_argument("--preset", default="minimind3")
    p.add_argument("--policy", default="bf16")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.set_defaults(fn=bench_grpo)
    p = sub.add_parser("gpu", help="the GPU check: train minimind3 / minimind3-moe / ~1B, then decode (one GPU)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", default="gpu_check.json")
    p.set_defaults(fn=bench_gpu)
    args = parser.parse_args(argv)
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
