"""GRPO on the one training loop: policy and reference log-probs identical by construction before the first
update (fp32 and bf16), the stage loss equal to the self-contained GRPO loss (itself checked against MiniMind's
formula in numpy), a run with rewards / KL / rollout metrics and a reward curve, exact resume onto another mesh,
left-truncated prompts counted, and a non-finite reward that stops the run naming the record."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax.checkpoint import save_checkpoint
from minimind_jax.config import ModelConfig
from minimind_jax.data import make_dataset
from minimind_jax.data.rl_prompts import RLPromptSource
from minimind_jax.model.transformer import init_params
from minimind_jax.precision import get_policy
from minimind_jax.rl import grpo, rewards, rollout
from minimind_jax.rl.rewards import RewardError
from minimind_jax.tokenizer import load_tokenizer
from minimind_jax.training.config import from_dict
from minimind_jax.training.loop import train
from minimind_jax.training.step import make_apply

ROOT = Path(__file__).resolve().parents[1]
RLAIF = str(ROOT / "data" / "sample" / "rlaif.jsonl")
TINY_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "intermediate_size": 128}
SETTINGS = grpo.GRPOSettings(num_generations=4, max_new_tokens=8, max_prompt_len=32)


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    config = ModelConfig.preset("minimind3", **TINY_MODEL)
    path = tmp_path_factory.mktemp("rl") / "init"
    save_checkpoint(path, init_params(config, jax.random.key(0)), config)
    return path, config


def grpo_run(out_dir, init, **over):
    settings = {"stage": "grpo", "data_path": RLAIF, "preset": "minimind3", "model": dict(TINY_MODEL),
                "init": str(init), "out_dir": str(out_dir), "batch_size": 2, "accumulation_steps": 1,
                "max_seq_len": 48, "max_gen_len": 12, "num_generations": 4, "learning_rate": 3e-3,
                "lr_schedule": "constant", "dtype": "float32", "max_steps": 4, "save_interval": 2,
                "log_interval": 1, "progress": False, "sample_prompt": "", "async_checkpointing": False,
                "tensorboard": False, "rewards": {"minimind": 1.0, "numeric": 1.0}, "thinking_ratio": 0.5}
    settings.update(over)
    return from_dict(settings)


def _rollout_batch(params, config, policy):
    r = rollout.sample(params, config, [[5, 6, 7, 8], [9, 10, 11]], num_generations=4, max_new_tokens=8, pad_id=0,
                       eos_ids=[2], seed=3, policy=policy, bucket_prompts=True)
    adv = np.asarray(jax.random.normal(jax.random.key(1), (8,)), np.float32)
    return r, {**{k: jnp.asarray(v) for k, v in r.batch.items()}, "advantages": jnp.asarray(adv)}


@pytest.mark.parametrize("policy_name", ["fp32", "bf16"])
def test_policy_and_reference_log_probs_are_identical_before_the_first_update(init_dir, policy_name):
    _, config = init_dir
    policy = get_policy(policy_name)
    params = init_params(config, jax.random.key(0), policy)
    reference = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    _, micro = _rollout_batch(params, config, policy)
    apply = make_apply(config, policy)
    rng = jax.random.key(0)

    @jax.jit
    def both(p, ref):
        return (grpo.batch_log_probs(apply, p, micro, rng, config=config, policy=policy)[0],
                grpo.batch_log_probs(apply, ref, micro, rng, config=config, policy=policy)[0])

    logp, ref_logp = both(params, reference)
    np.testing.assert_array_equal(np.asarray(logp), np.asarray(ref_logp))  # bitwise
    loss = grpo.make_stage_loss(SETTINGS, config, policy, eos_id=2)
    _, _, metrics = jax.jit(lambda p, ref: loss(apply, p, ref, micro, rng))(params, reference)
    assert float(metrics["kl"]) == 0.0 and float(metrics["max_abs_log_ratio"]) == 0.0
    assert float(metrics["clip_fraction"]) == 0.0


@pytest.mark.parametrize("loss_type", ["cispo", "grpo"])
def test_stage_loss_equals_the_grpo_loss(init_dir, loss_type):
    """The loop's loss (sum over sequences / their number) against ``grpo.policy_loss`` (the self-contained
    path, which test_rl_grpo checks against MiniMind's formula), with a reference that differs (KL > 0)."""
    _, config = init_dir
    params = init_params(config, jax.random.key(0))
    reference = jax.tree.map(lambda x: x * 1.05, params)
    r, micro = _rollout_batch(params, config, "fp32")
    settings = grpo.GRPOSettings(**{**SETTINGS.__dict__, "loss_type": loss_type})
    loss = grpo.make_stage_loss(settings, config, get_policy("fp32"), eos_id=2)
    total, _, metrics = loss(make_apply(config, get_policy("fp32")), params, reference, micro, jax.random.key(0))
    ref_logp = rollout.jit_completion_log_probs(reference, micro["input_ids"], micro["attention_mask"],
                                                prompt_len=r.prompt_len, config=config)
    want, want_metrics = grpo.policy_loss(params, ref_logp, micro, micro["advantages"], config=config, policy="fp32",
                                          prompt_len=r.prompt_len, eos_id=2, settings=settings)
    np.testing.assert_allclose(float(total) / 8, float(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["kl"]), float(want_metrics["kl"]), rtol=1e-5)
    assert float(metrics["kl"]) > 0


def test_grpo_on_the_loop_then_resume_onto_another_mesh(init_dir, tmp_path, capsys):
    """3 steps on data=8; the same run stopped after 1 and resumed on data=2 x fsdp=2 x tensor=2 draws the same
    prompts and rollouts (seeded by step) and gives the same losses and rewards (fp32, 1e-5). Prompts are cut
    to 16 tokens so every step has the same shapes (one compilation)."""
    init, _ = init_dir
    short = {"max_seq_len": 16, "max_steps": 3}
    whole = train(grpo_run(tmp_path / "a", init, **short))
    run = tmp_path / "a" / "grpo_64"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "kl", "clip_fraction", "max_abs_log_ratio", "reward_mean", "reward_std", "reward_minimind",
                "reward_numeric", "advantage_std", "response_length", "fraction_truncated", "truncated_prompts",
                "rollout_tok_s", "tokens_per_s"):
        assert key in rows[-1], key
    assert rows[0]["kl"] == 0.0 and rows[0]["max_abs_log_ratio"] == 0.0
    assert rows[-1]["kl"] > 0  # the policy moved away from the reference
    assert (run / "reward.png").stat().st_size > 1000 and (run / "weights").is_dir()
    assert rows[0]["truncated_prompts"] > 0
    assert "3 steps of 1 x 2 prompts x 4 rollouts (prompt <= 16, <= 12 new tokens)" in capsys.readouterr().out

    train(grpo_run(tmp_path / "b", init, **{**short, "max_steps": 1}))
    rest = train(grpo_run(tmp_path / "b", init, from_resume=1, mesh="data=2,fsdp=2,tensor=2", **short))
    assert "resharded onto data=2 x fsdp=2 x tensor=2" in capsys.readouterr().out
    np.testing.assert_allclose(rest.losses, whole.losses[1:], atol=1e-5, rtol=0)
    b_rows = [json.loads(line) for line in (tmp_path / "b" / "grpo_64" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["reward_mean"] for r in b_rows[-2:]], [r["reward_mean"] for r in rows[1:]],
                               atol=1e-6)


def test_long_prompts_keep_their_last_tokens_and_are_counted():
    tok = load_tokenizer()
    full = make_dataset("rlaif", RLAIF, tok, 256, 4, shuffle=False, thinking_ratio=0.0)
    cut = make_dataset("rlaif", RLAIF, tok, 12, 4, shuffle=False, thinking_ratio=0.0)
    a, b = next(iter(full)), next(iter(cut))
    for i in range(4):
        n = int(a["prompt_length"][i])
        whole = a["prompt_ids"][i][256 - n:]
        assert b["prompt_truncated"][i] == int(n > 12)
        np.testing.assert_array_equal(b["prompt_ids"][i][12 - min(n, 12):], whole[-12:])
    assert int(b["prompt_truncated"].sum()) == 4 and cut.stats.truncated >= 4
    np.testing.assert_array_equal(a["record_index"], [0, 1, 2, 3])


@pytest.mark.parametrize("shard_index", [0, 1])
def test_record_indices_of_later_epochs_name_the_records_of_the_file(shard_index):
    """Every epoch's batches carry each prompt's index in the file (grain counts later epochs' reads past the end),
    so the rewards read the right record back in epoch 2 and after."""
    tok = load_tokenizer()
    n = len(RLPromptSource(RLAIF, "rlaif"))
    mine = range(shard_index, n, 2)
    ds = make_dataset("rlaif", RLAIF, tok, 64, 2, epochs=3, shard_index=shard_index, shard_count=2, seed=1,
                      thinking_ratio=0.0)
    seen = np.concatenate([b["record_index"] for b in ds])
    assert len(seen) == 3 * len(mine) // 2 * 2
    for epoch in range(3):
        part = seen[epoch * len(mine):(epoch + 1) * len(mine)]
        assert set(part.tolist()) <= set(mine) and len(set(part.tolist())) == len(part), epoch
    plain = make_dataset("rlaif", RLAIF, tok, 64, 1, shuffle=False, thinking_ratio=0.0)
    by_index = {int(b["record_index"][0]): b["prompt_ids"][0] for b in plain}
    for b in make_dataset("rlaif", RLAIF, tok, 64, 1, epochs=2, shuffle=False, thinking_ratio=0.0):
        np.testing.assert_array_equal(b["prompt_ids"][0], by_index[int(b["record_index"][0])])


def test_a_nonfinite_reward_stops_the_run_naming_the_record(init_dir, tmp_path, monkeypatch):
    init, _ = init_dir
    calls = []

    def nan_on_the_second_step(response, record):
        calls.append(1)
        return float("nan") if len(calls) > 8 else 0.0

    monkeypatch.setitem(rewards.REWARDS, "numeric", nan_on_the_second_step)
    with pytest.raises(RewardError, match=r"rlaif\.jsonl:\d+: the reward is nan"):
        train(grpo_run(tmp_path, init, save_interval=1, max_seq_len=16))
    state = tmp_path / "grpo_64" / "state"
    assert sorted(int(p.name) for p in state.iterdir() if p.name.isdigit()) == [1]  # step 1 kept, nothing half-written


def test_rl_eval_script_scores_a_checkpoint(init_dir, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("rl_eval", ROOT / "scripts" / "rl_eval.py")
    rl_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rl_eval)
    init, _ = init_dir
    held = tmp_path / "held.jsonl"
    held.write_text("".join(Path(RLAIF).read_text().splitlines(keepends=True)[:3]))
    assert rl_eval.main(["--ckpt", str(init), "--data", str(held), "--generations", "2", "--max_new_tokens", "4",
                         "--rewards", "{numeric: 1, minimind: 0.5}"]) == 0
    out = capsys.readouterr().out
    assert "3 prompts" in out and "sampled (2 per prompt): mean reward" in out and "greedy" in out
    assert "numeric" in out and "minimind" in out
    assert rl_eval.main(["--ckpt", str(init), "--data", str(tmp_path / "missing.jsonl")]) == 2


def test_grpo_trains_the_same_from_a_prepared_directory(init_dir, tmp_path):
    """``scripts/prepare_data.py --stage rlaif`` output: the same prompts, draws, rewards (gt read from the stored
    prompts) and losses as the jsonl file."""
    from minimind_jax.data.prepared_chat import prepare_chat

    init, _ = init_dir
    prepared = tmp_path / "rlaif_prepared"
    prepare_chat("rlaif", [RLAIF], str(prepared), load_tokenizer())
    rows = {}
    for name, data in (("jsonl", RLAIF), ("prepared", str(prepared))):
        train(grpo_run(tmp_path / name, init, data_path=data, max_steps=2, save_interval=10, max_seq_len=32))
        lines = (tmp_path / name / "grpo_64" / "metrics.jsonl").read_text().splitlines()
        rows[name] = [{k: v for k, v in json.loads(line).items() if k in ("loss", "reward_mean", "kl")}
                      for line in lines]
    assert len(rows["jsonl"]) == 2 and set(rows["jsonl"][0]) == {"loss", "reward_mean", "kl"}
    assert rows["prepared"] == rows["jsonl"]
