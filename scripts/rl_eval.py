"""Mean reward of a model on RL prompts (e.g. held-out ``rlaif.jsonl`` records), before and after an RL stage.

    python scripts/rl_eval.py --ckpt out/quickstart/sft_128/weights --data held_out.jsonl \
        --rewards '{exact: 1, numeric: 1, minimind: 0.2}'

Every prompt is rendered as the grpo stage renders it (no system prompt, thinking closed unless
``--thinking_ratio``), left-truncated to ``--max_prompt_len``; ``--generations`` rollouts each (fixed seed) with
MiniMind's sampling, plus one greedy reply. Prints the mean total reward and each component for both.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rl_eval.py", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="weights: this project's checkpoint or anything --init reads")
    p.add_argument("--data", required=True, help="rlaif-format jsonl (conversations + gt)")
    p.add_argument("--rewards", default="{exact: 1, numeric: 1}", help="YAML mapping reward name -> weight")
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=24)
    p.add_argument("--max_prompt_len", type=int, default=64)
    p.add_argument("--thinking_ratio", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--policy", default="fp32")
    p.add_argument("--show", type=int, default=0, help="print the first N prompts' replies and gt")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import numpy as np
    import yaml

    from minimind_jax import weights
    from minimind_jax.data import DataError, make_dataset
    from minimind_jax.data.rl_prompts import RLPromptSource
    from minimind_jax.rl import rollout
    from minimind_jax.rl.grpo import score_rollouts, unpack_prompts
    from minimind_jax.rl.rewards import RewardError
    from minimind_jax.tokenizer import load_tokenizer

    try:
        reward_weights = yaml.safe_load(args.rewards)
        config, params = weights.load(args.ckpt, what="--ckpt")
        tok = load_tokenizer()
        source = RLPromptSource(args.data, "rlaif")
        pipe = make_dataset("rlaif", args.data, tok, args.max_prompt_len, len(source), shuffle=False,
                            thinking_ratio=args.thinking_ratio)
    except (weights.WeightsError, DataError, ValueError, FileNotFoundError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batch = next(iter(pipe))
    prompts, records = unpack_prompts(batch, source)
    print(f"{len(prompts)} prompts from {args.data} ({int(batch['prompt_truncated'].sum())} truncated), "
          f"model {args.ckpt}")
    for name, g, temperature in (("sampled", args.generations, 0.8), ("greedy", 1, 0.0)):
        r = rollout.sample(params, config, prompts, num_generations=g, max_new_tokens=args.max_new_tokens, pad_id=0,
                           eos_ids=[tok.eos_token_id], seed=args.seed, policy=args.policy, temperature=temperature,
                           max_prompt_len=args.max_prompt_len)
        try:
            total, parts = score_rollouts(r, records, tok, reward_weights)
        except RewardError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        detail = ", ".join(f"{k} {np.mean(v):.4f}" for k, v in parts.items())
        print(f"{name} ({g} per prompt): mean reward {np.mean(total):.4f} ({detail})")
        for i in range(min(args.show, len(records)) * g):
            text = tok.decode([int(t) for t in r.completion_ids[i][r.completion_pad[i]]], skip_special_tokens=True)
            print(f"  gt {records[i // g].gt!r} reward {total[i]:.2f}: {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
