"""The training state on disk: one orbax ``CheckpointManager`` per run (``<run>/state``) holding, per saved
step, the ``TrainState`` (params, optimizer state, loss scale, rng, frozen models), the grain data iterator's
position and a JSON ``meta`` (config, data fingerprint, counters) that resume checks before restoring.

Integrity. Once orbax has finalised a step (its temporary directory renamed to ``<step>/``), a background
thread writes ``<step>/manifest.sha256.json``: the size and sha256 of every file of the step (temp file +
rename, so a manifest is whole or absent). The next save and ``wait_until_finished`` / ``close`` wait for it.
The rules when a run resumes:

- a step with a manifest is used only if every file it lists is there with its size and sha256;
- a damaged step (a file missing, truncated, changed, or an unreadable manifest) is skipped with one log line
  naming the step and its first bad file; resume falls back to the newest intact kept step, and the damaged
  steps after it are moved to ``state/damaged/<step>/`` (kept for inspection, never used again);
- a step without a manifest (saved by an older version, or the process died while hashing it) is used
  unverified, with a log line saying so; restore then still turns any orbax error into one clear error;
- when every kept step is damaged, nothing is moved or deleted and a ``TrainConfigError`` says so.

Failed saves. A save that fails in orbax's background threads (a full disk, say) raises its error in the caller
at the next save, ``wait_until_finished`` or ``close``; ``close`` then still shuts orbax's threads down, so the
process exits without their tracebacks. While a manager is open, orbax's ERROR log records about a full disk
(one per background thread, each with a traceback; the caller reports the error as one line, see
``no_space_left``) are dropped, and so are tensorstore's "Event loop is closed" errors: writes of the failed
save that finish after orbax closed its event loop.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sys
import threading
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from minimind_jax.data import DataError
from minimind_jax.training.config import TrainConfig, TrainConfigError
from minimind_jax.training.metrics import log
from minimind_jax.training.step import TrainState

MANIFEST = "manifest.sha256.json"
MANIFEST_FORMAT = "minimind-jax-train-state"
DAMAGED_DIR = "damaged"  # not a step name to orbax (neither digits nor ending in _<digits>)


class StateManager(ocp.CheckpointManager):
    """orbax's ``CheckpointManager`` that also writes each finalised step's manifest (in a background thread,
    joined by the next save and by ``wait_until_finished`` / ``close``) and remembers verified steps."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.problems: dict[int, str | None] = {}  # step -> its first bad file (None: intact), once checked
        self._hasher: threading.Thread | None = None
        self._hash_error: BaseException | None = None
        _QUIET.acquire()
        self._quiet = True

    def save(self, step: int, *args, **kwargs) -> bool:
        self._join_hasher()
        saved = super().save(step, *args, **kwargs)
        if saved and jax.process_index() == 0:
            self._hasher = threading.Thread(target=self._finalise_and_hash, args=(step,),
                                            name=f"manifest-{step}", daemon=True)
            self._hasher.start()
        return saved

    def wait_until_finished(self) -> None:
        """Raises a failed save's error (orbax raises it once in each thread that waits)."""
        try:
            super().wait_until_finished()
        finally:
            self._join_hasher()

    def close(self) -> None:
        """Wait for the save in flight, then close orbax's threads, even when that save failed (its error is
        raised after). ``all_steps()`` then lists the steps on disk: a failed save has already dropped from
        orbax's list the old steps it was to delete once finalised."""
        try:
            self.wait_until_finished()
        finally:
            try:
                super().close()  # its own wait does not raise the error again in this thread
                self.reload()
            finally:
                if self._quiet:
                    self._quiet = False
                    _QUIET.release()

    def _finalise_and_hash(self, step: int) -> None:
        try:
            ocp.CheckpointManager.wait_until_finished(self)  # orbax's finalise thread: rename, old steps removed
            if step_dir(self, step).is_dir():
                write_manifest(step_dir(self, step))
        except Exception as e:  # raised again in the main thread by _join_hasher
            self._hash_error = e

    def _join_hasher(self) -> None:
        if self._hasher is not None:
            self._hasher.join()
            self._hasher = None
        if self._hash_error is not None:
            error, self._hash_error = self._hash_error, None
            raise error


def no_space_left(e: BaseException | None) -> bool:
    """Whether ``e`` (or what caused it) is ENOSPC: an OSError, or orbax / tensorstore's error text."""
    while e is not None:
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


class _OrbaxNoise(logging.Filter):
    """Installed while any StateManager is open (counted): a filter on the ``absl`` logger orbax logs to that
    drops its ERROR records about a full disk, and a ``sys.unraisablehook`` that drops tensorstore's "Event loop
    is closed" errors (see the module doc); everything else goes through as before."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()
        self._users = 0
        self._previous_hook = sys.unraisablehook

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        cause = record.exc_info[1] if record.exc_info else None
        return not (no_space_left(cause) or "No space left on device" in record.getMessage())

    def _unraisable(self, unraisable) -> None:
        if self._users and unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError) \
                and str(unraisable.exc_value) == "Event loop is closed":
            return
        self._previous_hook(unraisable)

    def acquire(self) -> None:
        with self._lock:
            self._users += 1
            if self._users == 1:
                logging.getLogger("absl").addFilter(self)
                if sys.unraisablehook is not self._unraisable:
                    self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                logging.getLogger("absl").removeFilter(self)
                if sys.unraisablehook is self._unraisable:  # else replaced since: ours passes everything on
                    sys.unraisablehook = self._previous_hook


_QUIET = _OrbaxNoise()


def manager(state_dir: Path, cfg: TrainConfig) -> StateManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True,
                                           enable_async_checkpointing=cfg.async_checkpointing,
                                           cleanup_tmp_directories=True)
    return StateManager(state_dir.absolute(), options=options)


def save(mgr: StateManager, step: int, state: TrainState, data_position, meta: dict, *, force: bool = False) -> None:
    """``data_position``: the data iterator's position after the batches steps 1..step consumed (a grain
    iterator, or anything with grain's ``get_state() -> bytes``, e.g. ``prefetch.Position``)."""
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           data=grain.checkpoint.CheckpointSave(data_position),
                                           meta=ocp.args.JsonSave(meta)), force=force)


def latest_step(mgr: StateManager, *, verify: bool = True) -> int | None:
    """The step a resumed run continues from: the newest kept step that is intact (None when nothing is saved).
    Damaged steps are skipped with a log line; when all are damaged, a ``TrainConfigError``. ``verify=False``:
    the newest kept step, unchecked (for a run that will be replaced, not resumed)."""
    steps = sorted(mgr.all_steps(), reverse=True)
    if not verify or not steps:
        return steps[0] if steps else None
    intact = next((step for step in steps if check_step(mgr, step) is None), None)
    if intact is None:
        damaged = "; ".join(f"step {s}: {mgr.problems[s]}" for s in steps)
        raise TrainConfigError(f"{mgr.directory}: every kept checkpoint is damaged ({damaged}); nothing was "
                               f"deleted. To start over, pass overwrite=true without --from_resume, or move {mgr.directory} away")
    for step in steps[:steps.index(intact)]:
        log(f"checkpoint step {step} in {mgr.directory} is damaged ({mgr.problems[step]}): skipped, resuming "
            f"from step {intact}, the newest intact one")
    return intact


def read_meta(mgr: StateManager, step: int) -> dict:
    return _restore_items(mgr, step, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(mgr: StateManager, step: int, abstract_state, data_iter):
    """The train state of ``step`` (verified again), the data iterator moved to its position; damaged steps
    after it are moved to ``state/damaged/`` so that the resumed run can save them again."""
    problem = check_step(mgr, step)
    if problem is not None:
        raise TrainConfigError(f"{step_dir(mgr, step)}: checkpoint is damaged ({problem})")
    restored = _restore_items(mgr, step, ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iter)))
    _move_damaged_after(mgr, step)
    return restored["state"]


def _restore_items(mgr: StateManager, step: int, args):
    """orbax / tensorstore errors (a file missing or cut short in a step without a manifest) as one line; the
    project's own errors (the data iterator's, say) go up as they are."""
    try:
        return mgr.restore(step, args=args)
    except (TrainConfigError, DataError):
        raise
    except Exception as e:  # noqa: BLE001 - re-raised as one clear error naming the step directory
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        raise TrainConfigError(f"{step_dir(mgr, step)}: cannot restore the checkpoint ({type(e).__name__}: "
                               f"{first_line}); it is damaged or was not written by minimind-jax") from e


def _move_damaged_after(mgr: StateManager, step: int) -> None:
    later = [s for s in mgr.all_steps() if s > step and mgr.problems.get(s)]
    if not later:
        return
    if jax.process_index() == 0:
        target = Path(mgr.directory) / DAMAGED_DIR
        target.mkdir(exist_ok=True)
        for s in later:
            dest, n = target / str(s), 1
            while dest.exists():  # an earlier fallback already moved a step of this number
                dest, n = target / f"{s}.{n}", n + 1
            os.replace(step_dir(mgr, s), dest)
            log(f"moved the damaged checkpoint step {s} to {dest}")
    ocp.multihost.sync_global_processes(f"state_io:moved_damaged_after_{step}")  # every process sees the move
    mgr.reload()


# ------------------------------------------------------------------------------------------------ manifest
def step_dir(mgr: StateManager, step: int) -> Path:
    return Path(mgr.directory) / str(step)


def _files(directory: Path) -> list[str]:
    """Every file under ``directory`` (its manifest excepted), as sorted relative POSIX paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):  # hashlib.file_digest needs Python 3.11
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """``directory/manifest.sha256.json``: size and sha256 of each file of the finalised step."""
    files = {name: {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
             for name in _files(directory)}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "version": 1, "files": files}, indent=1))
    os.replace(tmp, directory / MANIFEST)


def check_step(mgr: StateManager, step: int) -> str | None:
    """None when ``step`` is intact (or has no manifest: logged, used unverified), else its first bad file;
    remembered per manager, so resume hashes a step once."""
    if step not in mgr.problems:
        directory = step_dir(mgr, step)
        if (directory / MANIFEST).exists():
            mgr.problems[step] = verify_manifest(directory)
        else:
            log(f"checkpoint step {step} in {mgr.directory} has no {MANIFEST} (saved by an older version, or the "
                "run stopped while hashing it): using it unverified")
            mgr.problems[step] = None
    return mgr.problems[step]


def verify_manifest(directory: Path) -> str | None:
    """The first problem of ``directory`` against its manifest (sizes are checked before any hashing)."""
    files = _listed_files(directory / MANIFEST)
    if files is None:
        return f"{MANIFEST}: unreadable"
    for name, (size, _) in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name}: missing"
        if path.stat().st_size != size:
            return f"{name}: {path.stat().st_size} bytes, {size} when saved"
    for name, (_, digest) in files.items():
        if _sha256(directory / name) != digest:
            return f"{name}: sha256 differs from the one saved (content changed)"
    return None


def _listed_files(manifest: Path) -> dict[str, tuple[int, str]] | None:
    """name -> (size, sha256) as the manifest lists them, sorted by name; None when it is not one of ours."""
    try:
        doc = json.loads(manifest.read_text())
        if doc.get("format") != MANIFEST_FORMAT:
            return None
        return {name: (int(f["size"]), str(f["sha256"])) for name, f in sorted(doc["files"].items())}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
