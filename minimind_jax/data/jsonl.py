"""Reading MiniMind's jsonl files: a random-access source with per-line validation.

:class:`JsonlSource` scans its files once, parsing and validating every line for the given stage, and keeps the
byte offsets of the good lines; ``source[i]`` then re-reads and parses line ``i`` on demand (so multi-GB files
are not held in memory). It implements grain's ``RandomAccessDataSource`` protocol (``__len__`` /
``__getitem__``) and can be pickled (open file handles are dropped and re-opened).

A bad line (malformed JSON, not an object, a missing field, a field of the wrong type, an unknown role, an empty
conversation) raises :class:`DataError` naming ``file:line``; with ``skip_bad_lines=True`` it is skipped and
counted in :class:`ReadStats` instead (nothing is dropped silently). Blank lines are ignored (and counted as
``blank_lines``).

MiniMind-3's files write a message's ``tools`` and ``tool_calls`` as JSON *strings*; they are accepted as
lists or such strings (parsed when the record is read: :func:`normalize_record`), and a string that is not
valid JSON is a bad line naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "DataError", "ReadStats", "JsonlSource", "STAGES", "ROLES", "canonical_stage", "validate_record",
    "validate_conversation", "normalize_conversation", "normalize_record", "JSON_LIST_FIELDS",
]

STAGES = ("pretrain", "sft", "dpo", "rlaif", "agent")
# other MiniMind data kinds that share the SFT format
_STAGE_ALIASES = {"reason": "sft", "reasoning": "sft", "lora": "sft", "lora_identity": "sft", "distill": "sft",
                  "grpo": "rlaif", "ppo": "rlaif", "agent_rl": "agent"}  # RL prompts: see rl_prompts.py
ROLES = ("system", "user", "assistant", "tool")
# message fields that hold lists, which MiniMind-3's files write as JSON strings
JSON_LIST_FIELDS = ("tools", "functions", "tool_calls")
MAX_REPORTED_BAD_LINES = 100
_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """A data file or record that cannot be used; the message starts with ``file:line:`` when known."""


def canonical_stage(stage: str) -> str:
    stage = _STAGE_ALIASES.get(stage, stage)
    if stage not in STAGES:
        raise ValueError(f"unknown data stage {stage!r}; expected one of {STAGES + tuple(_STAGE_ALIASES)}")
    return stage


@dataclasses.dataclass
class ReadStats:
    """What reading (and, in this process, transforming) the data found.

    ``bad_lines`` counts skipped lines (only with ``skip_bad_lines=True``); ``bad`` lists the first
    :data:`MAX_REPORTED_BAD_LINES` of them as ``"file:line: reason"``. ``truncated`` counts samples cut to
    ``max_seq_len`` by the transforms that ran in this process (see ``pipeline.py``).
    """

    files: int = 0
    lines: int = 0
    records: int = 0
    blank_lines: int = 0
    bad_lines: int = 0
    bad: list[str] = dataclasses.field(default_factory=list)
    truncated: int = 0
    transformed: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def count_sample(self, truncated: bool) -> None:
        with self._lock:
            self.transformed += 1
            self.truncated += int(bool(truncated))

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def validate_conversation(messages: Any, field: str) -> None:
    """Raise DataError (without location) unless ``messages`` is a non-empty list of valid chat messages."""
    if not isinstance(messages, list):
        raise DataError(f"field {field!r} must be a list of messages, got {_type_name(messages)}")
    if not messages:
        raise DataError(f"field {field!r} is an empty conversation")
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where} must be an object, got {_type_name(m)}")
        if "role" not in m:
            raise DataError(f"{where} is missing the field 'role'")
        role = m["role"]
        if role not in ROLES:
            raise DataError(f"{where} has an unknown role {role!r}; expected one of {ROLES}")
        content = m.get("content")
        if "content" not in m and not (role == "assistant" and m.get("tool_calls")):
            raise DataError(f"{where} is missing the field 'content'")
        if content is not None and not isinstance(content, str):
            raise DataError(f"{where}.content must be a string, got {_type_name(content)}")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise DataError(f"{where}.reasoning_content must be a string, got {_type_name(reasoning)}")
        for key in JSON_LIST_FIELDS:
            value = _json_list(m.get(key), f"{where}.{key}")
            if value is not None and not isinstance(value, list):
                raise DataError(f"{where}.{key} must be a list (or a JSON string of one), got {_type_name(value)}")


def _json_list(value: Any, where: str) -> Any:
    """MiniMind-3's files carry ``tools`` / ``tool_calls`` as JSON strings (its dataset code ``json.loads`` them):
    such a string is parsed; an empty string means absent; anything else is returned as is."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{where} is a string that is not valid JSON ({e})") from None


def normalize_conversation(messages: list[dict], field: str) -> list[dict]:
    """The (validated) messages with ``tools`` / ``functions`` / ``tool_calls`` given as JSON strings parsed into
    lists and empty ones dropped, as MiniMind's SFT dataset reads them; other messages are returned unchanged."""
    out = []
    for i, m in enumerate(messages):
        if any(isinstance(m.get(k), str) for k in JSON_LIST_FIELDS):
            m = dict(m)
            for key in JSON_LIST_FIELDS:
                if isinstance(m.get(key), str):
                    value = _json_list(m[key], f"{field}[{i}].{key}")
                    if value is None:
                        del m[key]
                    else:
                        m[key] = value
        out.append(m)
    return out


def normalize_record(record: dict, stage: str) -> dict:
    """A validated record in the form the transforms read (see :func:`normalize_conversation`)."""
    fields = {"dpo": ("chosen", "rejected")}.get(canonical_stage(stage), ("conversations",))
    if not any(isinstance(record.get(f), list) for f in fields):
        return record
    return {**record, **{f: normalize_conversation(record[f], f) for f in fields}}


def validate_record(record: Any, stage: str) -> None:
    """Raise DataError (without location) unless ``record`` is a valid example for ``stage``."""
    stage = canonical_stage(stage)
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {_type_name(record)}")
    if stage == "pretrain":
        if "text" not in record:
            raise DataError("missing the field 'text'")
        if not isinstance(record["text"], str):
            raise DataError(f"field 'text' must be a string, got {_type_name(record['text'])}")
    elif stage in ("sft", "rlaif", "agent"):
        if "conversations" not in record:
            raise DataError("missing the field 'conversations'")
        validate_conversation(record["conversations"], "conversations")
        if stage != "sft":
            _validate_prompt(record, stage)
    else:
        for field in ("chosen", "rejected"):
            if field not in record:
                raise DataError(f"missing the field {field!r}")
            validate_conversation(record[field], field)


def _validate_prompt(record: dict, stage: str) -> None:
    """RL records: the last message is the assistant slot the policy generates (MiniMind keeps
    ``conversations[:-1]`` as the prompt), after at least one message; agent records carry ``gt``, the list of
    values the final answer must contain (a string or number is taken as a list of one)."""
    conversations = record["conversations"]
    if conversations[-1]["role"] != "assistant":
        raise DataError(f"conversations[-1] must be the assistant message to generate (the prompt is everything "
                        f"before it), got role {conversations[-1]['role']!r}")
    if len(conversations) < 2:
        raise DataError("conversations has no prompt before the assistant message to generate")
    if stage == "agent" and "gt" not in record:
        raise DataError("missing the field 'gt' (the values the final answer must contain)")
    gt = record.get("gt")
    if gt is None and stage == "rlaif":
        return
    for i, value in enumerate(gt if isinstance(gt, list) else [gt]):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            where = f"gt[{i}]" if isinstance(gt, list) else "gt"
            raise DataError(f"field {where!r} must be a string or a number, got {_type_name(value)}")


class JsonlSource:
    """Validated records of one or more jsonl files, in file order, by random access (see module docstring)."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], stage: str, *,
                 skip_bad_lines: bool = False):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise ValueError("no data files given")
        self.stage = canonical_stage(stage)
        self.skip_bad_lines = skip_bad_lines
        self.stats = ReadStats(files=len(self.paths))
        file_ids, offsets, line_numbers = [], [], []
        for file_id, path in enumerate(self.paths):
            if os.path.isdir(path):
                raise DataError(f"{path}: is a directory, not a jsonl file (give the files in it, or a "
                                "directory made by scripts/prepare_data.py)")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"data file not found: {path}")
            with open(path, "rb") as f:
                offset = 0
                for line_no, raw in enumerate(f, start=1):
                    start, offset = offset, offset + len(raw)
                    if start == 0 and raw.startswith(_BOM):  # a UTF-8 byte-order mark (Windows editors)
                        start, raw = len(_BOM), raw[len(_BOM):]
                    self.stats.lines += 1
                    if not raw.strip():
                        self.stats.blank_lines += 1
                        continue
                    try:
                        validate_record(_parse(raw), self.stage)
                    except DataError as e:
                        self._bad(f"{path}:{line_no}: {e}")
                        continue
                    file_ids.append(file_id)
                    offsets.append(start)
                    line_numbers.append(line_no)
        self._file_ids = np.asarray(file_ids, np.int32)
        self._offsets = np.asarray(offsets, np.int64)
        self._line_numbers = np.asarray(line_numbers, np.int64)
        self.stats.records = len(offsets)
        self._handles: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _bad(self, message: str) -> None:
        if not self.skip_bad_lines:
            raise DataError(message + " (pass skip_bad_lines=True to skip and count such lines)")
        self.stats.bad_lines += 1
        if len(self.stats.bad) < MAX_REPORTED_BAD_LINES:
            self.stats.bad.append(message)

    def __len__(self) -> int:
        return len(self._offsets)

    def location(self, index: int) -> str:
        """``file:line`` of record ``index``."""
        return f"{self.paths[self._file_ids[index]]}:{self._line_numbers[index]}"

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        index %= len(self)
        file_id = int(self._file_ids[index])
        with self._lock:
            handle = self._handles.get(file_id)
            if handle is None:
                handle = self._handles[file_id] = open(self.paths[file_id], "rb")
            handle.seek(int(self._offsets[index]))
            raw = handle.readline()
        try:
            return normalize_record(_parse(raw), self.stage)
        except DataError as e:  # the file changed after the scan
            raise DataError(f"{self.location(index)}: {e} (was the file modified while in use?)") from e

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        for handle in getattr(self, "_handles", {}).values():
            try:
                handle.close()
            except Exception:  # pragma: no cover
                pass

    def __repr__(self) -> str:
        return f"JsonlSource({self.paths!r}, stage={self.stage!r}, records={len(self)})"


def _parse(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e})") from e
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON ({e})") from e
    except RecursionError:
        raise DataError("JSON nested too deeply to read") from None
    if "\\u" in text:  # an escaped lone surrogate ("\ud800") parses but cannot be encoded or tokenised
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"a string holds a lone UTF-16 surrogate, not text ({e.reason})") from None
    return value

