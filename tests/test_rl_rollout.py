"""Rollouts: shapes and masks of the packed batch, prompt truncation, and log-probs that make the first update's
ratio exactly 1 and the KL to an identical reference exactly 0 (fp32 and bf16)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minimind_jax import MiniMindLM
from minimind_jax.rl import objectives as obj
from minimind_jax.rl import rollout
from tests._util import cached_params, tiny


def test_left_truncate_keeps_the_last_tokens_and_counts():
    prompts, cut = rollout.left_truncate([[1, 2, 3, 4, 5], [6, 7]], 3)
    assert prompts == [[3, 4, 5], [6, 7]] and cut == 1


def test_pack_layout():
    r = rollout.pack([[5, 6, 7], [8]], [[9, 2], [10, 11, 12]], pad_id=0)
    assert r.prompt_len == 3 and r.completion_ids.shape == (2, 16)
    np.testing.assert_array_equal(r.input_ids[1, :5], [0, 0, 8, 10, 11])
    np.testing.assert_array_equal(r.attention_mask[0, :6], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(r.completion_pad.sum(1), [2, 3])


@pytest.mark.parametrize("policy", ["fp32", "bf16"])
def test_first_update_ratio_is_one_and_kl_zero(policy):
    config = tiny("tiny2")
    params = cached_params(config)
    eos = 1
    r = rollout.sample(params, config, [[5, 6, 7, 8], list(range(10, 22))], num_generations=3, max_new_tokens=6,
                       pad_id=0, eos_ids=[eos], seed=3, policy=policy, max_prompt_len=8)
    assert r.truncated_prompts == 1 and r.input_ids.shape[0] == 6 and r.prompt_len == 8
    kw = dict(prompt_len=r.prompt_len, config=config, policy=policy)
    old = rollout.jit_completion_log_probs(params, r.input_ids, r.attention_mask, **kw)
    new = rollout.jit_completion_log_probs(params, r.input_ids, r.attention_mask, **kw)
    ref = rollout.jit_completion_log_probs(params, r.input_ids, r.attention_mask, **kw)
    mask = jnp.asarray(r.completion_pad, jnp.float32)
    adv = jnp.linspace(-1.0, 1.0, 6)
    for loss_type in obj.LOSS_TYPES:
        _, metrics = obj.grpo_loss(new, old, ref, adv, mask, loss_type=loss_type)
        assert float(metrics["max_abs_log_ratio"]) == 0.0 and float(metrics["kl"]) == 0.0
        assert float(metrics["clip_fraction"]) == 0.0
    assert np.array_equal(np.asarray(jnp.exp(new - old)), np.ones(new.shape, np.float32))
    assert float(jnp.max(jnp.abs(obj.k3_kl(ref, new)))) == 0.0


def test_completion_log_probs_equal_the_models_logits():
    config = tiny("tiny2")
    params = cached_params(config)
    r = rollout.pack([[5, 6, 7], [8, 9]], [[9, 2, 4], [10, 11]], pad_id=0)
    lp = rollout.completion_log_probs(params, r.input_ids, r.attention_mask, prompt_len=r.prompt_len,
                                      config=config)
    for i, (prompt, completion) in enumerate([([5, 6, 7], [9, 2, 4]), ([8, 9], [10, 11])]):
        ids = jnp.asarray([prompt + completion])
        logits = MiniMindLM(config).apply({"params": params}, ids).logits[0].astype(jnp.float32)
        want = jax.nn.log_softmax(logits, -1)[len(prompt) - 1:-1]
        want = np.asarray(want)[np.arange(len(completion)), completion]
        np.testing.assert_allclose(np.asarray(lp[i, :len(completion)]), want, atol=1e-5)
