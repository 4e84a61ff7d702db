"""minimind_jax.rl.rewards: MiniMind-3's shaping (transcribed from its calculate_rewards), verifiable rewards,
combination and the errors that name the record."""

import math
import re

import pytest

from minimind_jax.rl import rewards as rw


# --- MiniMind's rep_penalty and the shaping part of calculate_rewards (train_grpo.py), transcribed
def mm_rep_penalty(text, n=3, cap=0.5):
    toks = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    return min(cap, (len(grams) - len(set(grams))) * cap * 2 / len(grams)) if grams else 0.0


def mm_shaping(response):
    reward = 0.0
    answer = response
    reward += 0.5 if 20 <= len(response.strip()) <= 800 else -0.5
    if "</think>" in response:
        thinking_content, answer_content = response.split("</think>", 1)
        reward += 1.0 if 20 <= len(thinking_content.strip()) <= 300 else -0.5
        reward += 0.25 if response.count("</think>") == 1 else -0.25
        answer = answer_content.strip()
    return reward - mm_rep_penalty(answer)


RESPONSES = [
    "",
    "short",
    "The answer is forty-two, because six times seven is forty-two.",
    "<think>\nsix times seven, let me compute that carefully\n</think>\n\n42",
    "<think>\nhm\n</think>\n\nthe the the the the the the the the the the the the",
    "</think> a </think> b " * 3,
    "x" * 900,
    "<think>\n" + "long thought " * 40 + "\n</think>\n\nok ok ok ok ok",
    "重复重复，重复重复，重复重复，重复重复。答案是 42。",
]


@pytest.mark.parametrize("response", RESPONSES)
def test_shaping_equals_minimind(response):
    assert rw.minimind_shaping(response, {}) == pytest.approx(mm_shaping(response), abs=1e-12)
    assert rw.repetition_penalty(response) == pytest.approx(mm_rep_penalty(response), abs=1e-12)


def test_verifiable_rewards():
    rec = {"gt": "42"}
    assert rw.exact_match("<think>\nsix sevens\n</think>\n\n42", rec) == 1.0
    assert rw.exact_match("42.", rec) == 0.0
    assert rw.numeric_match("so the answer is 42.", rec) == 1.0
    assert rw.numeric_match("1,042", {"gt": 1042}) == 1.0
    assert rw.numeric_match("41 or 43", rec) == 0.0
    assert rw.numeric_match("no number", rec) == 0.0
    assert rw.exact_match("abc", {"gt": ["xyz", "abc"]}) == 1.0
    assert rw.REWARDS["think_format"]("<think>\na\n</think>\n\nb", {}) == 1.0
    assert rw.REWARDS["think_format"]("just b", {}) == 0.0
    with pytest.raises(rw.RewardError, match="no 'gt'"):
        rw.exact_match("42", {})


def test_combine_and_score_name_the_record():
    fn = rw.combine({"minimind": 1.0, "numeric": 2.0})
    response = "The answer, after some careful thought, is 42."
    assert fn(response, {"gt": 42}) == pytest.approx(mm_shaping(response) + 2.0)
    with pytest.raises(ValueError, match="unknown reward"):
        rw.combine({"nope": 1.0})
    assert rw.score(fn, [response, "7"], [{"gt": 42}, {"gt": 7}]) == [pytest.approx(fn(response, {"gt": 42})),
                                                                      pytest.approx(fn("7", {"gt": 7}))]
    with pytest.raises(rw.RewardError, match=r"data/rlaif\.jsonl:7: the reward function raised RewardError"):
        rw.score(fn, ["42"], [{}], where=["data/rlaif.jsonl:7"])
    with pytest.raises(rw.RewardError, match=r"record 1: the reward is nan"):
        rw.score(lambda r, rec: math.nan if r == "b" else 0.0, ["a", "b"], [{}, {}])


def test_a_batched_reward_is_called_once_and_its_failure_still_names_the_record():
    class Batched:
        def __init__(self, fail_at=None):
            self.calls, self.fail_at = [], fail_at

        def __call__(self, response, record):
            self.calls.append("one")
            if record["i"] == self.fail_at:
                raise ValueError("bad record")
            return float(len(response))

        def batch(self, responses, records):
            self.calls.append("batch")
            if self.fail_at is not None:
                raise ValueError("somewhere in the batch")
            return [float(len(r)) for r in responses]

    records = [{"i": i} for i in range(3)]
    ok = Batched()
    assert rw.score(ok, ["a", "bb", "ccc"], records) == [1.0, 2.0, 3.0] and ok.calls == ["batch"]
    failing = Batched(fail_at=1)
    with pytest.raises(rw.RewardError, match=r"x\.jsonl:2: the reward function raised ValueError: bad record"):
        rw.score(failing, ["a", "bb", "ccc"], records, where=["x.jsonl:1", "x.jsonl:2", "x.jsonl:3"])
    assert failing.calls == ["batch", "one", "one"]
