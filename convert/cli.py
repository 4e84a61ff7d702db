"""``python -m convert`` (also ``minimind-convert``): move checkpoints between PyTorch and this project.

  to-jax   SRC OUT [--config CONFIG_JSON] [--dtype auto|float32|bfloat16|float16] [--scan-layers] [--force]
  to-torch SRC OUT [--format minimind|hf] [--dtype float32|bfloat16|float16] [--pth [NAME]]
                   [--tokenizer DIR] [--clip-fp16] [--force]
  inspect  PATH [--compare-precision]

SRC / PATH: a .safetensors file, a Hugging Face directory (model.safetensors or a sharded index), a MiniMind
.pth state dict, or (to-torch, inspect) this project's checkpoint directory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from convert import dtypes as dt
from convert.api import Report, load_torch, save_torch
from convert.io import read_source_config, read_tensors
from minimind_jax import MiniMindLM
from minimind_jax.checkpoint import flatten_params, is_checkpoint, load_checkpoint, save_checkpoint

EXPECTED_ERRORS = (ValueError, FileExistsError, FileNotFoundError, RuntimeError, OSError)


def _is_project_checkpoint(path: str) -> bool:
    return is_checkpoint(path)


def _load_any(path: str, config=None, dtype=None, report=None):
    """(config, params) from this project's checkpoint or any PyTorch source."""
    if _is_project_checkpoint(path):
        cfg, params = load_checkpoint(path, dtype=None if dtype in (None, "auto") else dtype, as_numpy=True)
        if report is not None:
            report.source, report.config_source = path, f"{path}/config.json (minimind-jax checkpoint)"
        return cfg, params
    return load_torch(path, config=config, dtype=dtype, report=report)


def cmd_to_jax(args) -> int:
    t0 = time.perf_counter()
    report = Report()
    cfg, params = load_torch(args.src, config=args.config, dtype=args.dtype,
                             scan_layers=True if args.scan_layers else None, report=report)
    source = {"path": str(Path(args.src).resolve()), "config": report.config_source,
              "stored_dtypes": report.stored_dtypes}
    save_checkpoint(args.out, params, cfg, source=source, force=args.force,
                    extra={"casts": report.casts.lines(), "notes": report.notes})
    for line in report.lines():
        print(line)
    print(f"wrote {args.out} ({cfg.generation}, {'MoE' if cfg.use_moe else 'Dense'}, "
          f"{'scanned' if cfg.scan_layers else 'per-layer'} layout) in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_to_torch(args) -> int:
    t0 = time.perf_counter()
    load_report = Report()
    # Our checkpoint loads in its stored dtypes and the export casts (and reports) once; a PyTorch source
    # is cast straight to the target on load, so its report names the stored tensors' casts.
    # (--clip-fp16 is the export's business: such a source loads in float32 first.)
    load_dtype = None if _is_project_checkpoint(args.src) or args.clip_fp16 else args.dtype
    cfg, params = _load_any(args.src, dtype=load_dtype, report=load_report)
    report = Report()
    save_torch(params, cfg, args.out, format=args.format, dtype=args.dtype, pth=args.pth or False,
               tokenizer=args.tokenizer, force=args.force, clip_fp16=args.clip_fp16, report=report)
    print(f"source: {args.src} ({load_report.config_source})")
    if load_dtype is not None:
        print(f"stored dtypes: {', '.join(f'{k} x{v}' for k, v in sorted(load_report.stored_dtypes.items()))}")
        for line in load_report.casts.lines():
            if not line.startswith("no casts"):
                print(line)
        for note in load_report.notes:
            print(f"note: {note}")
        report.notes.append("cast on load from the stored dtypes (listed above)")
    for line in report.lines()[2:]:
        if load_dtype is None or not line.startswith(("stored dtypes", "no casts")):
            print(line)
    print(f"wrote {args.out} (format {args.format}, {report.dtype}) in {time.perf_counter() - t0:.1f} s")
    return 0


def _tensors_for_inspect(path: str):
    """(name -> array, config or None, description)."""
    if _is_project_checkpoint(path):
        cfg, params = load_checkpoint(path, as_numpy=True)
        return {k: np.asarray(v) for k, v in flatten_params(params)}, cfg, "minimind-jax checkpoint"
    tensors = read_tensors(path)
    raw, _ = read_source_config(path)
    return tensors, raw, "PyTorch checkpoint"


def cmd_inspect(args) -> int:
    tensors, cfg, kind = _tensors_for_inspect(args.path)
    print(f"{args.path}: {kind}, {len(tensors)} tensors")
    width = max(len(n) for n in tensors)
    print(f"{'name':{width}s}  {'shape':>20s}  {'dtype':>9s}  {'abs-max':>10s}")
    too_big, non_finite, total, by_dtype = [], [], 0, {}
    for name in sorted(tensors, key=_natural):
        arr = tensors[name]
        wide = np.asarray(arr, np.float32) if arr.dtype != np.float32 else arr
        peak = float(np.max(np.abs(wide))) if arr.size else 0.0
        if not np.all(np.isfinite(wide)):
            non_finite.append(name)
        elif peak > dt.FLOAT16_MAX:
            too_big.append(f"{name} ({peak:.4g})")
        key = np.dtype(arr.dtype).name
        count, numel, nbytes = by_dtype.get(key, (0, 0, 0))
        by_dtype[key] = (count + 1, numel + arr.size, nbytes + arr.nbytes)
        total += arr.size
        print(f"{name:{width}s}  {str(tuple(arr.shape)):>20s}  {key:>9s}  {peak:10.4g}")
    print("\nby dtype:")
    for key, (count, numel, nbytes) in sorted(by_dtype.items()):
        print(f"  {key:9s} {count:5d} tensors  {numel:>14,} values  {nbytes / 2**20:9.1f} MiB")
    print(f"  total     {len(tensors):5d} tensors  {total:>14,} values")
    print(f"embeddings: {_tied(tensors)}")
    if non_finite:
        print(f"WARNING: {len(non_finite)} tensor(s) hold inf/nan: {', '.join(non_finite[:8])}")
    if too_big:
        print(f"WARNING: {len(too_big)} tensor(s) exceed the float16 range (+-65504), a float16 export would "
              f"overflow: {', '.join(too_big[:8])}")
    if not non_finite and not too_big:
        print("no warnings (all values finite and within the float16 range)")
    if args.compare_precision:
        _compare_precision(args.path)
    return 0


def _tied(tensors) -> str:
    if "embed_tokens" in tensors:  # our layout
        return "untied (lm_head present)" if "lm_head" in tensors else "tied (no separate lm_head)"
    head, emb = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    if head is None:
        return "tied (no lm_head.weight)"
    if emb is not None and np.array_equal(head, emb):
        return "tied (lm_head.weight duplicates model.embed_tokens.weight)"
    return "untied (lm_head.weight differs from the embedding)"


def _compare_precision(path: str, seq: int = 64) -> None:
    cfg, params = _load_any(path, dtype="float32")
    ids = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, (1, seq)), jnp.int32)
    logits = {}
    for policy in ("fp32", "bf16", "fp16"):
        fn = jax.jit(lambda p, x, policy=policy: MiniMindLM(cfg, policy).apply({"params": p}, x).logits)
        logits[policy] = np.asarray(fn(params, ids), np.float64)
    print(f"\nprecision (fixed input of {seq} tokens, logits compared with the fp32 run):")
    for policy in ("bf16", "fp16"):
        diff = np.abs(logits[policy] - logits["fp32"])
        agree = float(np.mean(logits[policy].argmax(-1) == logits["fp32"].argmax(-1)))
        print(f"  {policy}: mean |logit diff| {diff.mean():.3e}, max {diff.max():.3e}, "
              f"argmax agreement {agree:.1%}")


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in name.replace("/", ".").split(".")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minimind-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("to-jax", help="PyTorch checkpoint -> minimind-jax checkpoint directory")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--config", help="config.json to use (default: the one beside SRC, else inferred)")
    p.add_argument("--dtype", default="float32", choices=["auto", *dt.TABLE],
                   help="params dtype (default float32, for training; auto follows the source config)")
    p.add_argument("--scan-layers", action="store_true", help="store params in the nn.scan layout")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(fn=cmd_to_jax)
    p = sub.add_parser("to-torch", help="minimind-jax checkpoint (or PyTorch checkpoint) -> PyTorch directory")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--format", default="minimind", choices=["minimind", "hf"])
    p.add_argument("--dtype", default="float32", choices=list(dt.TABLE))
    p.add_argument("--pth", nargs="?", const=True, metavar="NAME",
                   help="also write MiniMind's .pth (default name full_sft_{hidden}[_moe].pth)")
    p.add_argument("--tokenizer", help="copy this tokenizer directory into OUT")
    p.add_argument("--clip-fp16", action="store_true", help="clip values beyond +-65504 when exporting float16")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(fn=cmd_to_torch)
    p = sub.add_parser("inspect", help="tensor table, dtype summary, tied embeddings, warnings")
    p.add_argument("path")
    p.add_argument("--compare-precision", action="store_true",
                   help="run the model in fp32, bf16 and fp16 and print the logit differences")
    p.set_defaults(fn=cmd_inspect)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except EXPECTED_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
