#!/usr/bin/env python
"""A first look at the model until ``scripts/train.py`` lands: presets, a forward pass, KV-cache decoding.

  python scripts/demo.py [--preset minimind3] [--policy fp32] [--seq 64] [--new-tokens 16]

Prints every preset's parameter count, builds the chosen preset with random weights, times a jitted
forward pass, checks that cached incremental decoding reproduces the full forward pass, and prints the
bf16-vs-fp32 logit difference. Weights are random, so the decoded ids are meaningless.
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

from minimind_jax import KVCache, MiniMindLM, ModelConfig, init_params, param_count  # noqa: E402
from minimind_jax.config import PRESETS  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind3", choices=sorted(PRESETS))
    parser.add_argument("--policy", default="fp32", help="fp32 | bf16 | fp16 | bf16-params")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    print("presets (total / active parameters):")
    for name in PRESETS:
        total, active = param_count(ModelConfig.preset(name))
        print(f"  {name:16s} {total:>13,} / {active:>13,}")

    config = ModelConfig.preset(args.preset)
    print(f"\n{args.preset}: {config.generation}, {'MoE' if config.use_moe else 'Dense'}, "
          f"hidden {config.hidden_size}, {config.num_hidden_layers} layers, policy {args.policy}, "
          f"device {jax.devices()[0].platform}")
    t0 = time.perf_counter()
    params = init_params(config, jax.random.key(0), args.policy)
    print(f"  init: {time.perf_counter() - t0:.1f} s")

    model = MiniMindLM(config, args.policy)
    ids = jnp.asarray(np.random.RandomState(0).randint(3, config.vocab_size, (1, args.seq)), jnp.int32)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
    t0 = time.perf_counter()
    full = jax.block_until_ready(forward(params, ids))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(forward(params, ids))
    step = (time.perf_counter() - t0) / 3
    print(f"  forward 1 x {args.seq}: compile {compile_s:.1f} s, then {step * 1e3:.1f} ms "
          f"({args.seq / step:,.0f} tokens/s)")

    # Greedy decoding over a preallocated cache: one prefill, then one token per step.
    decode = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c))
    prompt = ids[:, : args.seq // 2]
    cache = KVCache.init(config, 1, args.seq // 2 + args.new_tokens, jnp.dtype(model_dtype(args.policy)))
    out = decode(params, prompt, cache)
    tokens = []
    t0 = time.perf_counter()
    for _ in range(args.new_tokens):
        nxt = jnp.argmax(out.logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
        tokens.append(int(nxt[0, 0]))
        out = decode(params, nxt, out.cache)
    jax.block_until_ready(out.logits)
    dt = time.perf_counter() - t0
    print(f"  greedy decode {args.new_tokens} tokens (first call compiles): {dt:.2f} s -> ids {tokens}")

    # The cache is exact: the prompt's logits from the prefill equal the full forward pass.
    prefill = decode(params, prompt, KVCache.init(config, 1, args.seq, jnp.dtype(model_dtype(args.policy))))
    diff = float(jnp.abs(prefill.logits.astype(jnp.float32) - full[:, : prompt.shape[1]].astype(jnp.float32)).max())
    print(f"  cached prefill vs full forward: max |logit diff| {diff:.2e}")

    if args.policy == "fp32":
        bf16 = jax.jit(lambda p, x: MiniMindLM(config, "bf16").apply({"params": p}, x).logits)(params, ids)
        d = np.abs(np.asarray(bf16) - np.asarray(full))
        print(f"  bf16 vs fp32 policy: mean |logit diff| {d.mean():.2e}, max {d.max():.2e}")
    return 0


def model_dtype(policy: str):
    from minimind_jax import get_policy

    return get_policy(policy).compute_dtype


if __name__ == "__main__":
    sys.exit(main())
