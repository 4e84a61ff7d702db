"""Batches read ahead of the training step: a daemon thread pulls the next ``depth`` host batches from the data
iterator (and, when given ``place``, already puts them on the devices) while the current step runs.

Exact resume. Each batch travels with the data iterator's state right after it was read
(``data_iter.get_state()``); :attr:`BatchFeed.consumed` is the state after the last batch handed to the loop,
i.e. after exactly the batches the steps taken so far consumed, never what the thread has read ahead. A
checkpoint saves that (``grain.checkpoint.CheckpointSave(feed.consumed)``); restoring into the real iterator
continues with the batch that followed it.

Errors. An exception raised while reading a batch (a ``DataError`` naming file:line, say) is raised in the main
thread, the same exception object, when the loop asks for that batch; batches before it are handed out first.
The thread stops at an error, after ``count`` batches, or when the feed is closed (its ``with`` block left,
by an error or KeyboardInterrupt included); the queue is bounded and every wait is short, so closing never
hangs. ``depth=0`` reads each batch in the calling thread when it is asked for (no thread).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import queue
import threading
import time
from typing import Any, Callable

_POLL_S = 0.05  # how often a blocked put / get looks at the stop flag / the thread
_JOIN_S = 60.0  # closing waits this long for a batch being read (the thread is a daemon: exit never waits)


class Position:
    """A data iterator's position, for ``grain.checkpoint.CheckpointSave``: grain writes ``get_state()``'s bytes
    (the JSON an iterator's own state dict is written as) to the checkpoint."""

    def __init__(self, state: dict):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state, indent=4).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)


@dataclasses.dataclass
class Fed:
    """One batch as the loop receives it."""
    host: dict  # numpy arrays
    device: Any  # ``place(host)``, or None without ``place``
    position: Position  # the data iterator's position after this batch
    wait_s: float  # seconds the caller waited for it


@dataclasses.dataclass
class _Failed:
    error: BaseException


class BatchFeed:
    """``with BatchFeed(read, data_iter, count, depth, place) as feed: feed.next()`` -> :class:`Fed`.

    ``read()`` makes one host batch from ``data_iter``; at most ``count`` batches are read (the run's
    remaining steps), so the thread never reads past what the loop will use."""

    def __init__(self, read: Callable[[], dict], data_iter, count: int, depth: int,
                 place: Callable[[dict], Any] | None = None):
        self.read, self.data_iter, self.count, self.depth, self.place = read, data_iter, count, depth, place
        self.consumed = Position(copy.deepcopy(data_iter.get_state()))
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handed = 0

    def __enter__(self) -> BatchFeed:
        if self.depth > 0:
            self._thread = threading.Thread(target=self._work, name="batch-prefetch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is reading) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(_JOIN_S)
            self._thread = None

    def next(self) -> Fed:
        """The next batch (waiting for it); raises what reading it raised."""
        if self._handed >= self.count:
            raise RuntimeError(f"the batch feed holds {self.count} batches; all were handed out")
        t0 = time.perf_counter()
        item = self._make() if self._thread is None else self._get()
        if isinstance(item, _Failed):
            raise item.error
        host, device, position = item
        self._handed += 1
        self.consumed = position
        return Fed(host, device, position, time.perf_counter() - t0)

    def _make(self):
        host = self.read()
        device = self.place(host) if self.place is not None else None
        return host, device, Position(copy.deepcopy(self.data_iter.get_state()))

    def _work(self) -> None:
        try:
            for _ in range(self.count):
                if self._stop.is_set() or not self._put(self._make()):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, raised there by next()
            self._put(_Failed(e))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    if self._queue.empty():
                        raise RuntimeError("the batch-prefetch thread stopped without a batch") from None
