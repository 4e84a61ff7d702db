"""Prompts for the RL stages: MiniMind's ``rlaif.jsonl`` (GRPO / PPO / CISPO) and ``agent_rl.jsonl`` records.

Both are ``{"conversations": [...]}`` whose last message is the assistant slot the policy generates; MiniMind's
``RLAIFDataset`` / ``AgentRLDataset`` keep ``conversations[:-1]`` as the prompt. Agent records also carry
``gt``, the list of values the final answer must contain (checked by ``minimind_jax.rl.tools.agent_reward``), and
name their tools in the system message's ``tools`` (a list or, as MiniMind-3 writes it, a JSON string). rlaif
records may carry a ``gt`` too (a string / number / list) for verifiable rewards (``minimind_jax.rl.rewards``).

* :class:`RLPromptSource` is random access (``len`` / ``[i]`` -> :class:`RLPrompt`) over the validated records
  of one or more files (a bad record raises :class:`~minimind_jax.data.jsonl.DataError` naming ``file:line``,
  or is skipped and counted with ``skip_bad_lines``).
* :func:`iter_rl_prompts` yields them in a seeded per-epoch order, one shard per host, resumable by position.
* :func:`render_rl_prompt` gives the generation prompt text as MiniMind renders it: rlaif prompts get
  ``pre_processing_chat``'s random system prompt (p=0.2 when none and no tools) and ``open_thinking`` with
  probability ``thinking_ratio`` (MiniMind: 0.5); agent prompts are rendered with their tools and no
  augmentation. The draws come from the ``rng`` passed in (a fixed number per prompt).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from minimind_jax.data.jsonl import JsonlSource, ReadStats, canonical_stage
from minimind_jax.data.samples import SYSTEM_PROMPTS, Encoded, conversation_tools

__all__ = ["RLPrompt", "RLPromptSource", "iter_rl_prompts", "render_rl_prompt", "prompt_from_record",
           "encode_rl_prompt"]


@dataclasses.dataclass(frozen=True)
class RLPrompt:
    """One RL prompt: ``messages`` (the conversation before the assistant slot; ``tools`` / ``tool_calls``
    strings parsed into lists), ``tools`` (the tool schemas or None), ``gt`` (None when the record has none),
    ``kind`` ("rlaif" or "agent"), ``index`` (record number in the source) and ``where`` (``file:line``)."""

    messages: list[dict]
    tools: list | None
    gt: Any
    kind: str
    index: int
    where: str

    @property
    def gt_list(self) -> list:
        """``gt`` as a list (a single value becomes a list of one; None an empty list)."""
        if self.gt is None:
            return []
        return list(self.gt) if isinstance(self.gt, list) else [self.gt]


class RLPromptSource:
    """Validated RL prompt records of jsonl files by random access; ``kind`` is "rlaif" or "agent"."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], kind: str = "rlaif", *,
                 skip_bad_lines: bool = False):
        self.kind = canonical_stage(kind)
        if self.kind not in ("rlaif", "agent"):
            raise ValueError(f"kind must be 'rlaif' or 'agent', got {kind!r}")
        self.records = JsonlSource(paths, self.kind, skip_bad_lines=skip_bad_lines)

    @property
    def stats(self) -> ReadStats:
        return self.records.stats

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> RLPrompt:
        index = int(index)
        if -len(self) <= index < 0:
            index += len(self)
        return prompt_from_record(self.records[index], self.kind, index, self.records.location(index))


def prompt_from_record(record: dict, kind: str, index: int = 0, where: str = "") -> RLPrompt:
    """The :class:`RLPrompt` of a validated rlaif / agent record (``conversations[:-1]`` is the prompt)."""
    messages = [dict(m) for m in record["conversations"][:-1]]
    return RLPrompt(messages=messages, tools=conversation_tools(messages), gt=record.get("gt"), kind=kind,
                    index=index, where=where)


def epoch_order(n: int, seed: int | None, epoch: int) -> np.ndarray:
    """The record order of one epoch: file order without a seed, else a permutation from (seed, epoch)."""
    if seed is None:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def iter_rl_prompts(source: RLPromptSource, *, seed: int | None = 0, epochs: int | None = 1,
                    shard_index: int = 0, shard_count: int = 1, start: int = 0) -> Iterator[RLPrompt]:
    """The prompts of this host's shard, epoch after epoch (``epochs=None``: endless).

    Each epoch is a permutation of all records (:func:`epoch_order`); host ``shard_index`` takes every
    ``shard_count``-th of it, so hosts never share a prompt within an epoch (the last ``n % shard_count``
    records of an epoch's order are dropped so every host yields the same count). ``start`` skips that many of
    this host's prompts (resume from a saved position = the number of prompts consumed before)."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index} and {shard_count}")
    per_epoch = len(source) // shard_count
    if per_epoch == 0:
        raise ValueError(f"{len(source)} prompts cannot be split over {shard_count} hosts")
    position = start
    epoch = position // per_epoch
    while epochs is None or epoch < epochs:
        order = epoch_order(len(source), seed, epoch)[: per_epoch * shard_count]
        mine = order[shard_index::shard_count]
        for i in mine[position - epoch * per_epoch:]:
            yield source[int(i)]
            position += 1
        epoch += 1


def render_rl_prompt(prompt: RLPrompt, tokenizer, *, rng: np.random.Generator | None = None,
                     add_system_prompt_prob: float = 0.2, thinking_ratio: float = 0.5) -> str:
    """The generation prompt text (``add_generation_prompt=True``), MiniMind's way (see module docstring).

    Three draws from ``rng`` per rlaif prompt (system prompt?, which one, thinking?); none for agent prompts.
    Without ``rng``: no system prompt and ``open_thinking`` left to the template's default."""
    messages = [dict(m) for m in prompt.messages]
    if prompt.kind == "agent":
        return tokenizer.apply_chat_template(messages, tools=prompt.tools, tokenize=False, add_generation_prompt=True)
    open_thinking = None
    if rng is not None:
        draws = rng.random(3)
        if messages[0].get("role") != "system" and not prompt.tools and draws[0] < add_system_prompt_prob:
            system = SYSTEM_PROMPTS[min(int(draws[1] * len(SYSTEM_PROMPTS)), len(SYSTEM_PROMPTS) - 1)]
            messages = [{"role": "system", "content": system}, *messages]
        open_thinking = bool(draws[2] < thinking_ratio)
    return tokenizer.apply_chat_template(messages, tools=prompt.tools, tokenize=False, add_generation_prompt=True,
                                         open_thinking=open_thinking)


def encode_rl_prompt(prompt: RLPrompt, tokenizer, max_len: int, *, rng: np.random.Generator | None = None,
                     add_system_prompt_prob: float = 0.2, thinking_ratio: float = 0.5) -> Encoded:
    """The rendered prompt's token ids as fixed-size arrays for a batch: ``prompt_ids`` (``max_len``, the ids
    left-padded with 0), ``prompt_length`` (how many are real), ``prompt_truncated`` (1 when cut). A prompt longer than ``max_len`` keeps its last
    ``max_len`` tokens (MiniMind's ``[:, -max_seq_len:]``) and is counted as truncated."""
    text = render_rl_prompt(prompt, tokenizer, rng=rng, add_system_prompt_prob=add_system_prompt_prob,
                            thinking_ratio=thinking_ratio)
    ids = tokenizer.encode(text, add_special_tokens=False)
    kept = ids[-max_len:]
    out = np.zeros(max_len, np.int32)
    out[max_len - len(kept):] = kept
    cut = len(ids) > max_len
    return Encoded({"prompt_ids": out, "prompt_length": np.int32(len(kept)), "prompt_truncated": np.int32(cut)}, cut)
