"""Pure per-example transforms, MiniMind's rules: a record dict -> fixed-shape numpy int32 arrays.

Every stage returns ``input_ids`` and ``labels`` of the same length ``max_seq_len`` (DPO: one such pair for
``chosen`` and one for ``rejected``). Labels are aligned with the inputs (``labels[t] = input_ids[t]`` where
trained, :data:`IGNORE_INDEX` elsewhere); the loss shifts by one (logits[:-1] against labels[1:]), as in
MiniMind's current ``PretrainDataset`` / ``SFTDataset``.

* Pretrain (``{"text"}``): ``bos + tokens(text)[:max_seq_len-2] + eos``, padded with pad; labels = input_ids
  with every pad-id position set to -100 (MiniMind: ``labels[input_ids == pad_token_id] = -100``).
* SFT (``{"conversations"}``, also reasoning / LoRA data): rendered by the tokenizer's chat template
  (``tools`` taken from the first message with a ``tools`` or MiniMind's ``functions`` list), encoded, cut to
  ``max_seq_len``, padded; labels cover each assistant reply: from just after the token ids of
  ``<|im_start|>assistant\\n`` up to and including those of ``<|im_end|>\\n`` (MiniMind's ``generate_labels``:
  a search over token ids; a reply cut by truncation is covered up to the end).
* DPO (``{"chosen", "rejected"}``): both conversations as SFT (without the system-prompt augmentation, as
  MiniMind's ``DPODataset``).

Augmentations (MiniMind's ``pre_processing_chat`` / ``post_processing_chat``; off by default): with
``add_system_prompt_prob`` a random system prompt from :data:`SYSTEM_PROMPTS` is put before conversations that
open without one and carry no ``tools``; with ``drop_empty_think_prob`` the empty ``<think>\\n\\n</think>\\n\\n`` blocks are removed
from the rendered text (MiniMind's defaults: 0.2 and 0.8). They draw from the ``rng`` passed in (the pipeline
derives it from the seed, the epoch and the record's index), always the same number of draws per example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "EMPTY_THINK",
    "IGNORE_INDEX",
    "REASON_TAGS",
    "SYSTEM_PROMPTS",
    "ChatMarkers",
    "Encoded",
    "assistant_labels",
    "conversation_tools",
    "encode_dpo",
    "encode_pretrain",
    "encode_sft",
    "render_conversation",
    "tag_weights",
]

IGNORE_INDEX = -100
REASON_TAGS = ("<think>", "</think>", "<answer>", "</answer>")  # MiniMind's reasoning tags
EMPTY_THINK = "<think>\n\n</think>\n\n"

# MiniMind's pre_processing_chat prompts
SYSTEM_PROMPTS = (
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。",
    "你是minimind，一个小巧但有用的语言模型。",
    "你是一个专业的AI助手，请提供有价值的回答。",
    "你是minimind，请尽力帮助用户解决问题。",
    "你是一个可靠的AI，请给出准确的回答。",
    "You are a helpful AI assistant.",
    "You are minimind, a lightweight intelligent assistant.",
    "You are a friendly chatbot. Please answer the user's questions carefully.",
    "You are a knowledgeable AI. Try your best to provide accurate information.",
    "You are minimind, a small but useful language model.",
)


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One transformed example: ``arrays`` (name -> int32 array of shape ``(max_seq_len,)``) and whether any
    sequence of it was cut to ``max_seq_len``."""

    arrays: dict[str, np.ndarray]
    truncated: bool


@dataclasses.dataclass(frozen=True)
class ChatMarkers:
    """Token ids that open (``<|im_start|>assistant\\n``) and close (``<|im_end|>\\n``) an assistant reply."""

    start: tuple[int, ...]
    end: tuple[int, ...]
    pad_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatMarkers:
        start = tokenizer.encode(f"{tokenizer.bos_token}assistant\n", add_special_tokens=False)
        end = tokenizer.encode(f"{tokenizer.eos_token}\n", add_special_tokens=False)
        return cls(tuple(start), tuple(end), _pad_id(tokenizer))


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return 0 if pad is None else int(pad)


def _check_len(max_seq_len: int, minimum: int = 2) -> None:
    if max_seq_len < minimum:
        raise ValueError(f"max_seq_len must be at least {minimum}, got {max_seq_len}")


def _pad(ids: Sequence[int], length: int, pad_id: int) -> np.ndarray:
    out = np.full((length,), pad_id, np.int32)
    out[: len(ids)] = ids
    return out


# --------------------------------------------------------------------------------------------------------------
# Pretrain


PREFIX_CHARS_PER_TOKEN = 8  # first prefix tried: this many characters per token wanted


def leading_tokens(text: str, tokenizer, count: int) -> list[int]:
    """The ids of ``text`` when they number at most ``count``, else (at least) their first ``count``: exactly
    those of ``tokenizer.encode(text)``, without encoding all of a long text (an 8 MiB line took 18 s and
    1.5 GB whole).

    A prefix of ``count * PREFIX_CHARS_PER_TOKEN`` characters is encoded, then one twice as long, doubling
    until two successive prefixes agree on their first ``count`` ids (a merge or pre-token crossing the cut
    changes only ids near the cut) or the prefix is the whole text."""
    n, previous = max(count, 1) * PREFIX_CHARS_PER_TOKEN, None
    while n < len(text):
        ids = tokenizer.encode(text[:n], add_special_tokens=False)
        if previous is not None and len(previous) >= count and ids[:count] == previous[:count]:
            return ids
        previous, n = ids, 2 * n
    return tokenizer.encode(text, add_special_tokens=False)


def encode_pretrain(record: Mapping[str, Any], tokenizer, max_seq_len: int) -> Encoded:
    """``{"text"}`` -> ``input_ids`` = bos + tokens[:max_seq_len-2] + eos + pads; ``labels`` = ids, pads -> -100.

    Only a prefix of a long text is encoded (:func:`leading_tokens`; the ids are those of the whole text)."""
    _check_len(max_seq_len)
    # one id more than is kept tells whether the text was cut
    tokens = leading_tokens(str(record["text"]), tokenizer, max_seq_len - 1)
    truncated = len(tokens) > max_seq_len - 2
    ids = [tokenizer.bos_token_id, *tokens[: max_seq_len - 2], tokenizer.eos_token_id]
    pad_id = _pad_id(tokenizer)
    input_ids = _pad(ids, max_seq_len, pad_id)
    labels = np.where(input_ids == pad_id, IGNORE_INDEX, input_ids).astype(np.int32)
    return Encoded({"input_ids": input_ids, "labels": labels}, truncated)


# --------------------------------------------------------------------------------------------------------------
# Chat


def conversation_tools(messages: Sequence[Mapping[str, Any]]) -> list | None:
    """The tool schemas of a conversation: the first non-empty ``tools`` (or MiniMind's ``functions``) list."""
    for m in messages:
        for key in ("tools", "functions"):
            if m.get(key):
                return list(m[key])
    return None


def render_conversation(messages: Sequence[Mapping[str, Any]], tokenizer, *, rng: np.random.Generator | None = None,
                        add_system_prompt_prob: float = 0.0, drop_empty_think_prob: float = 0.0) -> str:
    """The conversation as chat-template text, after MiniMind's augmentations (see module docstring)."""
    messages = [dict(m) for m in messages]
    if (add_system_prompt_prob or drop_empty_think_prob) and rng is None:
        raise ValueError("augmentations need an rng")
    # the same draws for every example (whether or not they are used), so one example's choices never shift
    # another's
    draws = rng.random(3) if rng is not None else None
    # MiniMind's pre_processing_chat leaves a conversation that carries tools as it is
    has_tools = any(m.get("tools") for m in messages)
    if add_system_prompt_prob and messages and messages[0].get("role") != "system" and not has_tools:
        if draws[0] < add_system_prompt_prob:
            prompt = SYSTEM_PROMPTS[min(int(draws[1] * len(SYSTEM_PROMPTS)), len(SYSTEM_PROMPTS) - 1)]
            messages = [{"role": "system", "content": prompt}, *messages]
    text = tokenizer.apply_chat_template(messages, tools=conversation_tools(messages), tokenize=False,
                                         add_generation_prompt=False)
    if drop_empty_think_prob and EMPTY_THINK in text and draws[2] < drop_empty_think_prob:
        text = text.replace(EMPTY_THINK, "")
    return text


def assistant_labels(input_ids: Sequence[int], markers: ChatMarkers) -> np.ndarray:
    """MiniMind's ``generate_labels``: -100 except from after each ``start`` marker through the next ``end``
    marker (inclusive; to the end of the sequence if there is none)."""
    ids = list(map(int, input_ids))
    n = len(ids)
    start, end = list(markers.start), list(markers.end)
    labels = np.full((n,), IGNORE_INDEX, np.int32)
    i = 0
    while i < n:
        if ids[i: i + len(start)] == start:
            s = i + len(start)
            e = s
            while e < n and ids[e: e + len(end)] != end:
                e += 1
            stop = min(e + len(end), n)
            labels[s:stop] = ids[s:stop]
            i = e + len(end) if e < n else n
        else:
            i += 1
    return labels


def _encode_chat(text: str, tokenizer, max_seq_len: int, markers: ChatMarkers) -> tuple[np.ndarray, np.ndarray, bool]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    truncated = len(ids) > max_seq_len
    input_ids = _pad(ids[:max_seq_len], max_seq_len, markers.pad_id)
    return input_ids, assistant_labels(input_ids, markers), truncated


def encode_sft(record: Mapping[str, Any], tokenizer, max_seq_len: int, *, markers: ChatMarkers | None = None,
               rng: np.random.Generator | None = None, add_system_prompt_prob: float = 0.0,
               drop_empty_think_prob: float = 0.0) -> Encoded:
    """``{"conversations"}`` -> ``input_ids`` (template text, cut, padded) and assistant-only ``labels``."""
    _check_len(max_seq_len, 1)
    markers = markers or ChatMarkers.from_tokenizer(tokenizer)
    text = render_conversation(record["conversations"], tokenizer, rng=rng,
                               add_system_prompt_prob=add_system_prompt_prob,
                               drop_empty_think_prob=drop_empty_think_prob)
    input_ids, labels, truncated = _encode_chat(text, tokenizer, max_seq_len, markers)
    return Encoded({"input_ids": input_ids, "labels": labels}, truncated)


def encode_dpo(record: Mapping[str, Any], tokenizer, max_seq_len: int, *, markers: ChatMarkers | None = None,
               rng: np.random.Generator | None = None, drop_empty_think_prob: float = 0.0) -> Encoded:
    """``{"chosen", "rejected"}`` -> ``chosen_input_ids``, ``chosen_labels``, ``rejected_input_ids``,
    ``rejected_labels``. Both sides share one augmentation draw (the pair differs only in its replies)."""
    _check_len(max_seq_len, 1)
    markers = markers or ChatMarkers.from_tokenizer(tokenizer)
    arrays, truncated = {}, False
    state = rng.bit_generator.state if rng is not None else None
    for side in ("chosen", "rejected"):
        if rng is not None:
            rng.bit_generator.state = state
        text = render_conversation(record[side], tokenizer, rng=rng, drop_empty_think_prob=drop_empty_think_prob)
        input_ids, labels, cut = _encode_chat(text, tokenizer, max_seq_len, markers)
        arrays[f"{side}_input_ids"], arrays[f"{side}_labels"] = input_ids, labels
        truncated |= cut
    return Encoded(arrays, truncated)


# --------------------------------------------------------------------------------------------------------------
# Reasoning


def tag_weights(input_ids: np.ndarray, labels: np.ndarray, tag_ids: Sequence[Sequence[int]], weight: float) -> np.ndarray:
    """Per-position loss weights (float32, aligned with ``labels``): 0 where not trained, ``weight`` on trained
    positions inside an occurrence of any tag's token-id sequence, 1 on the other trained positions.

    Tags are matched as whole id sequences (``<answer>`` is three tokens in MiniMind's tokenizer, ``<`` ``answer``
    ``>``: a lone ``<`` elsewhere is not a tag), unlike MiniMind's ``torch.isin`` on the union of their ids."""
    ids = np.asarray(input_ids)
    trained = np.asarray(labels) != IGNORE_INDEX
    weights = trained.astype(np.float32)
    is_tag = np.zeros(ids.shape, bool)
    for seq in tag_ids:
        seq = np.asarray(seq)
        k = len(seq)
        if k == 0 or k > len(ids):
            continue
        windows = np.lib.stride_tricks.sliding_window_view(ids, k)
        for start in np.flatnonzero((windows == seq).all(axis=1)):
            is_tag[start:start + k] = True
    weights[is_tag & trained] = np.float32(weight)
    return weights
