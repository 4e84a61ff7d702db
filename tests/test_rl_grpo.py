"""One GRPO / CISPO iteration on a tiny model: the first step's loss equals MiniMind's formula at ratio 1 with
an identical reference (KL 0), the params move, and a reward that raises records names the record."""

import jax
import numpy as np
import optax
import pytest

from minimind_jax.rl import grpo, rollout
from minimind_jax.rl import objectives as obj
from minimind_jax.rl.rewards import RewardError
from tests._util import cached_params, tiny

EOS, PAD = 1, 0
SETTINGS = grpo.GRPOSettings(num_generations=4, max_new_tokens=6, max_prompt_len=16)


def decode(ids):
    return " ".join(map(str, ids))


def id_sum_mod7(response, record):
    """A reward with spread on a random tiny model: the ids' sum mod 7."""
    return float(sum(map(int, response.split())) % 7)


def run(params, reward_fn, loss_type="cispo", lr=1e-3):
    config = tiny("tiny2")
    tx = optax.adamw(lr)
    settings = grpo.GRPOSettings(**{**SETTINGS.__dict__, "loss_type": loss_type})
    return grpo.iteration(params, tx.init(params), params, [[5, 6, 7], [9, 10, 11, 12]], [{}, {}], tx=tx,
                          config=config, decode=decode, reward_fn=reward_fn, eos_id=EOS, pad_id=PAD, seed=0,
                          settings=settings, where=["a.jsonl:1", "a.jsonl:2"])


@pytest.mark.parametrize("loss_type", ["cispo", "grpo"])
def test_first_iteration_loss_equals_minimind_at_ratio_one(loss_type):
    config = tiny("tiny2")
    params = cached_params(config)
    new_params, _, m = run(params, id_sum_mod7, loss_type)
    assert m["kl"] == 0.0 and m["max_abs_log_ratio"] == 0.0 and m["clip_fraction"] == 0.0
    # recompute the same rollouts (same seeds) and MiniMind's loss at ratio 1, KL 0, in numpy
    r = rollout.sample(params, config, [[5, 6, 7], [9, 10, 11, 12]], num_generations=4, max_new_tokens=6,
                       pad_id=PAD, eos_ids=[EOS], seed=0, max_prompt_len=16)
    texts = [decode([int(t) for t in row[p] if t != EOS]) for row, p in zip(r.completion_ids, r.completion_pad)]
    rewards = np.array([id_sum_mod7(t, {}) for t in texts]).reshape(-1, 4)
    adv = ((rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-4)).reshape(-1)
    logp = np.asarray(rollout.jit_completion_log_probs(params, r.input_ids, r.attention_mask,
                                                       prompt_len=r.prompt_len, config=config))
    mask = np.asarray(obj.completion_mask(r.completion_ids, r.completion_pad, EOS))
    per_token = -adv[:, None] * (logp if loss_type == "cispo" else np.ones_like(logp))
    want = np.mean((per_token * mask).sum(1) / np.maximum(mask.sum(1), 1))
    np.testing.assert_allclose(m["loss"], want, rtol=1e-5, atol=1e-6)
    assert m["reward_std"] > 0
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), new_params, params)
    assert max(jax.tree.leaves(moved)) > 0


def test_a_raising_reward_names_the_record():
    def broken(response, record):
        raise KeyError("gt")

    with pytest.raises(RewardError, match=r"a.jsonl:1: the reward function raised KeyError"):
        run(cached_params(tiny("tiny2")), broken)


def even_ids(response, record):
    return float(sum(int(t) % 2 == 0 for t in response.split()))


def held_out_reward(params, config):
    r = rollout.sample(params, config, [[20, 21, 22]], num_generations=16, max_new_tokens=8, pad_id=PAD,
                       eos_ids=[EOS], seed=12345, max_prompt_len=16)
    return np.mean([even_ids(decode([int(t) for t in row[p]]), {}) for row, p in
                    zip(r.completion_ids, r.completion_pad)])


TRAIN_PROMPTS = [[5, 6, 7], [9, 10, 11, 12], [30, 31], [40]]


def test_grpo_raises_the_reward_on_a_held_out_prompt():
    """Reward: the number of even ids among 8 new tokens (max 8); CISPO, Adam 1e-2, 4 prompts x 8 per step,
    15 steps (about 40 s on 2 shared CPU cores)."""
    config = tiny("tiny2")
    params = ref = cached_params(config)
    tx = optax.adam(1e-2)
    state = tx.init(params)
    settings = grpo.GRPOSettings(num_generations=8, max_new_tokens=8, max_prompt_len=16)
    before = held_out_reward(params, config)
    for i in range(15):
        params, state, _ = grpo.iteration(params, state, ref, TRAIN_PROMPTS, [{}] * len(TRAIN_PROMPTS), tx=tx,
                                          config=config, decode=decode, reward_fn=even_ids, eos_id=EOS,
                                          pad_id=PAD, seed=1000 * i, settings=settings)
    after = held_out_reward(params, config)
    print(f"held-out mean reward {before:.3f} -> {after:.3f}")
    assert after > before + 1.5, (before, after)
