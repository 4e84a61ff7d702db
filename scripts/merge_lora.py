"""Merge LoRA adapters into their base model and export the full weights (MiniMind's merge-and-export flow).

    python scripts/merge_lora.py --base out/sft_768/weights --adapter out/lora_768/adapter --out out/lora_merged
    python scripts/merge_lora.py --base out/sft_768/weights --adapter lora_identity_768.pth \\
        --out out/lora_minimind --format minimind --pth          # MiniMind's own adapter file, MiniMind's layout
    python scripts/merge_lora.py ... --format hf --dtype bfloat16 --tokenizer minimind_jax/assets/tokenizer

--base: any checkpoint --init reads (this project's, MiniMind .pth / safetensors, HF directory). --adapter: this
project's adapter directory (<run>/adapter, rank / alpha inside) or a MiniMind adapter file ({module}.lora.A.weight /
.lora.B.weight; rank from the shapes, alpha = rank unless --lora_alpha). Output: --format jax (this project's
checkpoint, the default), minimind or hf (through the converter, as `python -m convert to-torch`).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="merge_lora.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="base weights (the model the adapters were trained on)")
    p.add_argument("--adapter", required=True, help="adapter directory or MiniMind adapter .pth / .safetensors")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="jax", choices=("jax", "minimind", "hf"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--lora_alpha", type=float, default=None, help="scale alpha / rank (default: the adapter's, "
                   "or alpha = rank for MiniMind files)")
    p.add_argument("--pth", action="store_true", help="with --format minimind: also MiniMind's .pth")
    p.add_argument("--tokenizer", default=None, help="copy this tokenizer directory into the output (minimind / hf)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)

    from minimind_jax.checkpoint import CheckpointError
    from minimind_jax.config import ConfigError
    from minimind_jax.lora import LoraError, merge_checkpoint
    from minimind_jax.training.config import TrainConfigError

    try:
        merge_checkpoint(args.base, args.adapter, args.out, format=args.format, dtype=args.dtype,
                         alpha=args.lora_alpha, pth=args.pth, tokenizer=args.tokenizer, force=args.force)
    except (LoraError, CheckpointError, ConfigError, TrainConfigError, FileNotFoundError, FileExistsError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
