"""Train a MiniMind model with JAX: every stage, one loop.

    python scripts/train.py                                   # the quickstart: small model, sample data, ~2 min on CPU
    python scripts/train.py --stage pretrain --preset minimind3 --data_path pretrain_hq.jsonl
    python scripts/train.py --stage sft --from_weight pretrain --data_path sft_mini_512.jsonl
    python scripts/train.py --config configs/quickstart_sft.yaml
    python scripts/train.py --stage grpo --from_weight sft --data_path rlaif.jsonl   # RL (GRPO / CISPO)
    python scripts/train.py ... --from_resume 1               # continue the run exactly where it stopped
    python scripts/train.py ... --mesh data=2,fsdp=2,tensor=2  # shard over 8 devices

Settings: configs/<stage>.yaml, then --config files, then flags (MiniMind's names), then key=value.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from minimind_jax.training.config import TrainConfigError, resolve

    try:
        cfg = resolve(argv)
    except TrainConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from minimind_jax.checkpoint import CheckpointError
    from minimind_jax.config import ConfigError
    from minimind_jax.data import DataError
    from minimind_jax.rl.rewards import RewardError
    from minimind_jax.training.loop import TrainingError, train

    try:
        result = train(cfg)
    except (TrainConfigError, DataError, CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingError, RewardError) as e:  # the last complete checkpoint is kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.stopped == "interrupted":  # the shell's convention: 128 + the signal (130 Ctrl-C, 143 SIGTERM)
        return 128 + int(result.stop_signal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
