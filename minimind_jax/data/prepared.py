"""Pre-tokenised pretrain data: prepare once (:func:`prepare`), then read with :class:`PreparedSource`.

The chat stages (sft / dpo / rlaif / agent) use the same preparation engine and files with a per-stage record
encoder, several token segments per record and two more files (see :mod:`minimind_jax.data.prepared_chat`).

On-disk format (a directory)::

    tokens.bin    every document's token ids, concatenated, raw (no bos / eos); a flat little-endian array
                  of ``meta["dtype"]``: uint16 when the vocabulary fits (<= 65536 ids), else uint32
    offsets.npy   int64, len = documents + 1: document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``
    meta.json     format version, dtype, tokenizer (path, sha256 of its serialization, vocab size, bos / eos /
                  pad ids), source files (path, size, mtime, lines, documents, bad / blank lines), totals
                  (documents, tokens, bad_lines, blank_lines, the first bad lines as ``file:line: reason``),
                  and an optional default packing (``pack_max_seq_len``)

``meta.json`` is written last: a directory holding it is complete. While preparing, ``progress.json`` (written
atomically after each chunk) records how far the inputs were committed (file, byte offset, line number,
documents, tokens) and ``offsets.part`` the committed documents' lengths; a rerun after a kill truncates
``tokens.bin`` / ``offsets.part`` to the committed sizes and goes on from there, so the result equals an
uninterrupted run (the chunking does not affect the output).

A data file with no record (empty or blank lines only) is refused before anything is written, and so is a
preparation that skipped every line. A line longer than ``max_line_bytes`` (default
:data:`~minimind_jax.data.jsonl.MAX_LINE_BYTES`) is a bad line.

Opening (:class:`PreparedSource`) checks the directory before any batch is read, each failure a one-line
:class:`DataError` naming the file and key: ``meta.json`` must be a JSON object with the keys this code reads
(types included), ``offsets.npy`` a non-decreasing int64 array of ``documents + 1`` entries from 0, ``tokens.bin``
exactly ``offsets[-1]`` tokens long (a truncated file is named, with both sizes), at least one document; with the
tokenizer (:meth:`PreparedSource.check_tokenizer`, run when the pipeline is built) the tokenizer must be the one
the data was prepared with and every stored id must lie inside its vocabulary (a scan in 16M-token slices).

Reading:

* unpacked (default): record ``i`` is document ``i``; :func:`encode_prepared_pretrain` turns it into exactly
  what :func:`~minimind_jax.data.samples.encode_pretrain` gives for the original text (bos +
  ids[:max_seq_len-2] + eos, padded with pad, labels -100 on pad).
* packed (``pack=True``): the token stream ``bos doc_0 eos bos doc_1 eos ... bos doc_n eos`` (every document
  framed as in an unpacked row; the bos / eos are added when read, not stored) is cut into rows of exactly
  ``max_seq_len`` tokens, no padding (:func:`~minimind_jax.data.packing.pretrain_row`). labels = input_ids
  except -100 at every bos, so the trained targets are exactly the unpacked rows' (each document's tokens and
  its eos; no eos learns to predict the next bos). Each row also carries ``segment_ids`` (1.. per document
  in the row) and ``positions`` (restarting at 0 per document): with them (the training config's
  ``document_mask``) a token attends only within its document, with RoPE positions from 0 as when the
  document is alone; without them attention is causal over the whole row. The final partial row (fewer
  than ``max_seq_len`` tokens) is DROPPED.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers
from tqdm import tqdm

from minimind_jax.data.jsonl import (
    MAX_LINE_BYTES,
    MAX_REPORTED_BAD_LINES,
    DataError,
    ReadStats,
    _check_is_file,
    _check_length,
    _parse,
    normalize_record,
    validate_record,
)
from minimind_jax.data.jsonl_index import start_method as _start_method
from minimind_jax.data.packing import pretrain_row, stream_ends
from minimind_jax.data.samples import IGNORE_INDEX, Encoded

__all__ = [
    "FORMAT_VERSION", "PreparedSource", "prepare", "is_prepared_dir", "encode_prepared_pretrain",
    "tokenizer_fingerprint",
]

FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.npy"
META_FILE = "meta.json"
STATE_FILE = "progress.json"
_BOM = b"\xef\xbb\xbf"
PART_FILE = "offsets.part"
RECORDS_PART_FILE = "records.part"  # chat stages, while preparing: int64 (flags, extra bytes) per record
FLAGS_FILE = "flags.npy"  # chat stages: uint8 per record (see prepared_chat)
EXTRA_FILE = "extra.bin"  # RL stages: each record's prompt messages / tools / gt as UTF-8 JSON, concatenated
EXTRA_OFFSETS_FILE = "extra_offsets.npy"


def is_prepared_dir(path: Any) -> bool:
    """Whether ``path`` is a directory holding a (complete) prepared dataset."""
    try:
        return os.path.isdir(path) and os.path.isfile(os.path.join(path, META_FILE))
    except TypeError:
        return False


def _backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a project :class:`~minimind_jax.tokenizer.Tokenizer` (or itself)."""
    return getattr(tokenizer, "_tok", tokenizer)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's serialization (``tokenizers.Tokenizer.to_str()``)."""
    return hashlib.sha256(_backend(tokenizer).to_str().encode("utf-8")).hexdigest()


def _atomic_write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# Preparation


_WORKER_TOKENIZER = None
_WORKER_ENCODER = None


def _worker_init(serialized: str, record_encoder=None) -> None:
    global _WORKER_TOKENIZER, _WORKER_ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER_TOKENIZER = tokenizers.Tokenizer.from_str(serialized)
    _WORKER_ENCODER = record_encoder


def _pretrain_texts(record: dict) -> tuple[list[str], int, bytes]:
    """The pretrain record encoder: one segment (the text), no flags, no extra."""
    return [record["text"]], 0, b""


def _encode_chunk(task, tokenizer=None, record_encoder=None):
    """(path, first line number, raw lines, ...) -> (token array, segment lengths, bad [(line, reason)], blank
    count, per-record (flags uint8 array, extra bytes list)). ``record_encoder(record)`` (None: pretrain) gives a
    validated, normalised record's segment texts, flags and extra bytes (see prepared_chat)."""
    path, first_line, lines, dtype, max_line_bytes, stage = task
    tok = tokenizer if tokenizer is not None else _WORKER_TOKENIZER
    encoder = record_encoder if tokenizer is not None else _WORKER_ENCODER
    texts, flags, extras, bad, blank = [], [], [], [], 0
    for k, raw in enumerate(lines):
        if not raw.strip():
            blank += 1
            continue
        try:
            _check_length(len(raw), max_line_bytes)
            record = _parse(raw)
            validate_record(record, stage)
            segments, flag, extra = (encoder or _pretrain_texts)(normalize_record(record, stage))
        except DataError as e:
            bad.append((first_line + k, str(e)))
            continue
        texts.extend(segments)
        flags.append(flag)
        extras.append(extra)
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False) if texts else []
    lengths = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
    tokens = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype, int(lengths.sum()))
    return tokens, lengths, bad, blank, (np.asarray(flags, np.uint8), extras)


def _wait(pending, processes):
    """The result of ``pending``; an error (instead of waiting forever) when a worker process died, e.g. killed
    for memory (multiprocessing.Pool replaces it but the task is lost)."""
    while True:
        try:
            return pending.get(timeout=1.0)
        except multiprocessing.TimeoutError:
            dead = [p for p in processes if p.exitcode is not None]
            if dead:
                raise RuntimeError(f"a preparation worker process died (exit code {dead[0].exitcode}; out of "
                                   "memory?); rerun to resume from the last committed chunk") from None


def _source_info(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime}


def _read_chunks(paths, start_file, start_offset, start_line, chunk_lines, dtype, max_line_bytes, stage):
    """Yield (file index, byte offset after the chunk, next line number, task) from the committed position on."""
    for file_index in range(start_file, len(paths)):
        path = paths[file_index]
        offset = start_offset if file_index == start_file else 0
        line_no = start_line if file_index == start_file else 1
        with open(path, "rb") as f:
            if offset == 0 and f.read(len(_BOM)) == _BOM:  # a UTF-8 byte-order mark: stepped over, as jsonl.py does
                offset = len(_BOM)
            f.seek(offset)
            while True:
                lines = []
                for raw in f:
                    lines.append(raw)
                    offset += len(raw)
                    if len(lines) >= chunk_lines:
                        break
                if not lines:
                    break
                yield file_index, offset, line_no + len(lines), (path, line_no, lines, dtype, max_line_bytes, stage)
                line_no += len(lines)
        yield file_index + 1, 0, 1, None  # file done: move the committed position to the next file


def prepare(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer,
    *,
    tokenizer_path: str | None = None,
    stage: str = "pretrain",
    workers: int = 2,
    chunk_lines: int = 4096,
    skip_bad_lines: bool = False,
    pack_max_seq_len: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_chunks: int | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    record_encoder=None,
    segments_per_record: int = 1,
    extra_meta: dict | None = None,
) -> dict | None:
    """Tokenise pretrain jsonl ``paths`` into ``out_dir`` (see module docstring); returns the meta dict.

    The chat stages pass ``record_encoder`` (a picklable ``fn(record) -> (segment texts, flags, extra bytes)``
    giving ``segments_per_record`` texts per record) and ``extra_meta`` (stored as meta.json's ``chat``); use
    :func:`minimind_jax.data.prepared_chat.prepare_chat` rather than calling this directly.

    ``workers`` > 0: a pool of that many processes (see ``_start_method``), each parsing, validating and encoding
    whole chunks of ``chunk_lines`` lines (faster on 2 cores than the tokenizers library's own threads, see
    ``scripts/prepare_data.py --bench``); 0: in this process with ``encode_batch`` (Rust threads).
    Resumable: rerunning with the same inputs and tokenizer continues after the last committed chunk.
    ``max_chunks`` (testing) stops after committing that many chunks this call and returns None.
    A bad line raises :class:`DataError` with ``file:line`` (chunks before it stay committed), or with
    ``skip_bad_lines`` is skipped and counted.
    """
    if (stage == "pretrain") != (record_encoder is None):
        raise ValueError(f"{stage} data needs its record encoder (prepared_chat.prepare_chat); pretrain none")
    paths = _checked_inputs(paths, chunk_lines)
    out_dir = os.fspath(out_dir)
    if overwrite and is_prepared_dir(out_dir):  # the complete directory stays until its replacement is complete
        kwargs = dict(tokenizer_path=tokenizer_path, stage=stage, workers=workers, chunk_lines=chunk_lines,
                      skip_bad_lines=skip_bad_lines, pack_max_seq_len=pack_max_seq_len, progress=progress,
                      max_chunks=max_chunks, max_line_bytes=max_line_bytes, record_encoder=record_encoder,
                      segments_per_record=segments_per_record, extra_meta=extra_meta)
        return _prepare_replacement(paths, out_dir, tokenizer, kwargs)
    os.makedirs(out_dir, exist_ok=True)
    job = _Job.create(paths, out_dir, tokenizer, stage, skip_bad_lines, record_encoder, segments_per_record)
    meta = _already_prepared(job, pack_max_seq_len, overwrite)
    if meta is not None:
        return meta
    state = _start_or_resume(job, overwrite)
    t_start = time.perf_counter()
    if not _encode_all(job, state, workers, chunk_lines, max_line_bytes, max_chunks, progress):
        return None
    return _finalise(job, state, tokenizer, tokenizer_path, pack_max_seq_len, extra_meta, t_start)


def _checked_inputs(paths, chunk_lines: int) -> list[str]:
    """The data files as absolute paths, each an existing file holding a record (DataError naming it)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    if not paths:
        raise ValueError("no data files given")
    for p in paths:
        _check_is_file(p)  # a directory is named as one
        _check_has_content(p)
    if chunk_lines < 1:
        raise ValueError(f"chunk_lines must be positive, got {chunk_lines}")
    return paths


def _prepare_replacement(paths: list[str], out_dir: str, tokenizer, kwargs: dict) -> dict | None:
    """``prepare(..., overwrite=True)`` of a complete directory: prepared beside it (``<out_dir>.overwrite``,
    resumable) and moved in only when complete."""
    staging = os.path.normpath(out_dir) + ".overwrite"
    try:  # resumes an interrupted replacement of the same inputs
        meta = prepare(paths, staging, tokenizer, **kwargs)
    except FileExistsError:  # an unfinished replacement from other inputs: start it over
        meta = prepare(paths, staging, tokenizer, overwrite=True, **kwargs)
    if meta is not None:
        _move_into(staging, out_dir)
    return meta


@dataclasses.dataclass
class _Job:
    """What one preparation writes and from what: its inputs, output files, token dtype and record encoder."""

    paths: list[str]
    out_dir: str
    stage: str
    backend: Any  # the tokenizers.Tokenizer
    vocab: int
    dtype: np.dtype
    sources: list[dict]
    fingerprint: str
    skip_bad_lines: bool
    record_encoder: Any
    segments_per_record: int

    @classmethod
    def create(cls, paths, out_dir, tokenizer, stage, skip_bad_lines, record_encoder, segments_per_record):
        backend = _backend(tokenizer)
        vocab = backend.get_vocab_size(with_added_tokens=True)
        return cls(paths, out_dir, stage, backend, vocab, np.dtype(np.uint16 if vocab <= 2**16 else np.uint32),
                   [_source_info(p) for p in paths], tokenizer_fingerprint(tokenizer), skip_bad_lines,
                   record_encoder, segments_per_record)

    @property
    def chat(self) -> bool:
        return self.record_encoder is not None

    @property
    def identity(self) -> dict:
        return {"format_version": FORMAT_VERSION, "sources": self.sources, "tokenizer_sha256": self.fingerprint,
                "dtype": self.dtype.name, "stage": self.stage}

    def file(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    def committed_sizes(self, state: dict) -> list[tuple[str, int]]:
        """(file being written, its size at the last commit)."""
        sizes = [(self.file(TOKENS_FILE), state["tokens"] * self.dtype.itemsize),
                 (self.file(PART_FILE), state["documents"] * self.segments_per_record * 8)]
        if self.chat:
            sizes += [(self.file(RECORDS_PART_FILE), state["documents"] * 16),
                      (self.file(EXTRA_FILE), state["extra_bytes"])]
        return sizes


def _already_prepared(job: _Job, pack_max_seq_len: int | None, overwrite: bool) -> dict | None:
    """The meta of a complete directory prepared from the same inputs (its recorded default packing updated),
    None when there is none to keep; FileExistsError when it holds other inputs and not ``overwrite``."""
    meta_path = job.file(META_FILE)
    meta = _load_json_or_none(meta_path, overwrite)
    if meta is None:
        return None
    same = (meta.get("sources_identity") == job.sources and meta.get("tokenizer", {}).get("sha256") == job.fingerprint
            and meta.get("skip_bad_lines") == job.skip_bad_lines and meta.get("stage") == job.stage)
    if same and not overwrite:  # already done (only the recorded default packing may change)
        if meta.get("pack_max_seq_len") != pack_max_seq_len:
            meta["pack_max_seq_len"] = pack_max_seq_len
            _atomic_write_json(meta_path, meta)
        return meta
    if not overwrite:
        raise FileExistsError(f"{job.out_dir} already holds prepared data from other inputs / tokenizer "
                              "(pass overwrite=True / --overwrite)")
    return None


def _start_or_resume(job: _Job, overwrite: bool) -> dict:
    """The committed progress: a fresh start (old files removed), or an unfinished run of the same inputs with
    whatever a killed run wrote after its last commit dropped; FileExistsError when it was of other inputs."""
    state_path = job.file(STATE_FILE)
    state = None if overwrite else _load_json_or_none(state_path, overwrite)
    if state is not None:
        if state.get("identity") != job.identity or state.get("skip_bad_lines") != job.skip_bad_lines:
            raise FileExistsError(f"{job.out_dir} holds an unfinished preparation of other inputs / tokenizer / "
                                  "settings (pass overwrite=True / --overwrite to start over)")
    if state is None:
        for name in (META_FILE, OFFSETS_FILE, STATE_FILE, TOKENS_FILE, PART_FILE, RECORDS_PART_FILE, FLAGS_FILE,
                     EXTRA_FILE, EXTRA_OFFSETS_FILE):
            if os.path.exists(job.file(name)):
                os.remove(job.file(name))
        state = {"identity": job.identity, "skip_bad_lines": job.skip_bad_lines, "file_index": 0, "byte_offset": 0,
                 "line_no": 1, "documents": 0, "tokens": 0, "bad_lines": 0, "blank_lines": 0, "bad": [],
                 "extra_bytes": 0,
                 "per_file": [{"lines": 0, "documents": 0, "bad_lines": 0, "blank_lines": 0} for _ in job.paths]}
        for path, _ in job.committed_sizes(state):
            open(path, "wb").close()
        _atomic_write_json(state_path, state)
    for path, size in job.committed_sizes(state):
        with open(path, "r+b") as f:
            f.truncate(size)
    return state


class _Writer:
    """Appends each encoded chunk to the output files, in input order, and commits it: ``progress.json`` records
    the position after it, so a killed run resumes from there."""

    def __init__(self, job: _Job, state: dict, files: list, bar):
        self.job, self.state, self.bar = job, state, bar
        self.ftok, self.fpart, self.frec, self.fextra = files
        self.committed_chunks = 0
        self.t_start, self.tokens_start = time.perf_counter(), state["tokens"]

    def commit(self, file_index: int, offset: int, next_line: int, result) -> None:
        """Write ``result`` (None: a file ended) and move the committed position to ``file_index``, ``offset``,
        ``next_line``; DataError at a bad line unless skipping them."""
        state = self.state
        if result is not None:
            self._write(result)
            self._count(result, next_line)
            self.committed_chunks += 1
        state["file_index"], state["byte_offset"], state["line_no"] = file_index, offset, next_line
        _atomic_write_json(self.job.file(STATE_FILE), state)
        if self.bar is not None:
            self._show_progress()

    def _write(self, result) -> None:
        tokens, lengths, bad, _, (flags, extras) = result
        state = self.state
        if bad:
            messages = [f"{self.job.paths[state['file_index']]}:{line}: {reason}" for line, reason in bad]
            if not self.job.skip_bad_lines:
                raise DataError(messages[0] + " (pass --skip-bad-lines / skip_bad_lines=True to skip and count "
                                "such lines)")
            room = MAX_REPORTED_BAD_LINES - len(state["bad"])
            state["bad"].extend(messages[: max(room, 0)])
        self.ftok.write(tokens.tobytes())
        self.fpart.write(lengths.astype("<i8").tobytes())
        if self.job.chat:
            info = np.stack([flags.astype(np.int64), [len(e) for e in extras]], 1) if extras else []
            self.frec.write(np.asarray(info, "<i8").tobytes())
            self.fextra.write(b"".join(extras))
            state["extra_bytes"] += sum(len(e) for e in extras)
        for f in (self.ftok, self.fpart, self.frec, self.fextra):
            f.flush()

    def _count(self, result, next_line: int) -> None:
        tokens, _, bad, blank, (flags, _) = result
        state = self.state
        for counts in (state["per_file"][state["file_index"]], state):
            counts["documents"] += len(flags)
            counts["bad_lines"] += len(bad)
            counts["blank_lines"] += blank
        state["per_file"][state["file_index"]]["lines"] += next_line - state["line_no"]
        state["tokens"] += len(tokens)

    def _show_progress(self) -> None:
        state, bar = self.state, self.bar
        done = sum(s["size"] for s in self.job.sources[: state["file_index"]]) + state["byte_offset"]
        bar.update(done - bar.n)
        rate = (state["tokens"] - self.tokens_start) / max(time.perf_counter() - self.t_start, 1e-9)
        bar.set_postfix_str(f"{rate:,.0f} tok/s, {state['tokens']:,} tokens", refresh=False)


def _progress_bar(job: _Job, state: dict):
    total_bytes = sum(s["size"] for s in job.sources)
    done_bytes = sum(s["size"] for s in job.sources[: state["file_index"]]) + state["byte_offset"]
    return tqdm(total=total_bytes, initial=done_bytes, unit="B", unit_scale=True, desc="prepare", dynamic_ncols=True)


def _encode_all(job: _Job, state: dict, workers: int, chunk_lines: int, max_line_bytes: int,
                max_chunks: int | None, progress: bool) -> bool:
    """Encode the inputs from the committed position on, in chunks (by ``workers`` processes, or here when 0),
    committing each in order; whether the inputs were finished (False: stopped after ``max_chunks``)."""
    bar = _progress_bar(job, state) if progress else None
    pool, workers_started = None, []
    if workers > 0:
        ctx = multiprocessing.get_context(_start_method())
        pool = ctx.Pool(workers, initializer=_worker_init, initargs=(job.backend.to_str(), job.record_encoder))
        workers_started = list(getattr(pool, "_pool", []))
    chunks = _read_chunks(job.paths, state["file_index"], state["byte_offset"], state["line_no"], chunk_lines,
                          job.dtype, max_line_bytes, job.stage)
    window: collections.deque = collections.deque()  # (file index, offset, next line, pending result or None)
    names = [job.file(TOKENS_FILE), job.file(PART_FILE)] + (
        [job.file(RECORDS_PART_FILE), job.file(EXTRA_FILE)] if job.chat else [os.devnull, os.devnull])
    try:
        with contextlib.ExitStack() as stack:
            writer = _Writer(job, state, [stack.enter_context(open(n, "ab")) for n in names], bar)

            def drain_one():
                file_index, offset, next_line, pending = window.popleft()
                if pending is not None and pool is not None:
                    pending = _wait(pending, workers_started)
                writer.commit(file_index, offset, next_line, pending)

            for file_index, offset, next_line, task in chunks:
                in_flight = sum(w[3] is not None for w in window)
                if max_chunks is not None and writer.committed_chunks + in_flight >= max_chunks:
                    finished = False
                    break
                if task is None:
                    pending = None
                elif pool is not None:
                    pending = pool.apply_async(_encode_chunk, (task,))
                else:
                    pending = _encode_chunk(task, job.backend, job.record_encoder)
                window.append((file_index, offset, next_line, pending))
                while len(window) > max(2 * workers, 1):
                    drain_one()
            else:
                finished = True
            while window:
                drain_one()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    return finished


def _finalise(job: _Job, state: dict, tokenizer, tokenizer_path, pack_max_seq_len, extra_meta, t_start) -> dict:
    """Turn the committed parts into the final arrays and write meta.json last (the directory is then complete);
    DataError when every line was bad."""
    if not state["documents"]:
        raise DataError(f"{job.paths[0]}: no records: all {state['bad_lines']} non-blank lines of the input are bad "
                        f"(first: {state['bad'][0] if state['bad'] else '?'})")
    part_path, records_path = job.file(PART_FILE), job.file(RECORDS_PART_FILE)
    _save_cumulative(part_path, job.file(OFFSETS_FILE), state["tokens"])
    if job.chat:
        info = np.fromfile(records_path, dtype="<i8").reshape(-1, 2)
        _save_array(job.file(FLAGS_FILE), info[:, 0].astype(np.uint8))
        info[:, 1].astype("<i8").tofile(records_path)  # the extra lengths, summed into extra_offsets.npy
        _save_cumulative(records_path, job.file(EXTRA_OFFSETS_FILE), state["extra_bytes"])
    meta = {
        "format_version": FORMAT_VERSION,
        "stage": job.stage,
        "dtype": job.dtype.name,
        "tokenizer": {
            "path": tokenizer_path, "sha256": job.fingerprint, "vocab_size": job.vocab,
            "bos_token_id": getattr(tokenizer, "bos_token_id", None),
            "eos_token_id": getattr(tokenizer, "eos_token_id", None),
            "pad_token_id": getattr(tokenizer, "pad_token_id", None),
        },
        "sources": [{**s, **pf} for s, pf in zip(job.sources, state["per_file"])],
        "sources_identity": job.sources,
        **{key: state[key] for key in ("documents", "tokens", "bad_lines", "blank_lines", "bad")},
        "skip_bad_lines": job.skip_bad_lines,
        "pack_max_seq_len": pack_max_seq_len,
        "last_run_seconds": round(time.perf_counter() - t_start, 3),
    }
    if job.chat:
        meta.update(segments_per_record=job.segments_per_record, extra_bytes=state["extra_bytes"],
                    chat=extra_meta or {})
    _atomic_write_json(job.file(META_FILE), meta)
    os.remove(job.file(STATE_FILE))
    os.remove(part_path)
    if job.chat:
        os.remove(records_path)
    return meta


def _move_into(staging: str, out_dir: str) -> None:
    """Replace the prepared files of ``out_dir`` by the complete ones of ``staging`` (meta.json removed first and
    moved in last, so the directory is never a mix that reads as complete), then remove ``staging``."""
    os.remove(os.path.join(out_dir, META_FILE))
    names = set(os.listdir(staging))
    for name in (TOKENS_FILE, OFFSETS_FILE, FLAGS_FILE, EXTRA_FILE, EXTRA_OFFSETS_FILE, STATE_FILE, PART_FILE,
                 RECORDS_PART_FILE):
        if name not in names and os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for name in sorted(names - {META_FILE}) + [META_FILE]:
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    os.rmdir(staging)


def _save_array(path: str, array: np.ndarray) -> None:
    tmp = path[: -len(".npy")] + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _save_cumulative(lengths_path: str, out_path: str, total: int) -> None:
    """The int64 lengths in ``lengths_path`` as offsets (a leading 0, then their running sums) in ``out_path``."""
    lengths = np.fromfile(lengths_path, dtype="<i8")
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    assert offsets[-1] == total, (lengths_path, offsets[-1], total)
    _save_array(out_path, offsets)


def _check_has_content(path: str, block: int = 1 << 20) -> None:
    """DataError unless ``path`` holds a non-whitespace byte (after a UTF-8 byte-order mark); reads only up to
    the first one, so a normal file costs one small read."""
    blank = False
    with open(path, "rb") as f:
        head = f.read(block)
        data = head[len(_BOM):] if head.startswith(_BOM) else head
        while data:
            if data.strip():
                return
            blank = True
            data = f.read(block)
    raise DataError(f"{path}: no records ({'only blank lines' if blank else 'an empty file'})")


def _load_json_or_none(path: str, overwrite: bool) -> Any:
    """The JSON in ``path`` (None when absent, or damaged and ``overwrite``); DataError when damaged."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
        if isinstance(value, dict):
            return value
        problem = f"holds a JSON {type(value).__name__}, not an object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"cannot be read ({e})"
    if overwrite:
        return None
    raise DataError(f"{path} {problem}; pass overwrite=True / --overwrite to prepare again")


# --------------------------------------------------------------------------------------------------------------
# Reading


def encode_prepared_pretrain(record: Mapping[str, Any], max_seq_len: int, *, bos_id: int, eos_id: int,
                             pad_id: int = 0) -> Encoded:
    """A prepared record -> the arrays of :func:`~minimind_jax.data.samples.encode_pretrain` for its text.

    Unpacked records (``{"ids"}``): bos + ids[:max_seq_len-2] + eos, padded with ``pad_id``, labels -100 on pad.
    Packed records (``{"input_ids", "labels", "segment_ids", "positions"}``, already ``max_seq_len`` long) pass
    through.
    """
    if "input_ids" in record:
        if len(record["input_ids"]) != max_seq_len:
            raise ValueError(f"packed rows hold {len(record['input_ids'])} tokens, the pipeline wants "
                             f"max_seq_len={max_seq_len}")
        return Encoded(dict(record), False)  # input_ids, labels, segment_ids, positions
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    ids = record["ids"]
    n = min(len(ids), max_seq_len - 2)
    input_ids = np.full((max_seq_len,), pad_id, np.int32)
    input_ids[0] = bos_id
    input_ids[1: n + 1] = ids[:n]
    input_ids[n + 1] = eos_id
    labels = np.where(input_ids == pad_id, IGNORE_INDEX, input_ids).astype(np.int32)
    return Encoded({"input_ids": input_ids, "labels": labels}, len(ids) > max_seq_len - 2)


_META_KEYS = {"format_version": int, "dtype": str, "tokenizer": dict, "sources": list, "documents": int,
              "tokens": int, "bad_lines": int, "blank_lines": int, "bad": list}
_SOURCE_KEYS = ("lines",)
SCAN_TOKENS = 16 << 20  # tokens per slice when scanning tokens.bin for out-of-vocabulary ids


def _read_meta(directory: str) -> dict:
    """meta.json, checked for every key the reader uses (DataError naming the file and key)."""
    path = os.path.join(directory, META_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot be read ({e}); prepare the data again (scripts/prepare_data.py "
                        "--overwrite)") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{directory}: format version {meta.get('format_version')}, this code reads "
                        f"{FORMAT_VERSION}")
    for key, kind in _META_KEYS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise DataError(f"{path}: key {key!r} must be a {kind.__name__}, got {meta.get(key)!r:.60}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: key 'dtype' must be 'uint16' or 'uint32', got {meta['dtype']!r:.60}")
    if not isinstance(meta["tokenizer"].get("sha256"), str):
        raise DataError(f"{path}: key 'tokenizer.sha256' must be a string")
    eos = meta["tokenizer"].get("eos_token_id")
    if eos is not None and (not isinstance(eos, int) or isinstance(eos, bool) or eos < 0):
        raise DataError(f"{path}: key 'tokenizer.eos_token_id' must be a token id or null, got {eos!r:.60}")
    for i, source in enumerate(meta["sources"]):
        if not isinstance(source, dict) or not isinstance(source.get("lines"), int):
            raise DataError(f"{path}: key 'sources[{i}].lines' must be an int")
    segments = meta.get("segments_per_record", 1)
    if not isinstance(segments, int) or isinstance(segments, bool) or segments < 1:
        raise DataError(f"{path}: key 'segments_per_record' must be a positive int, got {segments!r:.60}")
    pack = meta.get("pack_max_seq_len")
    if pack is not None and (not isinstance(pack, int) or isinstance(pack, bool) or pack < 1):
        raise DataError(f"{path}: key 'pack_max_seq_len' must be a positive int or null, got {pack!r:.60}")
    return meta


def _read_offsets(directory: str, meta: dict) -> np.ndarray:
    """offsets.npy, checked against meta.json: int64, ``documents + 1`` entries from 0, non-decreasing, ending
    at the recorded token count; at least one document."""
    path = os.path.join(directory, OFFSETS_FILE)
    try:  # memory-mapped: read lazily, its pages shared by every process on the host
        offsets = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot be read ({e})") from None
    want = meta["documents"] * meta.get("segments_per_record", 1) + 1  # chat stages: several segments a record
    if offsets.dtype != np.int64 or offsets.ndim != 1 or len(offsets) != want:
        raise DataError(f"{path}: holds {offsets.dtype} {offsets.shape}, not the int64 ({want},) "
                        f"that meta.json's {meta['documents']} documents need")
    if offsets[0] != 0 or not _non_decreasing(offsets) or offsets[-1] != meta["tokens"]:
        raise DataError(f"{path}: not the non-decreasing document starts from 0 to meta.json's {meta['tokens']} "
                        "tokens (damaged)")
    if meta["documents"] == 0:
        raise DataError(f"{directory}: no records (prepared from {len(meta['sources'])} file(s) with no document)")
    return offsets


def _non_decreasing(values: np.ndarray, block: int = 1 << 22) -> bool:
    """Whether ``values`` never decreases, checked in blocks (no full-size temporary for a mapped array)."""
    for start in range(0, max(len(values) - 1, 0), block):
        chunk = np.asarray(values[start:start + block + 1])
        if np.any(chunk[1:] < chunk[:-1]):
            return False
    return True


def _check_tokens_file(directory: str, num_tokens: int, dtype: np.dtype) -> None:
    path = os.path.join(directory, TOKENS_FILE)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    want = num_tokens * dtype.itemsize
    if size != want:
        what = "truncated" if size < want else "longer than recorded"
        raise DataError(f"{path}: {what}: {size:,} bytes, offsets.npy needs {num_tokens:,} {dtype.name} tokens "
                        f"({want:,} bytes); prepare the data again (scripts/prepare_data.py --overwrite)")


def _first_id_at_least(tokens: np.ndarray, limit: int) -> int | None:
    """The position of the first token >= ``limit`` (a scan in slices of :data:`SCAN_TOKENS`), or None."""
    if limit > np.iinfo(tokens.dtype).max:
        return None
    for start in range(0, len(tokens), SCAN_TOKENS):
        hits = np.flatnonzero(np.asarray(tokens[start: start + SCAN_TOKENS]) >= limit)
        if len(hits):
            return start + int(hits[0])
    return None


class PreparedSource:
    """A prepared directory as a grain random-access source (``__len__`` / ``__getitem__``, picklable).

    Unpacked: ``source[i]`` = ``{"ids": int32 array}`` (document ``i``'s raw tokens). Packed (``pack=True``, or
    the ``pack_max_seq_len`` recorded at preparation when ``pack`` is None): ``source[i]`` = ``{"input_ids",
    "labels", "segment_ids", "positions"}`` (int32, ``max_seq_len`` each), row ``i`` of the bos / eos framed
    token stream; the final partial row is dropped (see module docstring).
    """

    stage = "pretrain"

    def __init__(self, directory: str | os.PathLike, *, pack: bool | None = None, max_seq_len: int | None = None):
        self.directory = os.fspath(directory)
        if not is_prepared_dir(self.directory):
            raise DataError(f"{self.directory} is not a prepared data directory (no {META_FILE}; an unfinished "
                            "preparation is resumed by rerunning scripts/prepare_data.py)")
        self.meta = _read_meta(self.directory)
        if self.meta.get("stage", "pretrain") != "pretrain":
            raise DataError(f"{self.directory}: holds prepared {self.meta['stage']!r} data, not pretrain data")
        if pack is None:
            pack = self.meta.get("pack_max_seq_len") is not None
            if pack and max_seq_len is None:
                max_seq_len = self.meta["pack_max_seq_len"]
        self.pack = bool(pack)
        self.max_seq_len = max_seq_len
        if self.pack and (max_seq_len is None or max_seq_len < 1):
            raise ValueError("pack=True needs a positive max_seq_len")
        self.dtype = np.dtype(self.meta["dtype"])
        self.offsets = _read_offsets(self.directory, self.meta)
        self.num_tokens = int(self.offsets[-1])
        _check_tokens_file(self.directory, self.num_tokens, self.dtype)
        self.eos_id = self.meta["tokenizer"].get("eos_token_id")
        self.bos_id = self.meta["tokenizer"].get("bos_token_id")
        for name, value in (("eos", self.eos_id), ("bos", self.bos_id)):
            if self.pack and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise DataError(f"{os.path.join(self.directory, META_FILE)}: packed rows need a {name} id, and "
                                f"tokenizer.{name}_token_id is {value!r:.60}")
        self.stats = ReadStats(files=len(self.meta["sources"]), lines=sum(s["lines"] for s in self.meta["sources"]),
                               records=len(self), blank_lines=self.meta["blank_lines"],
                               bad_lines=self.meta["bad_lines"], bad=list(self.meta["bad"]))
        if self.pack:  # stream end (exclusive) of document d, its bos and eos included
            self._stream_end = stream_ends(self.offsets)
        self._tokens = None

    @property
    def documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            path = os.path.join(self.directory, TOKENS_FILE)
            if self.num_tokens == 0:
                self._tokens = np.zeros((0,), self.dtype)
            else:
                self._tokens = np.memmap(path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    def check_tokenizer(self, tokenizer) -> None:
        """Raise DataError unless ``tokenizer`` is the one the data was prepared with and every stored id lies
        inside its vocabulary (an id outside it would index past the embedding: NaN at step 1)."""
        want = self.meta["tokenizer"]["sha256"]
        if tokenizer_fingerprint(tokenizer) != want:
            raise DataError(f"{self.directory} was prepared with another tokenizer "
                            f"({self.meta['tokenizer'].get('path')}, sha256 {want[:12]}...)")
        vocab = _backend(tokenizer).get_vocab_size(with_added_tokens=True)
        for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
            value = self.meta["tokenizer"].get(name)
            if value is not None and not (isinstance(value, int) and 0 <= value < vocab):
                raise DataError(f"{os.path.join(self.directory, META_FILE)}: tokenizer.{name} is {value!r}, not an "
                                f"id of the tokenizer's {vocab} tokens")
        bad = _first_id_at_least(self.tokens, vocab)
        if bad is not None:
            doc = int(np.searchsorted(self.offsets, bad, side="right")) - 1
            raise DataError(f"{os.path.join(self.directory, TOKENS_FILE)}: token {bad} (document {doc}) is id "
                            f"{int(self.tokens[bad])}, outside the tokenizer's vocabulary of {vocab} ids")

    def __len__(self) -> int:
        if self.pack:
            return (self.num_tokens + 2 * self.documents) // self.max_seq_len
        return self.documents

    def location(self, index: int) -> str:
        kind = "packed row" if self.pack else "document"
        return f"{self.directory} ({kind} {index})"

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"record {index} out of range for {n} records")
        index %= n
        if not self.pack:
            start, end = self.offsets[index], self.offsets[index + 1]
            return {"ids": np.asarray(self.tokens[start:end], np.int32)}
        return pretrain_row(self.tokens, self.offsets, self._stream_end, index, self.max_seq_len,
                            bos_id=self.bos_id, eos_id=self.eos_id)

    def transform(self, tokenizer, max_seq_len: int):
        """``fn(record, rng) -> Encoded`` for the pipeline (checks the tokenizer first)."""
        self.check_tokenizer(tokenizer)
        if self.pack and max_seq_len != self.max_seq_len:
            raise ValueError(f"packed rows of {self.max_seq_len} tokens, but the pipeline wants "
                             f"max_seq_len={max_seq_len}")
        pad = tokenizer.pad_token_id
        bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, 0 if pad is None else int(pad)
        return lambda record, rng: encode_prepared_pretrain(record, max_seq_len, bos_id=bos, eos_id=eos, pad_id=pad)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokens"] = None
        return state

    def __repr__(self) -> str:
        extra = f", pack max_seq_len={self.max_seq_len}" if self.pack else ""
        return f"PreparedSource({self.directory!r}, documents={self.documents}, tokens={self.num_tokens}{extra})"
