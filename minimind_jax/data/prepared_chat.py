"""Pre-tokenised chat data (sft / dpo / rlaif / agent): :func:`prepare_chat` once, then :class:`PreparedChatSource`.

The files are those of :mod:`minimind_jax.data.prepared` (same engine: resumable, tokenizer-hashed, meta.json
written last, bad lines named ``file:line`` or skipped and counted), with ``meta["stage"]`` the stage and
``segments_per_record`` token segments per record in ``tokens.bin`` / ``offsets.npy`` (record ``i``'s segment
``j`` is ``tokens[offsets[i*K + j]:offsets[i*K + j + 1]]``), plus ``flags.npy`` (uint8 per record) and, for the
RL stages, ``extra.bin`` / ``extra_offsets.npy`` (each record's prompt messages, tools and gt as JSON, read back
by :meth:`PreparedChatSource.prompt` for the rewards).

Segments per record (each the ids of a rendered text, ``tokenizers`` ``encode`` without special tokens):

* sft: the conversation as :func:`~minimind_jax.data.samples.render_conversation` renders it without
  augmentation, and the same text with every empty think block (``EMPTY_THINK``) removed;
* dpo: those two for ``chosen``, then for ``rejected``;
* rlaif: the generation prompt with ``open_thinking`` False, then True;
* agent: the generation prompt (with the record's tools).

Per-epoch augmentations stay per-epoch and are applied on ids at read time, with exactly the draws of the jsonl
path (``rng.random(3)`` per record): the empty-think removal picks the stored second form (both forms are
stored, since removing the block changes how the text around it tokenises); the random system prompt prepends
the pre-tokenised system block (``meta["chat"]["system_ids"]``, one per
:data:`~minimind_jax.data.samples.SYSTEM_PROMPTS`). The block is exact: the chat template renders a system
message as a prefix ending in ``<|im_end|>\\n`` before a ``<|im_start|>`` special token, so the text's ids are
the block's ids followed by the rest's (checked on a probe conversation at preparation; a template where that
fails records no blocks, and reading with ``add_system_prompt_prob`` > 0 is then an error). Flag bit 0 marks
the records MiniMind may add a system prompt to (first message not a system one, no tools), bits 1 / 2 a first
/ second pair whose text held an empty think block. The ids are then cut to ``max_seq_len`` (RL prompts: their
last ``max_seq_len``), padded, and the assistant labels recomputed on the cut ids
(:func:`~minimind_jax.data.samples.assistant_labels`'s rule, vectorised); reasoning ``loss_weights`` come from
:func:`~minimind_jax.data.samples.tag_weights` on those ids. rlaif's ``thinking_ratio`` picks the stored form.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from minimind_jax.data.jsonl import DataError, ReadStats, canonical_stage
from minimind_jax.data.prepared import (
    EXTRA_FILE,
    EXTRA_OFFSETS_FILE,
    FLAGS_FILE,
    META_FILE,
    TOKENS_FILE,
    PreparedSource,
    _check_tokens_file,
    _read_meta,
    _read_offsets,
    is_prepared_dir,
    prepare,
)
from minimind_jax.data.rl_prompts import RLPrompt, prompt_from_record
from minimind_jax.data.samples import (
    EMPTY_THINK,
    IGNORE_INDEX,
    REASON_TAGS,
    SYSTEM_PROMPTS,
    ChatMarkers,
    Encoded,
    render_conversation,
    tag_weights,
)

__all__ = ["CHAT_STAGES", "ChatRecordEncoder", "PreparedChatSource", "open_prepared", "prepare_chat"]

SEGMENTS = {"sft": 2, "dpo": 4, "rlaif": 2, "agent": 1}
CHAT_STAGES = tuple(SEGMENTS)
FLAG_SYSTEM = 1  # MiniMind may put a random system prompt before this record
FLAG_ALT = (2, 4)  # pair 0 / 1 (dpo's rejected) held an empty think block: its second segment drops them
_PROBE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]


def _system_eligible(messages: Sequence[dict], tools) -> bool:
    return bool(messages) and messages[0].get("role") != "system" and not tools


class ChatRecordEncoder:
    """``encoder(record) -> (segment texts, flags, extra bytes)`` for a validated, normalised record of
    ``stage`` (picklable: sent once to each preparation worker)."""

    def __init__(self, stage: str, tokenizer):
        self.stage = canonical_stage(stage)
        if self.stage not in SEGMENTS:
            raise ValueError(f"no chat record encoder for stage {stage!r}; expected one of {CHAT_STAGES}")
        self.tokenizer = tokenizer

    def _chat_pair(self, messages, pair: int) -> tuple[list[str], int]:
        text = render_conversation(messages, self.tokenizer)
        if EMPTY_THINK in text:
            return [text, text.replace(EMPTY_THINK, "")], FLAG_ALT[pair]
        return [text, ""], 0

    def _generation_prompt(self, prompt: RLPrompt, open_thinking: bool | None) -> str:
        kwargs = {} if open_thinking is None else {"open_thinking": open_thinking}
        return self.tokenizer.apply_chat_template(prompt.messages, tools=prompt.tools, tokenize=False,
                                                  add_generation_prompt=True, **kwargs)

    def __call__(self, record: dict) -> tuple[list[str], int, bytes]:
        if self.stage == "sft":
            messages = record["conversations"]
            texts, flags = self._chat_pair(messages, 0)
            has_tools = any(m.get("tools") for m in messages)
            return texts, flags | (FLAG_SYSTEM if _system_eligible(messages, has_tools) else 0), b""
        if self.stage == "dpo":
            chosen, f0 = self._chat_pair(record["chosen"], 0)
            rejected, f1 = self._chat_pair(record["rejected"], 1)
            return chosen + rejected, f0 | f1, b""
        prompt = prompt_from_record(record, self.stage)
        extra = json.dumps({"messages": prompt.messages, "tools": prompt.tools, "gt": prompt.gt},
                           ensure_ascii=False).encode("utf-8")
        if self.stage == "agent":
            return [self._generation_prompt(prompt, None)], 0, extra
        texts = [self._generation_prompt(prompt, False), self._generation_prompt(prompt, True)]
        return texts, FLAG_SYSTEM if _system_eligible(prompt.messages, prompt.tools) else 0, extra

    def system_ids(self) -> list[list[int]] | None:
        """The ids of each SYSTEM_PROMPTS block, or None when the template does not render a system message as
        a prefix whose ids concatenate with the rest's (see module docstring)."""
        tok = self.tokenizer
        if self.stage in ("sft", "dpo"):
            probe, render = _PROBE, lambda m: render_conversation(m, tok)
        else:  # a generation prompt: the conversation before the assistant slot
            probe, render = _PROBE[:1], lambda m: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        rest = render(probe)
        blocks = []
        for prompt in SYSTEM_PROMPTS:
            full = render([{"role": "system", "content": prompt}, *probe])
            if not full.endswith(rest):
                return None
            ids = tok.encode(full[: len(full) - len(rest)], add_special_tokens=False)
            if ids + tok.encode(rest, add_special_tokens=False) != tok.encode(full, add_special_tokens=False):
                return None
            blocks.append(ids)
        return blocks


def prepare_chat(stage: str, paths, out_dir, tokenizer, **kwargs) -> dict | None:
    """Tokenise ``stage`` jsonl ``paths`` into ``out_dir`` (see module docstring); ``kwargs`` as
    :func:`~minimind_jax.data.prepared.prepare` (workers, chunk_lines, skip_bad_lines, overwrite, ...)."""
    encoder = ChatRecordEncoder(stage, tokenizer)
    return prepare(paths, out_dir, tokenizer, stage=encoder.stage, record_encoder=encoder,
                   segments_per_record=SEGMENTS[encoder.stage], extra_meta={"system_ids": encoder.system_ids()},
                   **kwargs)


def open_prepared(directory: str | os.PathLike, stage: str):
    """The source for a prepared directory: :class:`PreparedSource` (pretrain) or :class:`PreparedChatSource`;
    a one-line DataError when it was prepared for another stage."""
    directory = os.fspath(directory)
    if not is_prepared_dir(directory):
        raise DataError(f"{directory} is not a prepared data directory (no {META_FILE})")
    have, want = _read_meta(directory).get("stage", "pretrain"), canonical_stage(stage)
    if have != want:
        raise DataError(f"{directory}: holds data prepared for the {have} stage (scripts/prepare_data.py --stage "
                        f"{have}), not {want} data")
    return PreparedSource(directory) if want == "pretrain" else PreparedChatSource(directory)


class PreparedChatSource(PreparedSource):
    """A prepared chat directory as a grain random-access source: ``source[i]`` = ``{"segments": [int32 arrays],
    "flags": int}``; :meth:`transform` turns it into the jsonl path's arrays; :meth:`prompt` gives an RL
    record's :class:`~minimind_jax.data.rl_prompts.RLPrompt` (messages, tools, gt)."""

    def __init__(self, directory: str | os.PathLike, stage: str | None = None):  # noqa: D107 (no packing)
        self.directory = os.fspath(directory)
        if not is_prepared_dir(self.directory):
            raise DataError(f"{self.directory} is not a prepared data directory (no {META_FILE}; an unfinished "
                            "preparation is resumed by rerunning scripts/prepare_data.py)")
        self.meta = _read_meta(self.directory)
        self.stage = self.meta.get("stage", "pretrain")
        if self.stage not in SEGMENTS or (stage is not None and canonical_stage(stage) != self.stage):
            raise DataError(f"{self.directory}: holds data prepared for the {self.stage} stage, not "
                            f"{stage or 'chat'} data")
        self.segments = SEGMENTS[self.stage]
        if self.meta.get("segments_per_record") != self.segments:
            raise DataError(f"{os.path.join(self.directory, META_FILE)}: key 'segments_per_record' must be "
                            f"{self.segments} for {self.stage} data")
        self.pack, self.max_seq_len = False, None
        self.dtype = np.dtype(self.meta["dtype"])
        self.offsets = _read_offsets(self.directory, self.meta)
        self.num_tokens = int(self.offsets[-1])
        _check_tokens_file(self.directory, self.num_tokens, self.dtype)
        self.flags = self._load(FLAGS_FILE, np.uint8, self.meta["documents"])
        self.extra_offsets = None
        if self.stage in ("rlaif", "agent"):
            self.extra_offsets = self._load(EXTRA_OFFSETS_FILE, np.int64, self.meta["documents"] + 1)
            _check_size(os.path.join(self.directory, EXTRA_FILE), int(self.extra_offsets[-1]))
        self.stats = ReadStats(files=len(self.meta["sources"]), lines=sum(s["lines"] for s in self.meta["sources"]),
                               records=len(self), blank_lines=self.meta["blank_lines"],
                               bad_lines=self.meta["bad_lines"], bad=list(self.meta["bad"]))
        self._tokens = None

    def _load(self, name: str, dtype, length: int) -> np.ndarray:
        path = os.path.join(self.directory, name)
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{path}: cannot be read ({e})") from None
        if array.dtype != dtype or array.shape != (length,):
            raise DataError(f"{path}: holds {array.dtype} {array.shape}, not the {np.dtype(dtype)} ({length},) "
                            f"that meta.json's {self.meta['documents']} records need (damaged)")
        return array

    @property
    def documents(self) -> int:
        return len(self.flags)

    def __len__(self) -> int:
        return self.documents

    def location(self, index: int) -> str:
        return f"{self.directory} (record {index})"

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        index %= len(self)
        k = index * self.segments
        bounds = self.offsets[k: k + self.segments + 1]
        segments = [np.asarray(self.tokens[a:b], np.int32) for a, b in zip(bounds[:-1], bounds[1:])]
        return {"segments": segments, "flags": int(self.flags[index])}

    def prompt(self, index: int) -> RLPrompt:
        """RL record ``index`` (its prompt messages, tools and gt) as an RLPrompt, for the rewards."""
        if self.extra_offsets is None:
            raise ValueError(f"{self.stage} data holds no prompts")
        index = int(index) % len(self)
        start, end = int(self.extra_offsets[index]), int(self.extra_offsets[index + 1])
        with open(os.path.join(self.directory, EXTRA_FILE), "rb") as f:
            f.seek(start)
            data = json.loads(f.read(end - start).decode("utf-8"))
        return RLPrompt(messages=data["messages"], tools=data["tools"], gt=data["gt"], kind=self.stage,
                        index=index, where=self.location(index))

    def prompts(self) -> _PromptView:
        """An :class:`~minimind_jax.data.rl_prompts.RLPromptSource`-like view (``len``, ``[i]`` -> RLPrompt,
        ``stats``) for the RL stages' reward look-ups by ``record_index``."""
        if self.extra_offsets is None:
            raise ValueError(f"{self.stage} data holds no prompts")
        return _PromptView(self)

    def transform(self, tokenizer, max_seq_len: int, *, add_system_prompt_prob: float = 0.0,
                  drop_empty_think_prob: float = 0.0, special_token_weight: float | None = None,
                  weighted_tags: tuple[str, ...] = REASON_TAGS, thinking_ratio: float = 0.5):
        """``fn(record, rng) -> Encoded``, equal to :func:`~minimind_jax.data.pipeline.make_transform`'s for the
        original record under the same rng (checks the tokenizer first)."""
        self.check_tokenizer(tokenizer)
        system = self.meta.get("chat", {}).get("system_ids")
        if add_system_prompt_prob and system is None:
            raise DataError(f"{self.directory}: prepared without system-prompt blocks (the tokenizer's chat "
                            "template does not render a system message as a plain prefix); use the jsonl files")
        system = [np.asarray(b, np.int32) for b in system or []]
        aug = _Augment(system, add_system_prompt_prob, drop_empty_think_prob, thinking_ratio)
        if self.stage in ("rlaif", "agent"):
            return lambda record, rng: _rl_prompt(aug.prompt_ids(record, rng, self.stage), max_seq_len)
        markers = ChatMarkers.from_tokenizer(tokenizer)
        if self.stage == "dpo":
            return lambda record, rng: _dpo(aug, record, rng, max_seq_len, markers)
        if special_token_weight is None:
            return lambda record, rng: _sft(aug.chat_ids(record, rng), max_seq_len, markers)
        tag_ids = [tokenizer.encode(tag, add_special_tokens=False) for tag in weighted_tags]

        def weighted(record, rng):
            enc = _sft(aug.chat_ids(record, rng), max_seq_len, markers)
            w = tag_weights(enc.arrays["input_ids"], enc.arrays["labels"], tag_ids, special_token_weight)
            return Encoded({**enc.arrays, "loss_weights": w}, enc.truncated)

        return weighted

    def __repr__(self) -> str:
        return f"PreparedChatSource({self.directory!r}, stage={self.stage}, records={len(self)})"


class _PromptView:
    """:meth:`PreparedChatSource.prompts`."""

    def __init__(self, source: PreparedChatSource):
        self.source, self.kind, self.stats = source, source.stage, source.stats

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> RLPrompt:
        return self.source.prompt(index)


def _check_size(path: str, want: int) -> None:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    if size != want:
        raise DataError(f"{path}: {size:,} bytes, extra_offsets.npy needs {want:,} (damaged); prepare again")


class _Augment:
    """MiniMind's per-epoch augmentations on stored ids, with the jsonl path's draws (see module docstring)."""

    def __init__(self, system: list[np.ndarray], p_system: float, p_drop: float, thinking_ratio: float):
        self.system, self.p_system, self.p_drop, self.thinking_ratio = system, p_system, p_drop, thinking_ratio

    def _with_system(self, ids: np.ndarray, flags: int, draws) -> np.ndarray:
        if self.p_system and flags & FLAG_SYSTEM and draws[0] < self.p_system:
            return np.concatenate([self.system[min(int(draws[1] * len(self.system)), len(self.system) - 1)], ids])
        return ids

    def chat_ids(self, record: dict, rng, pair: int = 0, draws=None) -> np.ndarray:
        """A conversation's ids (sft, or dpo's pair 0 / 1) after the system prompt and empty-think draws."""
        if draws is None:
            if (self.p_system or self.p_drop) and rng is None:
                raise ValueError("augmentations need an rng")
            draws = rng.random(3) if rng is not None else None
        flags, segments = record["flags"], record["segments"]
        ids = segments[2 * pair]
        if self.p_drop and flags & FLAG_ALT[pair] and draws[2] < self.p_drop:
            ids = segments[2 * pair + 1]
        return self._with_system(ids, flags, draws) if pair == 0 and draws is not None else ids

    def prompt_ids(self, record: dict, rng, stage: str) -> np.ndarray:
        segments = record["segments"]
        if stage == "agent":
            return segments[0]
        if rng is None:
            raise ValueError("prepared rlaif prompts need the pipeline's rng (open_thinking is drawn)")
        draws = rng.random(3)
        ids = segments[1] if draws[2] < self.thinking_ratio else segments[0]
        return self._with_system(ids, record["flags"], draws) if self.p_system else ids


def _matches(ids: np.ndarray, pattern: Sequence[int]) -> np.ndarray:
    """The sorted positions where the id sequence ``pattern`` starts in ``ids``."""
    k = len(pattern)
    if k == 0 or k > len(ids):
        return np.zeros((0,), np.int64)
    found = np.flatnonzero(ids[: len(ids) - k + 1] == pattern[0])
    for j in range(1, k):
        found = found[ids[found + j] == pattern[j]]
    return found


def fast_assistant_labels(input_ids: np.ndarray, markers: ChatMarkers) -> np.ndarray:
    """:func:`~minimind_jax.data.samples.assistant_labels` (the same scan: a reply from after each start marker
    through the next end marker, scanning on after it) with the markers found by numpy: a Python step per reply,
    not per token."""
    ids = np.asarray(input_ids)
    n, ls, le = len(ids), len(markers.start), len(markers.end)
    labels = np.full((n,), IGNORE_INDEX, np.int32)
    ends = _matches(ids, markers.end)
    resume = 0
    for s0 in _matches(ids, markers.start):
        if s0 < resume:
            continue
        s = int(s0) + ls
        k = int(np.searchsorted(ends, s))
        found = k < len(ends)
        stop = min(int(ends[k]) + le, n) if found else n
        labels[s:stop] = ids[s:stop]
        resume = int(ends[k]) + le if found else n
    return labels


def _sft(ids: np.ndarray, max_seq_len: int, markers: ChatMarkers) -> Encoded:
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be at least 1, got {max_seq_len}")
    input_ids = np.full((max_seq_len,), markers.pad_id, np.int32)
    kept = ids[:max_seq_len]
    input_ids[: len(kept)] = kept
    return Encoded({"input_ids": input_ids, "labels": fast_assistant_labels(input_ids, markers)},
                   len(ids) > max_seq_len)


def _dpo(aug: _Augment, record: dict, rng, max_seq_len: int, markers: ChatMarkers) -> Encoded:
    if aug.p_drop and rng is None:
        raise ValueError("augmentations need an rng")
    draws = rng.random(3) if rng is not None else None  # one draw for the pair, as encode_dpo
    arrays, truncated = {}, False
    for pair, side in enumerate(("chosen", "rejected")):
        enc = _sft(aug.chat_ids(record, rng, pair, draws), max_seq_len, markers)
        arrays[f"{side}_input_ids"], arrays[f"{side}_labels"] = enc.arrays["input_ids"], enc.arrays["labels"]
        truncated |= enc.truncated
    return Encoded(arrays, truncated)


def _rl_prompt(ids: np.ndarray, max_len: int) -> Encoded:
    kept = ids[-max_len:]
    out = np.zeros(max_len, np.int32)
    out[max_len - len(kept):] = kept
    cut = len(ids) > max_len
    return Encoded({"prompt_ids": out, "prompt_length": np.int32(len(kept)), "prompt_truncated": np.int32(cut)}, cut)
