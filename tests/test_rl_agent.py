"""Agentic RL: multi-turn trajectories with the mocked tools (a scripted generator plays the model), the tool
turns rendered exactly as the chat template renders the whole conversation and carrying no loss, unfinished
trajectories, MiniMind's reward on them, and the agent stage on the training loop."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from minimind_jax.checkpoint import save_checkpoint
from minimind_jax.config import ModelConfig
from minimind_jax.data.rl_prompts import RLPromptSource
from minimind_jax.generate import GenerationResult
from minimind_jax.model.transformer import init_params
from minimind_jax.precision import get_policy
from minimind_jax.rl import agent, grpo
from minimind_jax.rl import objectives as obj
from minimind_jax.rl.tools import agent_reward
from minimind_jax.tokenizer import load_tokenizer
from minimind_jax.training.config import from_dict
from minimind_jax.training.loop import train
from minimind_jax.training.step import make_apply

ROOT = Path(__file__).resolve().parents[1]
AGENT = str(ROOT / "data" / "sample" / "agent_rl.jsonl")
TINY_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "intermediate_size": 128}
CALL = '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "680*42"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def scripted(tok, replies):
    """A Generator stand-in: call ``n`` of ``generate`` answers every row with ``replies[n]`` (+ eos)."""
    calls = []

    class Scripted:
        def __init__(self, *args, **kwargs):
            pass

        def generate(self, prompts, limits, sampling, eos_ids=None):
            text = replies[min(len(calls), len(replies) - 1)]
            calls.append([list(p) for p in prompts])
            ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
            return [GenerationResult(ids, "stop") for _ in prompts]

    return Scripted, calls


def _first_task(tok):
    src = RLPromptSource(AGENT, "agent")
    p = src[0]
    assert p.gt_list == ["28560"]  # 请帮我算一下 680*42。
    text = tok.apply_chat_template(p.messages, tools=p.tools, tokenize=False, add_generation_prompt=True)
    return p, tok.encode(text, add_special_tokens=False)


def test_a_tool_call_is_answered_and_the_trajectory_renders_the_whole_conversation(tok, monkeypatch):
    p, ids = _first_task(tok)
    fake, calls = scripted(tok, [CALL, "680乘42等于28560。"])
    monkeypatch.setattr(agent, "Generator", fake)
    settings = grpo.GRPOSettings(num_generations=2, max_new_tokens=64)
    rows = agent.run_trajectories(None, None, tok, [p], [ids], settings, max_turns=3, max_total_tokens=2500, seed=0,
                                  policy="fp32", eos_id=tok.eos_token_id)
    assert len(rows) == 2 and len(calls) == 2  # two turns; the second continues the first's tokens
    r = rows[0]
    assert r.turns == [CALL, "680乘42等于28560。"] and r.calls == 1 and not r.unfinished
    assert calls[1][0] == ids + r.tokens[:len(calls[1][0]) - len(ids)]
    tool_turn = r.messages[-1]
    assert tool_turn["role"] == "tool" and "28560" in tool_turn["content"]
    # the trajectory's tokens are exactly the template's rendering of the finished conversation
    want = tok.apply_chat_template([*p.messages, {"role": "assistant", "content": CALL}, tool_turn,
                                    {"role": "assistant", "content": "680乘42等于28560。"}],
                                   tools=p.tools, tokenize=False)
    assert tok.decode(ids + r.tokens, skip_special_tokens=False) == want.rstrip("\n")
    # only what the model generated is trained: the tool turn in between is not
    n1 = len(tok.encode(CALL, add_special_tokens=False)) + 1
    n2 = len(tok.encode("680乘42等于28560。", add_special_tokens=False)) + 1
    trained = np.asarray(r.trained)
    assert trained[:n1].all() and trained[-n2:].all() and not trained[n1:-n2].any() and trained.sum() == n1 + n2
    tool_text = tok.decode(np.asarray(r.tokens)[n1:-n2].tolist())
    assert "<tool_response>" in tool_text and "28560" in tool_text
    assert agent.score_trajectories(rows, [p], 2) == [agent_reward(r.turns, p.tools, ["28560"])] * 2
    assert agent.score_trajectories(rows, [p], 2)[0] > 2.5  # format + the answer found - repetition


def test_a_trajectory_that_keeps_calling_tools_is_unfinished(tok, monkeypatch):
    p, ids = _first_task(tok)
    fake, calls = scripted(tok, [CALL])
    monkeypatch.setattr(agent, "Generator", fake)
    rows = agent.run_trajectories(None, None, tok, [p], [ids], grpo.GRPOSettings(num_generations=1), max_turns=2,
                                  max_total_tokens=2500, seed=0, policy="fp32", eos_id=tok.eos_token_id)
    assert len(calls) == 2 and rows[0].unfinished and rows[0].calls == 2
    assert agent.score_trajectories(rows, [p], 1)[0] == agent_reward([CALL, CALL], p.tools, ["28560"], unfinished=True)
    # the token budget ends a trajectory too
    rows = agent.run_trajectories(None, None, tok, [p], [ids], grpo.GRPOSettings(num_generations=1), max_turns=3,
                                  max_total_tokens=40, seed=0, policy="fp32", eos_id=tok.eos_token_id)
    assert rows[0].unfinished and len(rows[0].turns) < 3


def test_the_loss_reads_the_generated_tokens_only(tok):
    config = ModelConfig.preset("minimind3", **TINY_MODEL)
    params = init_params(config, jax.random.key(0))
    reference = jax.tree.map(lambda x: x * 1.05, params)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 6000, (4, 48)).astype(np.int32)
    micro = {"input_ids": ids, "attention_mask": np.ones_like(ids), "completion_ids": ids[:, 16:],
             "completion_pad": np.ones((4, 32), bool), "advantages": rng.standard_normal(4).astype(np.float32),
             "loss_mask": (rng.random((4, 32)) < 0.5).astype(np.float32)}
    policy = get_policy("fp32")
    apply = make_apply(config, policy)
    settings = grpo.GRPOSettings()
    total, _, _ = grpo.make_stage_loss(settings, config, policy, tok.eos_token_id)(apply, params, reference, micro,
                                                                                  jax.random.key(0))
    logp = np.asarray(grpo.batch_log_probs(apply, params, micro, jax.random.key(0), config=config, policy=policy)[0])
    ref = np.asarray(grpo.batch_log_probs(apply, reference, micro, jax.random.key(0), config=config, policy=policy)[0])
    per_token = np.asarray(obj.policy_token_loss(logp, None, ref, micro["advantages"]))
    m = micro["loss_mask"]
    np.testing.assert_allclose(float(total), np.sum((per_token * m).sum(1) / m.sum(1)), rtol=1e-5)


def test_agent_stage_on_the_loop(tmp_path):
    config = ModelConfig.preset("minimind3", **TINY_MODEL)
    save_checkpoint(tmp_path / "init", init_params(config, jax.random.key(0)), config)
    res = train(from_dict({
        "stage": "agent", "data_path": AGENT, "preset": "minimind3", "model": dict(TINY_MODEL),
        "init": str(tmp_path / "init"), "out_dir": str(tmp_path), "batch_size": 2, "accumulation_steps": 1,
        "max_seq_len": 16, "max_gen_len": 8, "agent_max_turns": 2, "agent_max_total_tokens": 24,
        "num_generations": 4, "learning_rate": 1e-3, "dtype": "float32", "max_steps": 2, "save_interval": 2,
        "progress": False, "sample_prompt": "", "async_checkpointing": False, "tensorboard": False}))
    assert res.steps == 2
    rows = [json.loads(line) for line in (tmp_path / "agent_64" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "kl", "reward_mean", "gt_answered", "tool_calls", "turns", "fraction_unfinished",
                "truncated_prompts", "rollout_tok_s"):
        assert key in rows[-1], key
    assert rows[0]["kl"] == 0.0 and rows[0]["truncated_prompts"] == 2  # agent prompts are longer than 16
