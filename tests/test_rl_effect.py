"""``scripts/rl_eval.py --show N``: the replies it prints are the rollouts it scored (one line per rollout of
the first N prompts, each with its record's gt and a reward that matches the printed mean)."""

import ast
import importlib.util
import re
from pathlib import Path

import jax

from minimind_jax.checkpoint import save_checkpoint
from minimind_jax.config import ModelConfig
from minimind_jax.model.transformer import init_params
from minimind_jax.rl.rewards import numeric_match

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "intermediate_size": 128}


def test_rl_eval_show_prints_the_scored_replies(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("rl_eval", ROOT / "scripts" / "rl_eval.py")
    rl_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rl_eval)
    config = ModelConfig.preset("minimind3", **TINY_MODEL)
    save_checkpoint(tmp_path / "init", init_params(config, jax.random.key(0)), config)
    held = tmp_path / "held.jsonl"
    held.write_text("".join((ROOT / "data" / "sample" / "rlaif.jsonl").read_text().splitlines(keepends=True)[:3]))
    assert rl_eval.main(["--ckpt", str(tmp_path / "init"), "--data", str(held), "--generations", "2",
                         "--max_new_tokens", "4", "--rewards", "{numeric: 1}", "--show", "2"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^  gt '(.*)' reward (\S+): (.*)$", out, re.M)
    assert len(rows) == 2 * 2 + 2  # 2 prompts x 2 sampled, then 2 prompts x 1 greedy
    gts = [line.split('"gt": ')[1].strip('"}\n') for line in held.read_text().splitlines()]
    assert [r[0] for r in rows] == [gts[0], gts[0], gts[1], gts[1], gts[0], gts[1]]
    for gt, reward, text in rows:
        assert float(reward) == numeric_match(ast.literal_eval(text), {"gt": gt})
