"""The line index of a jsonl file: where each non-blank line starts, found by a newline scan (no JSON parsing).

:func:`line_index` reads the file in fixed-size chunks (so memory stays bounded whatever the file size), finds
the newlines with numpy, and keeps the byte offset (``uint64``) of every non-blank line (a line holding only
whitespace is blank; a UTF-8 byte-order mark at the start of the file is stepped over). Line numbers are
kept only when the file has blank lines (otherwise record ``i`` is line ``i + 1``).

The index is cached in ``cache_dir`` (default ``$MINIMIND_JAX_CACHE_DIR``, else
``~/.cache/minimind_jax/jsonl_index``) under a key of the file's absolute path, size and mtime, so a changed
file is re-scanned; a cached index is memory-mapped, not read. Files under ``CACHE_MIN_BYTES`` are not cached. Cache files are written to a temporary name and
renamed, so a crash never leaves a half-written index; an unwritable cache directory only costs the caching.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile

import numpy as np

__all__ = ["LineIndex", "line_index", "scan", "default_cache_dir", "start_method", "CHUNK_BYTES"]

CHUNK_BYTES = 16 << 20
CACHE_MIN_BYTES = 16 << 20  # smaller files are scanned in milliseconds: not worth a cache entry
INDEX_VERSION = 1
_BOM = b"\xef\xbb\xbf"
_SPACE = np.array([ord(c) for c in " \t\r\n\x0b\x0c"], np.uint8)  # what bytes.strip() removes


@dataclasses.dataclass
class LineIndex:
    """``offsets[i]``: byte offset of the ``i``-th non-blank line; ``lines[i]`` its 1-based line number (None:
    ``i + 1``); ``size``: the file size (the end of the last line); ``total_lines`` / ``blank_lines`` counts;
    ``ends``: where each line ends, kept only for an index with lines left out (else the next line's start)."""

    offsets: np.ndarray
    lines: np.ndarray | None
    size: int
    total_lines: int
    blank_lines: int
    ends: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def subset(self, keep: np.ndarray) -> LineIndex:
        """The index of the lines where the boolean mask ``keep`` is true."""
        offsets = np.asarray(self.offsets)
        ends = np.append(offsets[1:], np.uint64(self.size)) if self.ends is None else np.asarray(self.ends)
        lines = np.asarray(self.lines) if self.lines is not None else np.arange(1, len(offsets) + 1, dtype=np.int64)
        return LineIndex(offsets[keep], lines[keep], self.size, self.total_lines, self.blank_lines, ends[keep])

    def line_number(self, i: int) -> int:
        return int(self.lines[i]) if self.lines is not None else i + 1

    def end(self, i: int) -> int:
        """The byte offset where line ``i`` (and any blank lines after it) ends."""
        if self.ends is not None:
            return int(self.ends[i])
        return int(self.offsets[i + 1]) if i + 1 < len(self.offsets) else self.size


def default_cache_dir() -> str:
    return os.environ.get("MINIMIND_JAX_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "minimind_jax", "jsonl_index")


def _key(path: str, st: os.stat_result) -> str:
    ident = f"{INDEX_VERSION}\0{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def line_index(path: str, cache_dir: str | None = None, *, use_cache: bool = True) -> LineIndex:
    """The (cached) :class:`LineIndex` of ``path``; see the module docstring."""
    st = os.stat(path)
    base = os.path.join(cache_dir or default_cache_dir(), _key(path, st))
    use_cache = use_cache and st.st_size >= CACHE_MIN_BYTES
    if use_cache:
        cached = _load(base, st.st_size)
        if cached is not None:
            return cached
    index = scan(path, st.st_size)
    if use_cache:
        _save(base, index, path)
    return index


def scan(path: str, size: int | None = None) -> LineIndex:
    """Build the index by a chunked newline scan of ``path``."""
    starts, candidates = [], []  # candidates: line starts whose first byte is whitespace (maybe blank)
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb") as f:
        head = f.read(len(_BOM))
        first = len(_BOM) if head == _BOM else 0
        f.seek(first)
        pending, base = first, first  # the next line's start, when its first byte is not yet read
        while True:
            n = f.readinto(view)
            if not n:
                break
            arr = np.frombuffer(buf, np.uint8, n)
            nl = np.flatnonzero(arr == 10)
            local = np.concatenate([[pending - base] if pending is not None else [], nl + 1]).astype(np.int64)
            local = local[local < n]
            pending = base + int(nl[-1]) + 1 if len(nl) and nl[-1] + 1 >= n else None
            if len(local):
                global_starts = (local + base).astype(np.uint64)
                starts.append(global_starts)
                candidates.append(global_starts[np.isin(arr[local], _SPACE)])
            base += n
    size = base if size is None else size
    offsets = np.concatenate(starts) if starts else np.zeros(0, np.uint64)
    blank = _blank_lines(path, offsets, np.concatenate(candidates) if candidates else offsets[:0], size)
    total = len(offsets)
    lines = None
    if len(blank):
        keep = np.ones(total, bool)
        keep[blank] = False
        lines = (np.flatnonzero(keep) + 1).astype(np.int64)
        offsets = offsets[keep]
    return LineIndex(offsets, lines, size, total, len(blank))


def _blank_lines(path: str, offsets: np.ndarray, candidates: np.ndarray, size: int) -> np.ndarray:
    """Positions in ``offsets`` of the candidate lines that hold only whitespace (read one by one: they are rare,
    as JSON records start with ``{``)."""
    if not len(candidates):
        return np.zeros(0, np.int64)
    positions = np.searchsorted(offsets, candidates)
    blank = []
    with open(path, "rb") as f:
        for pos in positions.tolist():
            start = int(offsets[pos])
            end = int(offsets[pos + 1]) if pos + 1 < len(offsets) else size
            f.seek(start)
            # a blank line is short; read a bounded prefix first, the whole line only if that is all whitespace
            if not f.read(min(end - start, 4096)).strip() and (end - start <= 4096 or not f.read(end - start).strip()):
                blank.append(pos)
    return np.asarray(blank, np.int64)


def _load(base: str, size: int) -> LineIndex | None:
    try:
        with open(base + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("version") != INDEX_VERSION or meta.get("size") != size:
            return None
        # plain views of read-only memory maps (paged in as used; indexing a view skips np.memmap's overhead)
        offsets = np.asarray(np.load(base + ".offsets.npy", mmap_mode="r"))
        lines = np.asarray(np.load(base + ".lines.npy", mmap_mode="r")) if meta["blank_lines"] else None
    except (OSError, ValueError, KeyError):
        return None  # no cache, or an unreadable one: rescan
    if len(offsets) != meta["records"] or (lines is not None and len(lines) != len(offsets)):
        return None
    return LineIndex(offsets, lines, size, meta["total_lines"], meta["blank_lines"])


def _save(base: str, index: LineIndex, path: str) -> None:
    directory = os.path.dirname(base)
    try:
        os.makedirs(directory, exist_ok=True)
        _atomic_npy(base + ".offsets.npy", index.offsets)
        if index.lines is not None:
            _atomic_npy(base + ".lines.npy", index.lines)
        meta = {"version": INDEX_VERSION, "path": os.path.abspath(path), "size": index.size,
                "records": len(index), "total_lines": index.total_lines, "blank_lines": index.blank_lines}
        _atomic_bytes(base + ".json", json.dumps(meta).encode())  # last: marks the entry complete
    except OSError:
        pass  # a read-only or full cache directory: the index is simply not cached


def _atomic_npy(target: str, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(array))
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def _atomic_bytes(target: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def start_method() -> str:
    """fork (workers start at once) unless JAX has started its runtime threads in this process (a training
    or test process): a forked child can then deadlock on a lock one of them holds, so spawn (~3 s)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return "spawn"
    bridge = sys.modules.get("jax._src.xla_bridge")  # not imported: JAX cannot have started anything
    if bridge is None:
        return "fork"
    try:  # a private function, hence the fallback to the safe choice
        return "spawn" if bridge.backends_are_initialized() else "fork"
    except Exception:
        return "spawn"
