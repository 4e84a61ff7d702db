"""PPO: GAE / whitening and the policy + value losses against numpy transcriptions of MiniMind's train_ppo.py,
the ratio exactly 1 on the first pass, the KL early stop, separate actor / critic learning rates, and
``scripts/train.py --stage ppo`` end to end with an exact resume."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax.checkpoint import save_checkpoint
from minimind_jax.config import ModelConfig
from minimind_jax.model.transformer import init_params
from minimind_jax.precision import get_policy
from minimind_jax.rl import objectives as obj
from minimind_jax.rl import ppo
from minimind_jax.tokenizer import load_tokenizer
from minimind_jax.training.config import from_dict, resolve
from minimind_jax.training.loop import train
from minimind_jax.training.stage_models import PPOModels
from minimind_jax.training.stages import build_stage
from minimind_jax.training.step import init_train_state, make_apply, make_train_step

ROOT = Path(__file__).resolve().parents[1]
RLAIF = str(ROOT / "data" / "sample" / "rlaif.jsonl")
TINY_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "intermediate_size": 128}
EOS = 2


# ------------------------------------------------------------------------------------------------ numpy MiniMind
def minimind_targets(rewards, values, completion_ids, pad, eos, gamma, lam):
    """train_ppo.py's masks, token rewards, GAE loop and whitening, transcribed to numpy."""
    b, r = completion_ids.shape
    resp_idx = np.arange(r)[None, :]
    lengths = pad.sum(1)
    valid = lengths > 0
    eos_mask = (completion_ids == eos) & pad
    has_eos, eos_pos = eos_mask.any(1), np.argmax(eos_mask, 1)
    lengths = np.maximum(np.where(has_eos, eos_pos + 1, lengths), 1)
    mask = ((resp_idx < lengths[:, None]) & pad).astype(np.float64)
    old_values = values * mask
    token_rewards = np.zeros((b, r))
    rows = np.arange(b)[valid]
    token_rewards[rows, lengths[valid] - 1] += rewards[valid]
    last, advs = np.zeros(b), []
    for t in reversed(range(r)):
        nv = old_values[:, t + 1] if t < r - 1 else 0.0
        delta = token_rewards[:, t] + gamma * nv - old_values[:, t]
        last = delta + gamma * lam * last
        advs.append(last)
    adv = np.stack(advs[::-1], 1)
    returns = adv + old_values
    mean = (adv * mask).sum() / max(mask.sum(), 1)
    var = ((adv - mean) ** 2 * mask).sum() / max(mask.sum(), 1)
    return (adv - mean) / np.sqrt(var + 1e-8) * mask, returns, mask


def minimind_losses(logp, old, ref, adv, values, old_values, returns, mask, clip=0.2, vclip=0.2, kl_coef=0.02):
    n = max(mask.sum(), 1)
    ratio = np.exp(logp - old)
    kl_ref = ((np.exp(ref - logp) - (ref - logp) - 1.0) * mask).sum() / n
    policy = (np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip)) * mask).sum() / n + kl_coef * kl_ref
    vc = np.clip(values, old_values - vclip, old_values + vclip)
    value = 0.5 * (np.maximum((values - returns) ** 2, (vc - returns) ** 2) * mask).sum() / n
    return policy, value, (0.5 * (logp - old) ** 2 * mask).sum() / n


def _random_rollout(seed, b=5, r=9):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 50, (b, r))
    pad = np.ones((b, r), bool)
    pad[1, 6:] = False
    pad[3, :] = False  # an empty response: no reward, no counted token
    ids[0, 4] = EOS
    ids[2, 0] = EOS
    return ids, pad, rng


def test_gae_and_whitening_equal_minimind():
    ids, pad, rng = _random_rollout(0)
    rewards, values = rng.normal(size=5), rng.normal(size=(5, 9))
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5)):
        adv, returns, mask, _ = ppo.ppo_targets(rewards, values, ids, pad, EOS, gamma, lam)
        want_adv, want_ret, want_mask = minimind_targets(rewards, values, ids, pad, EOS, gamma, lam)
        np.testing.assert_array_equal(np.asarray(mask), want_mask)
        np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
        m = want_mask > 0
        np.testing.assert_allclose(np.asarray(returns)[m], want_ret[m], rtol=1e-5, atol=1e-5)
        assert abs(float(np.asarray(adv)[m].std()) - 1.0) < 1e-4


def test_losses_equal_minimind_on_fixed_arrays():
    ids, pad, rng = _random_rollout(1)
    logp, ref = rng.normal(-2, 0.5, (5, 9)), rng.normal(-2, 0.5, (5, 9))
    old = logp + rng.normal(0, 0.3, (5, 9))  # ratios well outside the clip range
    adv, values, old_values, returns = (rng.normal(size=(5, 9)) for _ in range(4))
    mask = np.asarray(obj.completion_mask(ids, pad, EOS), np.float64)
    settings = ppo.PPOSettings()
    policy_tok, value_tok = ppo.token_losses(*(jnp.asarray(x, jnp.float32) for x in
                                               (logp, old, ref, adv, values, old_values, returns)), settings)
    want_policy, want_value, want_kl = minimind_losses(logp, old, ref, adv, values, old_values, returns, mask)
    m = jnp.asarray(mask, jnp.float32)
    np.testing.assert_allclose(float(obj.token_mean(policy_tok, m)), want_policy, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(obj.token_mean(value_tok, m)), want_value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(obj.approx_kl(jnp.asarray(logp), jnp.asarray(old), m)), want_kl, rtol=1e-5)
    # the same as objectives' token-mean forms
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    np.testing.assert_allclose(float(obj.ppo_policy_loss(f(logp), f(old), f(ref), f(adv), m)[0]), want_policy,
                               rtol=1e-5)
    np.testing.assert_allclose(float(obj.ppo_value_loss(f(values), f(old_values), f(returns), m)), want_value,
                               rtol=1e-5)


# ------------------------------------------------------------------------------------------------ on the model
@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    config = ModelConfig.preset("minimind3", **TINY_MODEL)
    path = tmp_path_factory.mktemp("ppo") / "init"
    save_checkpoint(path, init_params(config, jax.random.key(0)), config)
    return path, config


def _cfg(init, out, **over):
    settings = {"stage": "ppo", "data_path": RLAIF, "preset": "minimind3", "model": dict(TINY_MODEL),
                "init": str(init), "out_dir": str(out), "batch_size": 8, "accumulation_steps": 1, "max_seq_len": 16,
                "max_gen_len": 8, "learning_rate": 1e-3, "critic_learning_rate": 1e-3, "lr_schedule": "constant",
                "dtype": "float32", "max_steps": 2, "progress": False, "sample_prompt": "",
                "async_checkpointing": False, "tensorboard": False, "rewards": {"minimind": 1.0, "numeric": 1.0},
                "thinking_ratio": 0.0}
    return from_dict({**settings, **over})


@pytest.fixture(scope="module")
def one_batch(init_dir):
    """A stage, a fresh train state builder and one prepared rollout batch (host arrays)."""
    init, config = init_dir
    cfg = _cfg(init, "/nonexistent")
    tok = load_tokenizer()
    stage = build_stage(cfg, config, get_policy("fp32"), tokenizer=tok)
    base = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))

    def state_for(**over):
        models = PPOModels(dataclasses.replace(cfg, **over), config, "fp32")
        params, frozen = models.fresh(jax.tree.map(np.array, base))
        tx, schedule = models.optimizer(10)
        return init_train_state(config, tx, seed=0, policy="fp32", params=params, frozen=frozen)[0], tx, schedule

    state, _, _ = state_for()
    prompts = {"prompt_ids": np.zeros((1, 8, 16), np.int32), "prompt_length": np.full((1, 8), 3),
               "prompt_truncated": np.zeros((1, 8), np.int32), "record_index": np.arange(8)[None]}
    for i in range(8):
        prompts["prompt_ids"][0, i, -3:] = [5 + i, 6, 7]
    batch, metrics = stage.prepare(prompts, state, 0)
    return config, stage, state_for, batch, metrics


def _step(config, stage, state, tx, batch):
    step = jax.jit(make_train_step(stage, config, "fp32", tx))
    before = jax.tree.map(np.array, state.params)
    new_state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
    return before, jax.tree.map(np.asarray, new_state.params), jax.device_get(metrics)


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_first_pass_ratio_is_exactly_one_and_rollout_log_probs_agree(one_batch):
    config, stage, state_for, batch, host_metrics = one_batch
    state, _, _ = state_for()
    micro = {k: jnp.asarray(v[0]) for k, v in batch.items()}
    apply = make_apply(config, "fp32")
    for first in (0, 1):
        _, _, m = jax.jit(lambda p, ref, micro: stage.loss(apply, p, ref, micro, jax.random.key(0)))(
            state.params, state.frozen, {**micro, "update_pass": jnp.int32(1 - first)})
        if first:
            assert float(m["approx_kl"]) == 0.0 and float(m["max_abs_log_ratio"]) == 0.0
            assert float(m["clip_fraction"]) == 0.0
        else:  # later passes read the rollout-time old log-probs: the same forward, up to float32 rounding
            assert float(m["max_abs_log_ratio"]) < 1e-5
        assert float(m["kl"]) < 1e-9  # the reference is the starting policy
    assert {"reward_mean", "value_mean", "rollout_tok_s"} <= set(host_metrics)
    mask = np.asarray(obj.completion_mask(batch["completion_ids"][0], batch["completion_pad"][0], EOS)) > 0
    assert abs(batch["advantages"][0][mask].std() - 1.0) < 1e-3


def test_early_stop_keeps_the_params_and_threshold_zero_is_one_pass(one_batch):
    config, stage, state_for, batch, _ = one_batch
    state, tx, _ = state_for()
    forced = dataclasses.replace(stage, stop_passes=lambda m: jnp.bool_(True))
    before, after, m = _step(config, forced, state, tx, batch)
    assert _same(before, after) and m["passes_done"] == 0 and m["skipped"] == 0

    state, tx, _ = state_for()
    _, two_stopped, m = _step(config, dataclasses.replace(stage, stop_passes=ppo.early_stop(0.0)), state, tx, batch)
    assert m["passes_done"] == 1
    state, tx, _ = state_for()
    _, one_pass, _ = _step(config, dataclasses.replace(stage, update_passes=1), state, tx, batch)
    for x, y in zip(jax.tree.leaves(two_stopped), jax.tree.leaves(one_pass)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    state, tx, _ = state_for()
    _, two, m = _step(config, stage, state, tx, batch)
    assert m["passes_done"] == 2 and not _same(two, one_pass)


@pytest.mark.parametrize("frozen_part", ["policy", "critic"])
def test_actor_and_critic_have_their_own_learning_rates(one_batch, frozen_part):
    config, stage, state_for, batch, _ = one_batch
    lr = {"learning_rate": 0.0} if frozen_part == "policy" else {"critic_learning_rate": 0.0}
    state, tx, _ = state_for(**lr)
    before, after, m = _step(config, stage, state, tx, batch)
    moved = "critic" if frozen_part == "policy" else "policy"
    assert _same(before[frozen_part], after[frozen_part])
    assert not _same(before[moved], after[moved])
    assert m["value_loss"] > 0


def test_train_script_runs_ppo_and_resumes_exactly(init_dir, tmp_path):
    """``scripts/train.py --stage ppo`` with the quickstart config on the sample data (2 steps, value loss and
    weights + critic written); the same run stopped after 1 step and resumed gives the same step-2 loss."""
    init, _ = init_dir

    def argv(out, steps):
        return ["--stage", "ppo", "--config", str(ROOT / "configs" / "quickstart_ppo.yaml"), "--init", str(init),
                "--from_weight", "none", "--out_dir", str(out), "--max_steps", str(steps), "--max_seq_len", "16",
                "--max_gen_len", "8", "--save_interval", "1", "--progress", "false", "--sample_prompt", "",
                "--tensorboard", "false", "--async_checkpointing", "false", "--learning_rate", "1e-3",
                "--lr_schedule", "constant",  # the first part plans 1 step: MiniMind's cosine would differ
                *[f"model.{k}={v}" for k, v in TINY_MODEL.items()]]

    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *argv(tmp_path / "a", 2)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "a" / "ppo_64"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("policy_loss", "value_loss", "approx_kl", "clip_fraction", "passes_done", "reward_mean", "kl", "lr"):
        assert key in rows[-1], key
    assert (run / "weights").is_dir() and (run / "critic").is_dir()

    first = train(resolve(argv(tmp_path / "b", 1)))
    rest = train(resolve([*argv(tmp_path / "b", 2), "--from_resume", "1"]))
    np.testing.assert_allclose(first.losses + rest.losses, [r["loss"] for r in rows], atol=1e-5, rtol=0)
    b_rows = [json.loads(line) for line in (tmp_path / "b" / "ppo_64" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["value_loss"] for r in b_rows], [r["value_loss"] for r in rows], atol=1e-5)
