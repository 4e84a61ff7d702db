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

Later issues add ``train`` and ``decode``.
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
import json, sys, time
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import convert.cli, convert.api, minimind_jax.checkpoint  # imports are not the conversion's cost
import jax
jax.devices()  # nor is starting the XLA runtime (thread pools, allocator): a fixed cost, not per-checkpoint
base = rss("VmRSS")
t0 = time.perf_counter()
rc = convert.cli.main(sys.argv[1:])
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "base": base, "peak": rss("VmHWM")}))
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
        print(f"convert {args.preset}: source {fmt} directory, {args.dtype}, {size / 2**20:.0f} MiB of tensors")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        for label, cmd in (("to-jax  ", ["to-jax", src, jx, "--dtype", "auto"]),
                           ("to-torch", ["to-torch", jx, back, "--format", fmt, "--dtype", args.dtype])):
            proc = subprocess.run([sys.executable, "-c", _CONVERT_CHILD, *cmd], capture_output=True, text=True,
                                  cwd=root)
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            extra = result["peak"] - result["base"]
            print(f"  {label}: {result['seconds']:5.1f} s | peak extra memory {extra / 2**20:6.0f} MiB "
                  f"({extra / size:.2f}x the checkpoint) | rc {result['rc']}")


def bench_data(args) -> None:
    """scripts/prepare_data.py's benchmark (see ``python scripts/prepare_data.py --help``)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare_data.py")
    spec = importlib.util.spec_from_file_location("prepare_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.bench_data(args.bench_mb, args.workers, batch=args.batch, seq=args.seq)


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
    p = sub.add_parser("data", help="pretrain data preparation and prepared-pipeline throughput")
    p.add_argument("--bench-mb", type=float, default=20.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=512)
    p.set_defaults(fn=bench_data)
    args = parser.parse_args(argv)
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
