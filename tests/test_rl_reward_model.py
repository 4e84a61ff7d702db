"""The reward stage: MiniMind + a scalar head trained on preference pairs (Bradley-Terry), its loss against a
numpy transcription, the saved reward model's head checked on load, its scores as the grpo reward."""

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from minimind_jax.checkpoint import save_checkpoint
from minimind_jax.config import ModelConfig
from minimind_jax.data import make_dataset
from minimind_jax.data.samples import IGNORE_INDEX
from minimind_jax.model.transformer import MiniMindLM, init_params
from minimind_jax.precision import get_policy
from minimind_jax.rl import reward_model
from minimind_jax.tokenizer import load_tokenizer
from minimind_jax.training.config import TrainConfigError, from_dict
from minimind_jax.training.loop import train
from minimind_jax.training.stages import build_stage
from minimind_jax.training.step import make_apply
from minimind_jax.weights import WeightsError

ROOT = Path(__file__).resolve().parents[1]
DPO = str(ROOT / "data" / "sample" / "dpo.jsonl")
RLAIF = str(ROOT / "data" / "sample" / "rlaif.jsonl")
TINY_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "intermediate_size": 128}


def test_bradley_terry_loss_equals_numpy():
    config = ModelConfig.preset("minimind3", **TINY_MODEL)
    tok = load_tokenizer()
    micro = next(iter(make_dataset("dpo", DPO, tok, 64, 4, shuffle=False)))
    rng = np.random.default_rng(0)
    params = {"model": init_params(config, jax.random.key(0)),
              "head": {"kernel": rng.standard_normal(64).astype(np.float32), "bias": np.float32(0.3)}}
    total, _, metrics = reward_model.make_loss()(make_apply(config, get_policy("fp32")), params, None, micro,
                                                 jax.random.key(0))
    model = MiniMindLM(config, "fp32")

    def score(ids, labels):  # numpy: the hidden state at the last trained label, dotted with the head
        hidden = np.asarray(model.apply({"params": params["model"]}, ids, return_hidden=True).hidden)
        last = [np.nonzero(row != IGNORE_INDEX)[0].max() for row in labels]
        return np.array([hidden[i, j] @ params["head"]["kernel"] + 0.3 for i, j in enumerate(last)])

    margin = score(micro["chosen_input_ids"], micro["chosen_labels"]) - score(micro["rejected_input_ids"],
                                                                           micro["rejected_labels"])
    np.testing.assert_allclose(float(total), np.sum(np.log1p(np.exp(-margin))), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reward_accuracy"]), np.mean(margin > 0))


def _pairs(path, questions):
    """Preference pairs a tiny model can learn: a helpful reply preferred over a bare "no"."""
    with open(path, "w", encoding="utf-8") as f:
        for i in questions:
            q = [{"role": "user", "content": f"Question {i}: what is {i}+1?"}]
            f.write(json.dumps({"chosen": q + [{"role": "assistant", "content": f"The answer is {i + 1}, happy to help."}],
                                "rejected": q + [{"role": "assistant", "content": "no"}]}) + "\n")


def test_reward_stage_learns_the_pairs_and_scores_as_a_reward(tmp_path):
    config = ModelConfig.preset("minimind3", **TINY_MODEL)
    save_checkpoint(tmp_path / "init", init_params(config, jax.random.key(0)), config)
    _pairs(tmp_path / "pairs.jsonl", range(64))
    res = train(from_dict({
        "stage": "reward", "data_path": str(tmp_path / "pairs.jsonl"), "preset": "minimind3",
        "model": dict(TINY_MODEL), "init": str(tmp_path / "init"), "out_dir": str(tmp_path), "batch_size": 8,
        "accumulation_steps": 1, "max_seq_len": 64, "learning_rate": 3e-3, "lr_schedule": "constant",
        "dtype": "float32", "save_interval": 100, "progress": False, "sample_prompt": "",
        "async_checkpointing": False, "tensorboard": False}))
    rows = [json.loads(line) for line in (tmp_path / "reward_64" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # the head starts at zero
    assert rows[-1]["loss"] < 0.3 and rows[-1]["reward_accuracy"] == 1.0, rows[-1]
    out = tmp_path / "reward_64" / "reward_model"
    cfg, loaded = reward_model.load(out)
    np.testing.assert_array_equal(loaded["head"]["kernel"], np.asarray(res.params["head"]["kernel"]))
    # as a reward function, on questions it never saw: the helpful reply scores above "no"
    scorer = reward_model.RewardScorer(out, load_tokenizer())
    for i in (100, 205, 333):
        prompt = {"messages": [{"role": "user", "content": f"Question {i}: what is {i}+1?"}]}
        assert scorer(f"The answer is {i + 1}, happy to help.", prompt) > scorer("no", prompt) + 1.0
    # one padded forward for many responses (3 rows -> 4, lengths to one bucket) == each scored alone
    replies = ["no", "The answer is 7, happy to help with anything else you need today.", "7"]
    prompts = [{"messages": [{"role": "user", "content": f"what is {i}+1?"}]} for i in (3, 6, 10)]
    np.testing.assert_allclose(scorer.batch(replies, prompts), [scorer(r, p) for r, p in zip(replies, prompts)],
                               rtol=1e-5, atol=1e-6)
    # in a grpo step: the reward_model component of each rollout is the scorer's value
    grpo_cfg = from_dict({"stage": "grpo", "data_path": RLAIF, "model": dict(TINY_MODEL), "init": str(tmp_path / "init"),
                          "rewards": {"reward_model": 1.0, "minimind": 0.5}, "reward_model": str(out),
                          "num_generations": 2, "max_gen_len": 6, "max_seq_len": 32})
    tok = load_tokenizer()
    stage = build_stage(grpo_cfg, config, get_policy("fp32"), None, tok)
    data = next(iter(make_dataset("rlaif", RLAIF, tok, 32, 2, shuffle=False, thinking_ratio=0.0)))
    batch, metrics = stage.prepare({k: v[None] for k, v in data.items()}, SimpleNamespace(params=res.params["model"]), 0)
    texts = [tok.decode(row[pad].tolist(), skip_special_tokens=True)
             for row, pad in zip(batch["completion_ids"][0], batch["completion_pad"][0])]
    records = [stage.prepare.prompts[int(i)] for i in data["record_index"] for _ in range(2)]
    want = [scorer(t, {"messages": r.messages}) for t, r in zip(texts, records)]
    np.testing.assert_allclose(metrics["reward_reward_model"], np.mean(want), rtol=1e-5)
    # a damaged head is refused
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["extra"]["reward_head"]["kernel"][0] += 1.0
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError):
        reward_model.load(out)


def test_the_reward_model_reward_needs_its_directory():
    with pytest.raises(TrainConfigError, match="reward_model"):
        from_dict({"stage": "grpo", "rewards": {"reward_model": 1.0}})
