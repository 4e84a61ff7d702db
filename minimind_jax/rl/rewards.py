"""Reward functions for the RL stages: plain functions with one signature, combined with weights.

A reward function is ``fn(response: str, record: Mapping) -> float``: ``response`` is the generated text (the
completion, special tokens removed) and ``record`` the data record it answers (its ``gt`` for verifiable
rewards, its ``conversations`` for a reward model). :func:`combine` weights several of them;
:func:`score` runs one over a batch, naming the record whose reward raised or is not finite.

* :func:`minimind_shaping`: MiniMind-3's shaping from ``train_grpo.py`` / ``train_ppo.py`` (without the reward
  model's score, which it adds separately): +0.5 if the stripped response has 20..800 characters, else -0.5;
  when ``</think>`` is present, +1.0 if the stripped thinking has 20..300 characters, else -0.5, and +0.25 if
  ``</think>`` appears once, else -0.25; minus :func:`repetition_penalty` of the answer.
* :func:`exact_match`, :func:`numeric_match`: 1.0 / 0.0 against ``record["gt"]`` (the answer after any
  ``</think>``); :func:`format_match`: 1.0 / 0.0 for a regular expression.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Mapping, Sequence

RewardFn = Callable[[str, Mapping], float]

_WORDS = re.compile(r"\w+|[^\w\s]")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class RewardError(ValueError):
    """A reward function failed or gave a value that is not a finite number."""


def split_thinking(response: str) -> tuple[str | None, str]:
    """(thinking or None, answer): the text before and after the first ``</think>``, stripped."""
    if "</think>" not in response:
        return None, response.strip()
    thinking, answer = response.split("</think>", 1)
    return thinking.replace("<think>", "", 1).strip(), answer.strip()


def repetition_penalty(text: str, n: int = 3, cap: float = 0.5) -> float:
    """MiniMind's ``rep_penalty``: the share of repeated word n-grams, times ``2 cap``, at most ``cap``."""
    tokens = _WORDS.findall(text.lower())
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return min(cap, (len(grams) - len(set(grams))) * cap * 2 / len(grams))


def think_format_reward(response: str) -> float:
    """MiniMind's thinking terms: 0 without ``</think>``; else +1.0 if the text before it (stripped, tag included
    as MiniMind counts it) has 20..300 characters, else -0.5, and +0.25 if ``</think>`` appears once, else -0.25."""
    if "</think>" not in response:
        return 0.0
    thinking = response.split("</think>", 1)[0]
    return (1.0 if 20 <= len(thinking.strip()) <= 300 else -0.5) + (0.25 if response.count("</think>") == 1 else -0.25)


def minimind_shaping(response: str, record: Mapping | None = None, min_length: int = 20) -> float:
    """MiniMind-3's length / thinking-format / repetition shaping (see the module docstring); its agentic RL
    uses ``min_length=5``."""
    reward = 0.5 if min_length <= len(response.strip()) <= 800 else -0.5
    return reward + think_format_reward(response) - repetition_penalty(split_thinking(response)[1])


def _gt(record: Mapping) -> list[str]:
    gt = record.get("gt") if record else None
    if gt is None:
        raise RewardError("the record has no 'gt' field to check the answer against")
    return [str(g) for g in gt] if isinstance(gt, (list, tuple)) else [str(gt)]


def exact_match(response: str, record: Mapping) -> float:
    """1.0 when the answer (after ``</think>``), stripped, equals ``gt`` (or one of a list of them)."""
    _, answer = split_thinking(response)
    return float(answer in [g.strip() for g in _gt(record)])


def numeric_match(response: str, record: Mapping, tol: float = 1e-6) -> float:
    """1.0 when the last number in the answer equals the numeric ``gt`` (within ``tol``)."""
    _, answer = split_thinking(response)
    numbers = _NUMBER.findall(answer.replace(",", ""))
    if not numbers:
        return 0.0
    got = float(numbers[-1])
    for g in _gt(record):
        try:
            if abs(got - float(g)) <= tol * max(1.0, abs(float(g))):
                return 1.0
        except ValueError:
            continue
    return 0.0


def format_match(pattern: str) -> RewardFn:
    """A reward of 1.0 when the whole response matches ``pattern`` (``re.DOTALL``), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)
    return lambda response, record=None: float(compiled.fullmatch(response.strip()) is not None)


REWARDS: dict[str, RewardFn] = {"minimind": minimind_shaping, "exact": exact_match, "numeric": numeric_match,
                                "think_format": format_match(r"(<think>)?.+</think>.+")}


def combine(weights: Mapping[str, float], extra: Mapping[str, RewardFn] | None = None) -> RewardFn:
    """``sum(w * fn(response, record))`` over the named rewards (names from :data:`REWARDS` or ``extra``)."""
    table = {**REWARDS, **(extra or {})}
    unknown = [k for k in weights if k not in table]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; known: {', '.join(sorted(table))}")
    parts = [(table[k], float(w)) for k, w in weights.items() if w]
    return lambda response, record: sum(w * fn(response, record) for fn, w in parts)


def score(fn: RewardFn, responses: Sequence[str], records: Sequence[Mapping],
          where: Sequence[str] | None = None) -> list[float]:
    """``fn`` over a batch; an exception or a non-finite value is a :class:`RewardError` naming the record
    (``where[i]``, e.g. ``file:line``, or its index). A reward with a ``batch(responses, records)`` method (a
    reward model) scores them all at once; when that raises, each is scored alone to name the record."""
    values = None
    if callable(getattr(fn, "batch", None)) and responses:
        with contextlib.suppress(Exception):
            values = [float(v) for v in fn.batch(responses, records)]
    out = []
    for i, (response, record) in enumerate(zip(responses, records, strict=True)):
        name = where[i] if where is not None else f"record {i}"
        try:
            value = values[i] if values is not None else float(fn(response, record))
        except Exception as e:
            raise RewardError(f"{name}: the reward function raised {type(e).__name__}: {e}") from e
        if not math.isfinite(value):
            raise RewardError(f"{name}: the reward is {value}, not a finite number")
        out.append(value)
    return out


def score_components(weights: Mapping[str, float], responses: Sequence[str], records: Sequence[Mapping],
                     where: Sequence[str] | None = None,
                     extra: Mapping[str, RewardFn] | None = None) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted total reward of each response and each named component's raw values (for the metrics);
    errors as :func:`score`."""
    table = {**REWARDS, **(extra or {})}
    unknown = [k for k in weights if k not in table]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; known: {', '.join(sorted(table))}")
    parts = {name: score(table[name], responses, records, where) for name, w in weights.items() if w}
    total = [sum(float(weights[name]) * values[i] for name, values in parts.items()) for i in range(len(responses))]
    return total, parts
