"""Reading MiniMind's jsonl files: a random-access source that opens in seconds and validates lazily.

:class:`JsonlSource` finds where each non-blank line of its files starts by a newline scan, without parsing
JSON (``jsonl_index.py``; the index is cached by path, size and mtime, so a second open costs milliseconds);
``source[i]`` then reads line ``i`` with one positional read, parses and validates it for the stage (so multi-GB
files are not held in memory). It implements grain's ``RandomAccessDataSource`` protocol (``__len__`` /
``__getitem__``) and can be pickled (open file descriptors are dropped and re-opened).

A bad line (malformed JSON, not UTF-8, not an object, a missing field, a field of the wrong type, an unknown
role, an empty conversation) raises :class:`DataError` naming ``file:line`` when it is read. ``validate="full"``
checks every line at open instead (:func:`check_index`, in parallel processes for large files; also
``scripts/prepare_data.py --check FILE``), and with ``skip_bad_lines=True`` (which implies the full check) bad
lines are skipped, counted in :class:`ReadStats` and summarised in a logged warning (nothing is dropped
silently). Blank lines are ignored (and counted as ``blank_lines``). A file with no record (empty, only blank
lines, or with ``skip_bad_lines`` only bad lines) is a :class:`DataError` naming it.

A line longer than :data:`MAX_LINE_BYTES` (8 MiB; ``max_line_bytes`` sets another limit) is a bad line, refused
before it is read: the tokeniser costs about 2 s and 150 MB of memory per MB of text (an 8 MB line: 18 s and 1.5 GB
peak RSS on a 2-core CPU; a 50 MB one: minutes and 11 GB), for a record then cut to ``max_seq_len`` tokens.

MiniMind-3's files write a message's ``tools`` and ``tool_calls`` as JSON *strings*; they are accepted as
lists or such strings (parsed when the record is read: :func:`normalize_record`), and a string that is not
valid JSON is a bad line naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from minimind_jax.data.jsonl_index import CHUNK_BYTES, LineIndex, line_index, start_method

__all__ = [
    "DataError", "ReadStats", "JsonlSource", "STAGES", "ROLES", "canonical_stage", "validate_record",
    "validate_conversation", "normalize_conversation", "normalize_record", "JSON_LIST_FIELDS", "check_line",
    "check_index", "check_file", "CheckReport", "MAX_LINE_BYTES",
]

STAGES = ("pretrain", "sft", "dpo", "rlaif", "agent")
# other MiniMind data kinds that share the SFT format
_STAGE_ALIASES = {"reason": "sft", "reasoning": "sft", "lora": "sft", "lora_identity": "sft", "distill": "sft",
                  "grpo": "rlaif", "ppo": "rlaif", "agent_rl": "agent"}  # RL prompts: see rl_prompts.py
ROLES = ("system", "user", "assistant", "tool")
# message fields that hold lists, which MiniMind-3's files write as JSON strings
JSON_LIST_FIELDS = ("tools", "functions", "tool_calls")
MAX_REPORTED_BAD_LINES = 100
SUMMARY_BAD_LINES = 5  # bad lines named in the one-line summary of what was skipped
MAX_LINE_BYTES = 8 << 20  # longer lines are bad lines (see the module docstring)
_log = logging.getLogger(__name__)


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
    ``max_seq_len`` by the transforms that ran in this process (see ``pipeline.py``); ``untrained`` those of them
    left with no trained token (chat data whose replies all lie past ``max_seq_len``).
    """

    files: int = 0
    lines: int = 0
    records: int = 0
    blank_lines: int = 0
    bad_lines: int = 0
    bad: list[str] = dataclasses.field(default_factory=list)
    truncated: int = 0
    transformed: int = 0
    untrained: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def skipped_summary(self) -> str:
        """One line: how many bad lines were skipped, and the first few ``file:line: reason``."""
        first = "; ".join(self.bad[:SUMMARY_BAD_LINES])
        more = f" (and {self.bad_lines - SUMMARY_BAD_LINES} more)" if self.bad_lines > SUMMARY_BAD_LINES else ""
        return f"skipped {self.bad_lines} bad line(s) of {self.lines}: {first}{more}"

    def count_sample(self, truncated: bool, untrained: bool = False) -> None:
        with self._lock:
            self.transformed += 1
            self.truncated += int(bool(truncated))
            self.untrained += int(bool(untrained))

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
    """Records of one or more jsonl files, in file order, by random access (see module docstring).

    ``validate``: "lazy" (the default) validates each record when it is read; "full" checks every line at open
    (in ``workers`` processes for large files) and raises on the first bad one. ``skip_bad_lines=True`` implies
    a full check (the bad lines are left out of the numbering), logs how many lines were skipped and the first
    few ``file:line: reason``, and keeps them in :class:`ReadStats`. ``cache_dir``: where line indexes are cached
    (see ``jsonl_index.py``)."""

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], stage: str, *,
                 skip_bad_lines: bool = False, validate: str = "lazy", cache_dir: str | None = None,
                 workers: int | None = None, max_line_bytes: int = MAX_LINE_BYTES):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise ValueError("no data files given")
        if validate not in ("lazy", "full"):
            raise ValueError(f"validate must be 'lazy' or 'full', got {validate!r}")
        self.stage = canonical_stage(stage)
        self.skip_bad_lines = skip_bad_lines
        self.validated = validate == "full" or skip_bad_lines
        self.max_line_bytes = max_line_bytes
        self.stats = ReadStats(files=len(self.paths))
        self._indexes = []
        for path in self.paths:
            _check_is_file(path)
            index = line_index(path, cache_dir)
            _check_has_records(path, index)
            self.stats.lines += index.total_lines
            self.stats.blank_lines += index.blank_lines
            if self.validated:
                bad_before = self.stats.bad_lines
                index = self._drop_bad(path, index, workers)
                if not len(index):
                    first = self.stats.bad[bad_before] if len(self.stats.bad) > bad_before else "?"
                    raise DataError(f"{path}: no records: all {self.stats.bad_lines - bad_before} non-blank lines "
                                    f"are bad (first: {first})")
            self._indexes.append(index)
        self._ends = np.cumsum([len(ix) for ix in self._indexes], dtype=np.int64)
        self.stats.records = int(self._ends[-1])
        if self.stats.bad_lines:
            _log.warning("%s", self.stats.skipped_summary())
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def _drop_bad(self, path: str, index: LineIndex, workers: int | None) -> LineIndex:
        bad = check_index(path, index, self.stage, workers=workers, max_errors=None if self.skip_bad_lines else 1,
                          max_line_bytes=self.max_line_bytes)
        if not bad:
            return index
        for pos, reason in bad:
            self._bad(f"{path}:{index.line_number(pos)}: {reason}")
        keep = np.ones(len(index), bool)
        keep[[pos for pos, _ in bad]] = False
        return index.subset(keep)

    def _bad(self, message: str) -> None:
        if not self.skip_bad_lines:
            raise DataError(message + " (pass skip_bad_lines=True to skip and count such lines)")
        self.stats.bad_lines += 1
        if len(self.stats.bad) < MAX_REPORTED_BAD_LINES:
            self.stats.bad.append(message)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        index %= len(self)
        if len(self._ends) == 1:
            return 0, index
        file_id = int(np.searchsorted(self._ends, index, side="right"))
        return file_id, index - (int(self._ends[file_id - 1]) if file_id else 0)

    def location(self, index: int) -> str:
        """``file:line`` of record ``index``."""
        file_id, pos = self._locate(index)
        return f"{self.paths[file_id]}:{self._indexes[file_id].line_number(pos)}"

    def raw(self, index: int, max_bytes: int | None = None) -> bytes:
        """The bytes of record ``index`` (its line, and any blank lines after it); a DataError (without location)
        instead when they are more than ``max_bytes``."""
        file_id, pos = self._locate(index)
        ix = self._indexes[file_id]
        start, end = int(ix.offsets[pos]), ix.end(pos)
        if max_bytes is not None:
            _check_length(end - start, max_bytes)
        fd = self._fds.get(file_id)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file_id)
                if fd is None:
                    fd = self._fds[file_id] = os.open(self.paths[file_id], os.O_RDONLY)
        return os.pread(fd, end - start, start)  # positional: no shared file position, no lock

    def __getitem__(self, index: int) -> dict:
        try:
            record = _parse(self.raw(index, self.max_line_bytes))
            if not self.validated:
                validate_record(record, self.stage)
            return normalize_record(record, self.stage)
        except DataError as e:
            hint = ("was the file modified while in use?" if self.validated else "check a whole file with "
                    "scripts/prepare_data.py --check FILE; skip_bad_lines=True skips and counts such lines")
            raise DataError(f"{self.location(index)}: {e} ({hint})") from None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"] = {}
        state["_indexes"] = [  # memory maps pickle as their contents
            dataclasses.replace(ix, **{k: None if getattr(ix, k) is None else np.asarray(getattr(ix, k))
                                       for k in ("offsets", "lines", "ends")}) for ix in self._indexes]
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self, _close=os.close):  # bound early: at interpreter exit the module's globals may be gone
        for fd in getattr(self, "_fds", {}).values():
            try:
                _close(fd)
            except OSError:  # pragma: no cover
                pass

    def __repr__(self) -> str:
        return f"JsonlSource({self.paths!r}, stage={self.stage!r}, records={len(self)})"


def _check_is_file(path: str) -> None:
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a jsonl file (give the files in it, or a "
                        "directory made by scripts/prepare_data.py)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")


def _check_has_records(path: str, index: LineIndex) -> None:
    if not len(index):
        what = f"only {index.blank_lines} blank line(s)" if index.blank_lines else "an empty file"
        raise DataError(f"{path}: no records ({what})")


def _check_length(nbytes: int, max_line_bytes: int) -> None:
    if nbytes > max_line_bytes:
        raise DataError(f"a line of {nbytes:,} bytes, over the limit of {max_line_bytes:,} (max_line_bytes)")


def check_line(raw: bytes, stage: str) -> None:
    """Raise DataError (without location) unless the non-blank line ``raw`` is a valid record for ``stage``."""
    record = _parse(raw)
    validate_record(record, stage)
    normalize_record(record, stage)


@dataclasses.dataclass
class CheckReport:
    """What :func:`check_file` found: line counts and every bad line as (line number, reason)."""

    path: str
    lines: int
    records: int
    blank_lines: int
    bad: list[tuple[int, str]]
    seconds: float


def check_file(path: str | os.PathLike, stage: str, *, workers: int | None = None,
               cache_dir: str | None = None, max_line_bytes: int = MAX_LINE_BYTES) -> CheckReport:
    """Validate every line of ``path`` for ``stage`` (in parallel: :func:`check_index`); see ``CheckReport``."""
    path = os.fspath(path)
    t0 = time.perf_counter()
    _check_is_file(path)
    index = line_index(path, cache_dir)
    bad = [(index.line_number(pos), reason) for pos, reason in check_index(path, index, stage, workers=workers,
                                                                            max_line_bytes=max_line_bytes)]
    return CheckReport(path, index.total_lines, len(index) - len(bad), index.blank_lines, bad,
                       time.perf_counter() - t0)


def _check_range(task) -> list[tuple[int, str]]:
    """(path, start byte, end byte, first record position, stage) -> [(record position, reason)] of the bad
    non-blank lines in that byte range."""
    path, start, end, first, stage = task
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    bad, pos = [], first
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            check_line(raw, stage)
        except DataError as e:
            bad.append((pos, str(e)))
        pos += 1
    return bad


def check_index(path: str, index: LineIndex, stage: str, *, workers: int | None = None,
                max_errors: int | None = None, chunk_bytes: int = CHUNK_BYTES,
                max_line_bytes: int = MAX_LINE_BYTES) -> list[tuple[int, str]]:
    """Validate every record of ``path`` (indexed by ``index``): [(record position, reason)] of the bad ones,
    in order (at most ``max_errors`` when given). Byte ranges of about ``chunk_bytes`` are checked in
    ``workers`` processes (default: the CPU count) when there is more than one range, else in this process.
    Lines longer than ``max_line_bytes`` are bad without being read (so memory stays bounded)."""
    stage = canonical_stage(stage)
    n = len(index)
    if not n:
        return []
    offsets = np.asarray(index.offsets)
    ends = np.append(offsets[1:], np.uint64(index.size)) if index.ends is None else np.asarray(index.ends)
    long = np.flatnonzero(ends - offsets > max_line_bytes)
    too_long = []
    for pos in long.tolist():
        try:
            _check_length(int(ends[pos] - offsets[pos]), max_line_bytes)
        except DataError as e:
            too_long.append((pos, str(e)))
    bounds = np.searchsorted(offsets, np.arange(0, index.size, chunk_bytes, dtype=np.uint64))
    bounds = sorted(set(bounds.tolist()) | {0, n} | set(long.tolist()) | set((long + 1).tolist()))
    skip = set(long.tolist())
    tasks = [(path, int(offsets[a]), index.end(b - 1), a, stage) for a, b in zip(bounds, bounds[1:])
             if not (b == a + 1 and a in skip)]
    bad = _check_tasks(tasks, workers, max_errors)
    bad = sorted(bad + too_long)
    return bad if max_errors is None else bad[:max_errors]


def _check_tasks(tasks: list, workers: int | None, max_errors: int | None) -> list[tuple[int, str]]:
    """The bad lines of the ``_check_range`` tasks, in order (stopping once ``max_errors`` are found)."""
    if not tasks:
        return []
    workers = (os.cpu_count() or 1) if workers is None else workers
    bad: list[tuple[int, str]] = []
    if workers <= 1 or len(tasks) == 1:
        results = map(_check_range, tasks)
        pool = None
    else:
        pool = multiprocessing.get_context(start_method()).Pool(min(workers, len(tasks)))
        results = pool.imap(_check_range, tasks)
    try:
        for found in results:
            bad.extend(found)
            if max_errors is not None and len(bad) >= max_errors:
                return bad[:max_errors]
    finally:
        if pool is not None:
            pool.terminate()
    return bad


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

