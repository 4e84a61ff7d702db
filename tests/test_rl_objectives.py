"""minimind_jax.rl.objectives against numpy transcriptions of MiniMind-3's train_grpo.py / train_ppo.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax.rl import objectives as obj

EOS = 2


def rollouts(seed, b=6, r=9):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 20, (b, r))
    ids[0, 3] = EOS  # eos mid-way
    ids[1, 0] = EOS  # eos first
    ids[2, [4, 6]] = EOS  # two: the first counts
    pad = np.ones((b, r), bool)
    pad[3, 5:] = False  # padded, no eos
    pad[4, 2:] = False
    pad[4, 1] = True
    ids[4, 1] = EOS
    logp = -rng.random((b, r)).astype(np.float32) * 3
    old = logp + rng.normal(0, 0.3, (b, r)).astype(np.float32)
    ref = logp + rng.normal(0, 0.3, (b, r)).astype(np.float32)
    return ids, pad, logp, old, ref, rng


# --- numpy transcription of MiniMind's GRPO block (train_grpo.py)
def np_completion_mask(ids, pad):
    is_eos = (ids == EOS) & pad
    eos_idx = np.full(is_eos.shape[0], is_eos.shape[1] - 1)
    any_ = is_eos.any(1)
    eos_idx[any_] = is_eos.astype(int).argmax(1)[any_]
    return ((np.arange(is_eos.shape[1])[None] <= eos_idx[:, None]) & pad).astype(np.float32)


def np_grpo(logp, old, ref, rewards, mask, g, loss_type, beta=0.1, eps=0.2, eps_high=5.0):
    grouped = rewards.reshape(-1, g)
    mean = np.repeat(grouped.mean(1), g)
    std = np.repeat(grouped.std(1), g)  # numpy's default ddof=0 == unbiased=False
    adv = (rewards - mean) / (std + 1e-4)
    kl_div = ref - logp
    kl = np.exp(kl_div) - kl_div - 1
    ratio = np.exp(logp - old)
    if loss_type == "cispo":
        per = -(np.minimum(ratio, eps_high) * adv[:, None] * logp - beta * kl)
    else:
        per = -(np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - eps, 1 + eps) * adv[:, None]) - beta * kl)
    return adv, ((per * mask).sum(1) / np.maximum(mask.sum(1), 1)).mean()


@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_and_cispo_equal_minimind(loss_type, seed):
    ids, pad, logp, old, ref, rng = rollouts(seed)
    rewards = rng.normal(size=6).astype(np.float32)
    rewards[3:] = 1.5  # one group with equal rewards: advantage 0, std + 1e-4 keeps it finite
    mask = np_completion_mask(ids, pad)
    np.testing.assert_array_equal(obj.completion_mask(jnp.asarray(ids), jnp.asarray(pad), EOS), mask)
    adv_np, loss_np = np_grpo(logp, old, ref, rewards, mask, 3, loss_type)
    adv = obj.group_advantages(jnp.asarray(rewards), 3)
    np.testing.assert_allclose(adv, adv_np, rtol=1e-5, atol=1e-6)
    loss, metrics = obj.grpo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref), adv, jnp.asarray(mask),
                                  loss_type=loss_type)
    np.testing.assert_allclose(loss, loss_np, rtol=1e-5, atol=1e-6)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    np.testing.assert_allclose(metrics["kl"], (kl * mask).sum() / mask.sum(), rtol=1e-5)


def test_cispo_gradient_treats_the_clipped_ratio_as_a_constant():
    ids, pad, logp, old, ref, rng = rollouts(3)
    old = logp - 2.5 * np.abs(rng.normal(size=logp.shape)).astype(np.float32)  # ratios above 5 get clipped
    mask = np_completion_mask(ids, pad)
    adv = rng.normal(size=6).astype(np.float32)
    grad = jax.grad(lambda lp: obj.grpo_loss(lp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv),
                                             jnp.asarray(mask), loss_type="cispo")[0])(jnp.asarray(logp))
    w = np.minimum(np.exp(logp - old), 5.0)
    per_token = -(w * adv[:, None]) + 0.1 * (1.0 - np.exp(ref - logp))  # d/dlogp of the per-token loss
    expected = per_token * mask / np.maximum(mask.sum(1, keepdims=True), 1) / mask.shape[0]
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_identical_policies_give_ratio_one_and_zero_kl():
    _, _, logp, _, _, _ = rollouts(4)
    lp = jnp.asarray(logp)
    np.testing.assert_array_equal(obj.k3_kl(lp, lp), 0.0)
    _, metrics = obj.grpo_loss(lp, lp, lp, jnp.ones(6), jnp.ones_like(lp), loss_type="grpo")
    assert float(metrics["kl"]) == 0.0 and float(metrics["max_abs_log_ratio"]) == 0.0
    assert float(metrics["clip_fraction"]) == 0.0


# --- numpy transcription of MiniMind's PPO block (train_ppo.py)
def np_ppo(ids, pad, logp, old, ref, values, new_values, rewards, gamma=1.0, lam=0.95, clip=0.2, kl_coef=0.02,
           value_clip=0.2):
    b, r = ids.shape
    lengths = pad.sum(1)
    valid = lengths > 0
    eos_mask = (ids == EOS) & pad
    has_eos = eos_mask.any(1)
    eos_pos = eos_mask.astype(int).argmax(1)
    lengths = np.maximum(np.where(has_eos, eos_pos + 1, lengths), 1)
    mask = ((np.arange(r)[None] < lengths[:, None]) & pad).astype(np.float32)
    old_values = values * mask
    token_rewards = np.zeros((b, r), np.float32)
    token_rewards[np.arange(b)[valid], (lengths - 1)[valid]] += rewards[valid]
    last = np.zeros(b)
    advs = []
    for t in reversed(range(r)):
        nv = old_values[:, t + 1] if t < r - 1 else 0.0
        delta = token_rewards[:, t] + gamma * nv - old_values[:, t]
        last = delta + gamma * lam * last
        advs.append(last)
    adv = np.stack(advs[::-1], 1)
    returns = adv + old_values
    n = max(mask.sum(), 1)
    mean = (adv * mask).sum() / n
    var = ((adv - mean) ** 2 * mask).sum() / n
    adv_w = (adv - mean) / np.sqrt(var + 1e-8) * mask
    ratio = np.exp(logp - old)
    kl_ref = ((np.exp(ref - logp) - (ref - logp) - 1) * mask).sum() / n
    policy = (np.maximum(-adv_w * ratio, -adv_w * np.clip(ratio, 1 - clip, 1 + clip)) * mask).sum() / n + kl_coef * kl_ref
    value = 0.5 * (np.maximum((new_values - returns) ** 2,
                              (np.clip(new_values, old_values - value_clip, old_values + value_clip) - returns) ** 2)
                   * mask).sum() / n
    approx = (0.5 * (logp - old) ** 2 * mask).sum() / n
    return mask, adv_w, returns, policy, value, approx


@pytest.mark.parametrize("seed", [0, 1])
def test_ppo_equals_minimind(seed):
    ids, pad, logp, old, ref, rng = rollouts(seed)
    values = rng.normal(size=ids.shape).astype(np.float32)
    new_values = values + rng.normal(0, 0.5, ids.shape).astype(np.float32)
    rewards = rng.normal(size=ids.shape[0]).astype(np.float32)
    mask_np, adv_np, ret_np, policy_np, value_np, approx_np = np_ppo(ids, pad, logp, old, ref, values, new_values,
                                                                     rewards)
    j = jnp.asarray
    lengths = obj.response_lengths(j(ids), j(pad), EOS)
    mask = (jnp.arange(ids.shape[1])[None] < lengths[:, None]) & j(pad)
    mask = mask.astype(jnp.float32)
    np.testing.assert_array_equal(mask, mask_np)
    old_values = j(values) * mask
    adv, returns = obj.gae(obj.last_token_rewards(j(rewards), lengths, j(pad)), old_values, 1.0, 0.95)
    np.testing.assert_allclose(returns, ret_np, rtol=1e-5, atol=1e-5)
    adv = obj.whiten(adv, mask)
    np.testing.assert_allclose(adv, adv_np, rtol=1e-4, atol=1e-5)
    policy, metrics = obj.ppo_policy_loss(j(logp), j(old), j(ref), adv, mask)
    np.testing.assert_allclose(policy, policy_np, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics["approx_kl"], approx_np, rtol=1e-5)
    np.testing.assert_allclose(obj.ppo_value_loss(j(new_values), old_values, returns, mask), value_np, rtol=1e-4)


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        obj.policy_token_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.zeros(1), loss_type="ppo")
