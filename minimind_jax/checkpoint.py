"""The project's params-only checkpoint: one directory that training, generation, evaluation and the
converter save model weights to and load them from with one call.

Layout of a checkpoint directory ``OUT``::

    OUT/params/        the params pytree, written by orbax (the files of a ``CheckpointManager`` item saved with
                       ``ocp.args.StandardSave``, read with ``StandardRestore``); exact dtypes kept
    OUT/config.json    ``ModelConfig.to_json()`` (``scan_layers`` says which param layout is stored)
    OUT/manifest.json  format / version / created / source / param_layout / dtypes / num_params / checksum
                       (sha256 over every leaf, see ``params_checksum``) / writer versions / optional extra

``save_checkpoint`` writes everything into a hidden sibling ``.OUT.tmp-<random>`` and renames it into place,
so ``OUT`` is at every moment absent, the old complete checkpoint or the new complete one (with ``force``
the new directory is swapped in with one ``renameat2(RENAME_EXCHANGE)`` where Linux offers it, else the old
one is first moved aside to ``.OUT.old-<random>``, and moved back if the second rename fails). A hard kill
can leave such a hidden sibling behind (a ``.OUT.old-*`` one holds the previous checkpoint: ``mv`` it back);
``is_checkpoint`` and ``load_checkpoint`` never take one for a checkpoint.

``load_checkpoint`` returns ``(config, params)`` with params as ``jax.Array`` on the default device in the
stored dtypes, unless ``dtype=`` asks for an explicit (logged) cast of every floating leaf.

Full training state (optimizer state, step, rng, data iterator) is the training engine's job with orbax
``CheckpointManager``; it can reuse ``build_manifest``, ``check_params``, ``verify_checksum`` and
``check_layout`` from here for its own config / manifest items.
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from minimind_jax import __version__
from minimind_jax.config import ConfigError, ModelConfig
from minimind_jax.model import init_params

log = logging.getLogger(__name__)

FORMAT = "minimind-jax-checkpoint"
VERSION = 1
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_KEYS = ("format", "version", "created", "source", "param_layout", "dtypes", "num_params", "checksum")
# Hidden siblings made by save_checkpoint: ".OUT.tmp-<random>" (being written) and ".OUT.old-<random>"
# (the previous checkpoint while it is replaced). Left behind only by a hard kill; never a checkpoint.
_SCRATCH_RE = re.compile(r"^\..+\.(tmp|old)-[^/]+$")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be written or read; the message names the path and the problem."""


# ---------------------------------------------------------------------------------------------- params trees
def flatten_params(params: Mapping) -> list[tuple[str, Any]]:
    """``[("layers_0/self_attn/q_proj/kernel", leaf), ...]`` sorted by path (nested mappings only)."""
    out = []

    def walk(tree, prefix):
        for key, value in tree.items():
            path = f"{prefix}/{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                walk(value, path)
            else:
                out.append((path, value))

    if not isinstance(params, Mapping):
        raise CheckpointError(f"params must be a nested dict of arrays, got {type(params).__name__}")
    walk(params, "")
    return sorted(out, key=lambda item: item[0])


def _unflatten(flat: Iterator[tuple[str, Any]]) -> dict:
    tree: dict = {}
    for path, leaf in flat:
        *parents, last = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree


def _to_host(path: str, leaf) -> np.ndarray:
    """Numpy for every leaf (orbax writes numpy leaves without a copy, see ``_save_params``). A CPU
    ``jax.Array`` becomes a zero-copy view; one on an accelerator or over several local devices is copied
    to host memory (as orbax's own device-to-host transfer would)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        raise CheckpointError(
            f"param {path} is sharded across processes; a params-only checkpoint is written from one "
            "process (gather the params first, or save the full state with the training CheckpointManager)")
    return np.asarray(leaf)


def param_layout(config: ModelConfig) -> str:
    """``"scanned"`` (one stacked ``layers`` subtree) or ``"per-layer"`` (``layers_0`` ... ``layers_{n-1}``)."""
    return "scanned" if config.scan_layers else "per-layer"


@functools.lru_cache(maxsize=32)
def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every leaf path of the model's params tree for ``config`` and its shape (from ``jax.eval_shape`` of
    the model's own init: nothing is computed or compiled)."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return {path: tuple(leaf.shape) for path, leaf in flatten_params(abstract)}


def _short(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def shape_problems(expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]], noun: str,
                   *, optional: frozenset[str] = frozenset(), limit: int = 10) -> list[str]:
    """The missing / unexpected / wrongly shaped entries of ``actual`` against ``expected`` (name -> shape),
    one message line each (empty when they match). Shared by the checkpoint and the converter's checks."""
    missing = sorted(set(expected) - set(actual) - set(optional))
    unexpected = sorted(set(actual) - set(expected))
    bad = [f"{k}: {tuple(actual[k])} (expected {tuple(expected[k])})"
           for k in sorted(set(actual) & set(expected)) if tuple(actual[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing {noun}(s): {_short(missing, limit)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected {noun}(s): {_short(unexpected, limit)}")
    if bad:
        problems.append(f"{len(bad)} shape mismatch(es): {_short(bad, limit)}")
    return problems


def check_params(shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, Any], config: ModelConfig,
                 where: str) -> None:
    """Refuse a tree (``path -> shape``, ``path -> dtype``) that is not exactly ``config``'s params tree.

    ``where`` (e.g. the checkpoint directory) opens the message; every problem names its paths."""
    bad_dtypes = [f"{p}: {np.dtype(d).name}" for p, d in sorted(dtypes.items())
                  if not jnp.issubdtype(np.dtype(d), jnp.floating)]
    problems = []
    scanned = any(p.startswith("layers/") for p in shapes)
    per_layer = any(p.startswith("layers_") for p in shapes)
    if (scanned and not config.scan_layers) or (per_layer and config.scan_layers):
        stored = "scanned" if scanned else "per-layer"
        problems.append(f"param layout mismatch: the params are in the {stored} layout but the config has "
                        f"scan_layers={config.scan_layers} ({param_layout(config)} layout)")
    problems += shape_problems(expected_shapes(config), shapes, "param")
    if bad_dtypes:
        problems.append(f"{len(bad_dtypes)} non-floating param(s): {_short(bad_dtypes)}")
    if problems:
        raise CheckpointError(f"{where}: params do not match the config ({config.generation}, hidden "
                              f"{config.hidden_size}, {config.num_hidden_layers} layers, "
                              f"{'MoE' if config.use_moe else 'Dense'}, vocab {config.vocab_size}):\n  - "
                              + "\n  - ".join(problems))


# ---------------------------------------------------------------------------------------------- manifest
def _leaf_bytes(x: np.ndarray) -> memoryview:
    x = np.ascontiguousarray(x)
    if x.dtype.byteorder == ">":  # hash little-endian bytes whatever the host
        x = x.byteswap().view(x.dtype.newbyteorder("<"))
    return memoryview(x.reshape(-1).view(np.uint8))


def params_checksum(params: Mapping) -> str:
    """sha256 hex over every leaf, sorted by path: for each, ``"path\\0dtype\\0shape\\0"`` then its raw
    little-endian bytes. Independent of the device, the array type (jax / numpy) and the tree's key order."""
    h = hashlib.sha256()
    for path, leaf in flatten_params(params):
        x = np.asarray(leaf)
        h.update(f"{path}\0{x.dtype.name}\0{','.join(map(str, x.shape))}\0".encode())
        h.update(_leaf_bytes(x))
    return h.hexdigest()


def _jsonable(name: str, value) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{name} must be JSON-serialisable (str, number, list, dict), got {value!r}: {e}") from None
    return value


def build_manifest(params: Mapping, config: ModelConfig, *, source: Any = None, extra: Mapping | None = None) -> dict:
    """The ``manifest.json`` contents for ``params`` (already checked against ``config``)."""
    dtypes: dict[str, int] = {}
    num_params = 0
    for _, leaf in flatten_params(params):
        name = np.dtype(leaf.dtype).name
        dtypes[name] = dtypes.get(name, 0) + 1
        num_params += int(np.prod(leaf.shape))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": _jsonable("source", source),
        "param_layout": param_layout(config),
        "dtypes": dict(sorted(dtypes.items())),
        "num_params": num_params,
        "checksum": params_checksum(params),
        "writer": {"minimind_jax": __version__, "jax": jax.__version__, "orbax_checkpoint": ocp.__version__},
    }
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise CheckpointError(f"extra must be a dict, got {type(extra).__name__}")
        manifest["extra"] = _jsonable("extra", dict(extra))
    return manifest


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a checkpoint directory (or a ``manifest.json`` file), checked to be ours."""
    path = Path(path)
    file = path / MANIFEST_FILE if path.is_dir() else path
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a minimind-jax checkpoint (no {MANIFEST_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable manifest ({e}); corrupt checkpoint") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{file}: not a minimind-jax checkpoint manifest (format {got!r}, expected {FORMAT!r})")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{file}: bad manifest version {version!r}")
    if version > VERSION:
        raise CheckpointError(f"{file}: manifest version {version} is newer than this minimind-jax reads "
                              f"({VERSION}); upgrade minimind-jax")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise CheckpointError(f"{file}: manifest lacks {missing}; corrupt checkpoint")
    if manifest["param_layout"] not in ("scanned", "per-layer"):
        raise CheckpointError(
            f"{file}: param_layout must be 'scanned' or 'per-layer', got {manifest['param_layout']!r}")
    return manifest


def check_layout(config: ModelConfig, manifest: Mapping, where: str) -> None:
    """The config's ``scan_layers`` must agree with the layout the manifest records."""
    if manifest["param_layout"] != param_layout(config):
        raise CheckpointError(
            f"{where}: param layout mismatch: {CONFIG_FILE} has scan_layers={config.scan_layers} "
            f"({param_layout(config)} layout) but {MANIFEST_FILE} records param_layout "
            f"{manifest['param_layout']!r}")


def verify_checksum(params: Mapping, manifest: Mapping, where: str) -> None:
    actual = params_checksum(params)
    if actual != manifest["checksum"]:
        raise CheckpointError(f"{where}: checksum mismatch (manifest {manifest['checksum'][:16]}..., params "
                              f"{actual[:16]}...): corrupt checkpoint")


# ---------------------------------------------------------------------------------------------- file system
def _is_scratch(path: Path) -> bool:
    return bool(_SCRATCH_RE.match(path.name))


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory holding our manifest, ``config.json`` and ``params/`` (never a save's scratch)."""
    path = Path(path)
    try:
        if not path.is_dir() or _is_scratch(path):
            return False
        read_manifest(path)
    except (CheckpointError, OSError):
        return False
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def looks_like_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory that is meant to be our checkpoint (it holds a ``manifest.json`` or ``params/``),
    intact or not: loaders read it as one so that a damaged checkpoint is reported as such."""
    path = Path(path)
    return path.is_dir() and not _is_scratch(path) and (
        (path / MANIFEST_FILE).is_file() or (path / PARAMS_DIR).is_dir())


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` (and ``root``) so a rename cannot outrun the data."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some platforms / file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc < 2.28, musl
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    # Nothing moved (a failed renameat2 changes nothing): the caller falls back to two renames, which
    # report a real problem (permissions ...) themselves. EINVAL: a file system without the flag.
    log.debug("renameat2(RENAME_EXCHANGE) failed: %s", os.strerror(ctypes.get_errno()))
    return False


def _orbax_checkpointer():
    # Synchronous on purpose: each call returns with the files on disk / the arrays read (the async
    # flavours would need wait_until_finished()).
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler())


def _save_params(directory: Path, params: dict) -> None:
    """Write a tree of numpy arrays with orbax's ``PyTreeCheckpointHandler`` (the handler under
    ``StandardCheckpointHandler``: the same OCDBT + zarr layout and ``_METADATA``, read back with
    ``StandardRestore``), configured so that saving never holds a second copy of the params:

    * numpy leaves are not deep-copied first (orbax's ``NumpyHandler`` copies every leaf up front in case
      the caller mutates it during an async save; this save is synchronous);
    * no zstd compression: tensorstore keeps the compressed chunks in memory until their OCDBT data file
      is written, and compressing costs more time than it saves space on weights.

    Measured on minimind3-moe's 757 MiB float32 tree (2 CPU cores): +0.02x of the params in memory and
    0.6 s of CPU, against +0.3-0.6x and 3.3 s with compression (701 MiB on disk instead of 757 MiB), and
    +0.9x (jax leaves) or +1.8x (numpy leaves) with the default ``StandardCheckpointHandler``.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()))  # never used (leaves are numpy); silences a warning
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False))
    try:
        ckptr.save(directory, args=ocp.args.PyTreeSave(params))
    finally:
        ckptr.close()


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _preflight(out: Path, force: bool) -> bool:
    """Whether ``out`` holds an old checkpoint to replace; refuse anything save_checkpoint must not touch."""
    if not out.exists() and not out.is_symlink():
        return False
    if not out.is_dir() or out.is_symlink():
        raise CheckpointError(f"{out} exists and is not a directory; refusing to replace it")
    if not any(out.iterdir()):
        return False
    if not force:
        raise CheckpointError(f"{out} already exists and is not empty; pass force=True (--force) to replace it")
    if not is_checkpoint(out):
        raise CheckpointError(f"{out} is not empty and not a minimind-jax checkpoint; refusing to delete it even "
                              "with force (remove it yourself if that is what you want)")
    return True


# ---------------------------------------------------------------------------------------------- save / load
def save_checkpoint(out_dir: str | os.PathLike, params: Mapping, config: ModelConfig, *, source: Any = None,
                    extra: Mapping | None = None, force: bool = False) -> Path:
    """Write ``params`` (jax or numpy arrays, exact dtypes kept) and ``config`` as a checkpoint at ``out_dir``.

    ``source`` (free text or a JSON-able dict, e.g. the file it was converted from) and ``extra`` go into the
    manifest. An existing non-empty ``out_dir`` is replaced only with ``force=True`` and only if it is itself
    a checkpoint. The write is atomic (see the module doc). Returns the checkpoint's path.
    """
    if not isinstance(config, ModelConfig):
        raise CheckpointError(f"config must be a ModelConfig, got {type(config).__name__}")
    out = Path(os.path.abspath(os.fspath(out_dir)))
    if _is_scratch(out):
        raise CheckpointError(f"{out}: names like '.NAME.tmp-*' / '.NAME.old-*' are reserved for save scratch")
    if jax.process_count() > 1:
        raise CheckpointError(f"{out}: save_checkpoint writes from one process; in a multi-process job save the "
                              "full state with the training CheckpointManager")
    replace = _preflight(out, force)

    flat = [(path, _to_host(path, leaf)) for path, leaf in flatten_params(params)]
    check_params({p: x.shape for p, x in flat}, {p: x.dtype for p, x in flat}, config, where=str(out))
    host = _unflatten(flat)  # plain nested dicts of arrays (restore always reads them back as numpy)
    manifest = build_manifest(host, config, source=source, extra=extra)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old: Path | None = None
    try:
        _save_params(tmp / PARAMS_DIR, host)
        config.to_json(tmp / CONFIG_FILE)
        _write_json(tmp / MANIFEST_FILE, manifest)
        _fsync_tree(tmp)
        if not replace:
            try:
                _rename(tmp, out)  # onto nothing or an empty directory: atomic
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise CheckpointError(f"{out} appeared (not empty) while this checkpoint was being written; "
                                      "nothing was replaced") from None
        elif _exchange(tmp, out):
            old, tmp = tmp, None  # tmp now holds the previous checkpoint
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            _rename(out, old)  # onto the empty placeholder
            try:
                _rename(tmp, out)
            except BaseException:
                previous, old = old, None  # never deleted below, even if putting it back fails
                _rename(previous, out)
                raise
        tmp = None
        _fsync_dir(out.parent)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s (%s params, %s, %s)", out, f"{manifest['num_params']:,}",
             manifest["param_layout"], manifest["dtypes"])
    return out


def _resolve_dtype(dtype) -> np.dtype:
    try:
        resolved = np.dtype(jnp.dtype(dtype))
    except TypeError:
        raise CheckpointError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}") from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise CheckpointError(f"dtype must be a floating type (float32, bfloat16, float16), got {resolved.name}")
    return resolved


def load_checkpoint(path: str | os.PathLike, *, dtype=None, verify: bool = True,
                    as_numpy: bool = False) -> tuple[ModelConfig, dict]:
    """Read a checkpoint written by ``save_checkpoint``: ``(config, params)``.

    Params come back as ``jax.Array`` on the default device (numpy arrays with ``as_numpy=True``, e.g. for
    the converter, which then never holds a second copy), in the stored dtypes unless ``dtype``
    (``"float32"`` / ``"bfloat16"`` / ``"float16"`` or a numpy / jnp dtype) asks for an explicit cast of
    every floating leaf. ``verify`` recomputes the manifest's checksum (catches silent corruption that
    orbax's storage layer does not). Every failure is a ``CheckpointError`` naming the directory.
    """
    path = Path(os.path.abspath(os.fspath(path)))
    target = _resolve_dtype(dtype) if dtype is not None else None
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (a checkpoint is a directory holding {PARAMS_DIR}/, "
                              f"{CONFIG_FILE} and {MANIFEST_FILE})")
    if _is_scratch(path):
        raise CheckpointError(f"{path}: a scratch directory left by an interrupted save_checkpoint, not a "
                              "checkpoint; delete it")
    manifest = read_manifest(path)
    missing = [name for name, ok in ((CONFIG_FILE, (path / CONFIG_FILE).is_file()),
                                     (PARAMS_DIR + "/", (path / PARAMS_DIR).is_dir())) if not ok]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    try:
        config = ModelConfig.from_json(path / CONFIG_FILE)
    except ConfigError as e:
        raise CheckpointError(f"{path}: bad {CONFIG_FILE}: {e}") from None
    check_layout(config, manifest, str(path))

    params_dir = path / PARAMS_DIR
    flat = _restore_params(params_dir, config)
    params = _unflatten(flat)
    if verify:
        verify_checksum(params, manifest, str(path))

    if target is not None:
        casts: dict[str, int] = {}
        for i, (p, x) in enumerate(flat):
            if x.dtype != target:
                casts[x.dtype.name] = casts.get(x.dtype.name, 0) + 1
                flat[i] = (p, x.astype(target))
        if casts:
            log.info("%s: cast %s to %s on load", path,
                     ", ".join(f"{n} {name} tensor(s)" for name, n in sorted(casts.items())), target.name)
        params = _unflatten(flat)
    return config, (params if as_numpy else jax.device_put(params))


# Params are restored this many bytes at a time: tensorstore reads every requested array at once, each
# through a chunk buffer of its own, so one restore of the whole tree sometimes held +0.5x of it on top.
_RESTORE_BATCH_BYTES = 64 << 20


def _batches(stored: list[tuple[str, Any]], limit: int) -> Iterator[list[tuple[str, Any]]]:
    """Consecutive runs of ``(path, array metadata)`` of at least ``limit`` bytes each (the last may be less)."""
    batch, nbytes = [], 0
    for path, meta in stored:
        batch.append((path, meta))
        nbytes += int(np.prod(meta.shape)) * np.dtype(meta.dtype).itemsize
        if nbytes >= limit:
            yield batch
            batch, nbytes = [], 0
    if batch:
        yield batch


def _restore_params(params_dir: Path, config: ModelConfig) -> list[tuple[str, np.ndarray]]:
    """Read orbax's metadata, check the tree against ``config`` before reading any data, then restore as
    numpy in batches of about ``_RESTORE_BATCH_BYTES`` (orbax partial restores of the same files).
    Orbax / tensorstore failures become ``CheckpointError`` naming the directory."""
    where = str(params_dir.parent)
    ckptr = _orbax_checkpointer()
    try:
        try:
            metadata = ckptr.metadata(params_dir).item_metadata
        except Exception as e:  # noqa: BLE001 - orbax raises many types; all mean the same thing here
            raise CheckpointError(f"{where}: unreadable {PARAMS_DIR}/ metadata ({type(e).__name__}: {e}); "
                                  "truncated or corrupt checkpoint") from e
        if metadata is None or getattr(metadata, "tree", None) is None:  # orbax only logs a warning here
            raise CheckpointError(f"{where}: unreadable {PARAMS_DIR}/ metadata (missing or damaged orbax "
                                  "files); truncated or corrupt checkpoint")
        stored = flatten_params(metadata.tree)
        check_params({p: tuple(m.shape) for p, m in stored}, {p: m.dtype for p, m in stored}, config, where)
        flat: list[tuple[str, np.ndarray]] = []
        for batch in _batches(stored, _RESTORE_BATCH_BYTES):
            # A ShapeDtypeStruct target without sharding restores a plain numpy array in the stored dtype.
            item = _unflatten((q, jax.ShapeDtypeStruct(tuple(b.shape), b.dtype)) for q, b in batch)
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
            try:
                restored = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True))
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{where}: cannot read {PARAMS_DIR}/ ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:500] if str(e) else ''}); truncated or corrupt "
                                      "checkpoint") from e
            flat += [(q, np.asarray(x)) for q, x in flatten_params(restored)]
    finally:
        ckptr.close()
    if [(p, x.shape, x.dtype) for p, x in flat] != [(p, tuple(m.shape), m.dtype) for p, m in stored]:
        raise CheckpointError(f"{where}: restored params differ in structure from {PARAMS_DIR}/ metadata")
    return flat
