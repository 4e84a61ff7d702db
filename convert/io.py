"""Reading and writing PyTorch checkpoints as numpy: safetensors (single or sharded HF), MiniMind ``.pth``.

Readers return ``(tensors, source_config)``: tensor name -> numpy array in the stored dtype (bf16 as
``ml_dtypes.bfloat16``), and the parsed ``config.json`` found beside the weights (or None). safetensors
files are validated with ``safetensors.safe_open`` and read with plain file reads, no torch needed; ``.pth``
needs torch (``torch.load(weights_only=True)``), and bf16 tensors are moved through an int16 view, never
through ``Tensor.numpy()``. Writers are atomic: a temporary sibling directory, renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors import safe_open

from convert.dtypes import TABLE, DTypeError, name_of


class CheckpointReadError(ValueError):
    """A source that cannot be read: missing, unsupported, truncated or corrupt, or holding non-float tensors."""


def describe_source(src: str | os.PathLike) -> str:
    """What kind of source ``src`` is: 'safetensors', 'sharded-safetensors', 'pth', or raise."""
    path = Path(src)
    if not path.exists():
        raise CheckpointReadError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "model.safetensors.index.json").is_file():
            return "sharded-safetensors"
        if (path / "model.safetensors").is_file():
            return "safetensors"
        pths = sorted(path.glob("*.pth"))
        if len(pths) == 1:
            return "pth"
        raise CheckpointReadError(
            f"{path}: no model.safetensors, model.safetensors.index.json or single .pth file in this directory")
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix in (".pth", ".pt", ".bin"):
        return "pth"
    raise CheckpointReadError(f"{path}: unsupported file type {path.suffix!r} (expected .safetensors or .pth)")


def _weights_file(path: Path, kind: str) -> Path:
    if path.is_file():
        return path
    if kind == "safetensors":
        return path / "model.safetensors"
    if kind == "pth":
        return sorted(path.glob("*.pth"))[0]
    return path / "model.safetensors.index.json"


def read_source_config(src: str | os.PathLike) -> tuple[dict | None, Path | None]:
    """The ``config.json`` beside the weights (in the directory, or next to the file), if any."""
    path = Path(src)
    folder = path if path.is_dir() else path.parent
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None, None
    try:
        raw = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointReadError(f"{cfg}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise CheckpointReadError(f"{cfg}: expected a JSON object (a model config), got a {type(raw).__name__}")
    return raw, cfg


def read_tensors(src: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as numpy, in its stored dtype."""
    path = Path(src)
    kind = describe_source(path)
    weights = _weights_file(path, kind)
    if kind == "safetensors":
        tensors = _read_safetensors(weights)
    elif kind == "sharded-safetensors":
        tensors = _read_sharded(weights)
    else:
        tensors = _read_pth(weights)
    for name, arr in tensors.items():
        try:
            name_of(arr)
        except DTypeError as e:
            raise CheckpointReadError(f"{weights}: tensor {name!r}: {e}") from None
    return tensors


# safetensors dtype codes of tensors we refuse (named in the error as numpy names them).
_NON_FLOAT = {"F64": "float64", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
              "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
              "F8_E5M2": "float8_e5m2"}
_CODES = {d.safetensors: d for d in TABLE.values()}


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """Each tensor read with plain file reads into its own numpy array.

    ``safe_open`` first validates the file (header, offsets against the file size); its ``get_tensor`` is
    not used for the data: it copies out of a memory map whose pages stay resident until the file is
    closed, so a whole checkpoint would count twice in the process's memory.
    """
    try:
        with safe_open(os.fspath(file), framework="numpy"):
            pass
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            tensors = {}
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                code = info["dtype"]
                if code not in _CODES:
                    raise CheckpointReadError(f"{file}: tensor {name!r}: dtype {_NON_FLOAT.get(code, code)} is not "
                                              "a float32 / bfloat16 / float16 tensor")
                begin, end = info["data_offsets"]
                buf = np.empty(end - begin, np.uint8)
                f.seek(8 + size + begin)
                if f.readinto(buf) != buf.size:
                    raise CheckpointReadError(f"{file}: truncated while reading tensor {name!r}")
                # safetensors data is little-endian
                dtype = np.dtype(_CODES[code].numpy).newbyteorder("<")
                tensors[name] = buf.view(dtype).reshape(info["shape"])
            return tensors
    except CheckpointReadError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt headers
        raise CheckpointReadError(f"{file}: cannot read as safetensors (truncated or corrupt?): {e}") from None


def _read_sharded(index_file: Path) -> dict[str, np.ndarray]:
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointReadError(f"{index_file}: not a safetensors index (need a 'weight_map'): {e}") from None
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_file.parent / shard
        if not shard_path.is_file():
            raise CheckpointReadError(f"{index_file}: shard {shard} is missing")
        tensors.update(_read_safetensors(shard_path))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointReadError(f"{index_file}: tensors listed in the index but absent from the shards: "
                                  f"{', '.join(missing[:8])}")
    return tensors


def _read_pth(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointReadError(
            f"{file}: reading MiniMind .pth files needs PyTorch: pip install -e '.[torch]' "
            "(or convert it to safetensors elsewhere)") from None
    try:
        state = torch.load(os.fspath(file), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointReadError(f"{file}: cannot load with torch.load(weights_only=True) (truncated, corrupt, "
                                  f"or not a plain state dict?): {_torch_load_reason(e)}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a resume checkpoint ({"model": ..., "optimizer": ...})
    if not isinstance(state, dict):
        raise CheckpointReadError(f"{file}: expected a state dict (name -> tensor), got {type(state).__name__}")
    out = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointReadError(f"{file}: entry {name!r} is a {type(value).__name__}, not a tensor")
        out[name] = torch_to_numpy(value)
    return out


def _torch_load_reason(e: Exception) -> str:
    """torch.load's error in one line: its weights-only failures are paragraphs of advice (including loading
    with ``weights_only=False``, which can run code from the file) around a one-line reason."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            rest = line.split("WeightsUnpickler error", 1)[1].lstrip(": ")
            reason = rest or (lines[i + 1] if i + 1 < len(lines) else "")
            return f"{type(e).__name__}: {reason}" if reason else type(e).__name__
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor as numpy without changing a bit (bf16 via an int16 view)."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


# ------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out`` in one rename.

    An existing ``out`` is refused unless ``force``; with ``force`` the old directory is moved aside and
    deleted only after the new one is in place. On any exception the temporary directory is removed and
    ``out`` is left as it was.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force (force=True) to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None  # a hidden sibling holding the previous OUT while it is replaced
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "previous")
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                # The previous OUT was moved aside: put it back before reporting the failure (if even that
                # fails, it stays in ``old``, which is then kept).
                os.replace(old / "previous", out)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not (old / "previous").exists():
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_safetensors(file: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Write a safetensors file tensor by tensor.

    ``safetensors.numpy.save_file`` first turns every tensor into a Python ``bytes`` object (a second
    copy of the whole checkpoint in memory); streaming keeps the extra memory to one tensor. The format
    is the library's: little-endian u64 header length, a JSON header (dtype, shape, data_offsets; padded
    with spaces to 8 bytes), then the raw little-endian data. The library reads the result back in tests.
    """
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    names = sorted(tensors)
    for name in names:
        arr = tensors[name]
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": TABLE[name_of(arr)].safetensors, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            arr = np.ascontiguousarray(tensors[name])
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            f.write(arr.reshape(-1).view(np.uint8).data)


def write_pth(file: Path, tensors: Mapping[str, np.ndarray]) -> None:
    try:
        import torch
    except ImportError:
        raise RuntimeError("writing .pth files needs PyTorch: pip install -e '.[torch]'") from None
    state = {}
    with warnings.catch_warnings():  # read-only numpy buffers are fine: torch.save only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, arr in tensors.items():
            if arr.dtype == ml_dtypes.bfloat16:
                state[name] = torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
            else:
                state[name] = torch.from_numpy(np.ascontiguousarray(arr))
    torch.save(state, os.fspath(file))


def write_json(file: Path, data: Any) -> None:
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
