"""The one explicit dtype table of the converter, and the casts it is allowed to make.

Every tensor that is loaded or exported ends in the dtype the user asked for, by this table; each cast
is recorded so that the CLI can report it. numpy has no bfloat16: ``ml_dtypes.bfloat16`` stands in
(its float32 -> bfloat16 cast rounds to nearest even, as ``torch.Tensor.to(torch.bfloat16)`` does).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_dtypes
import numpy as np

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


@dataclasses.dataclass(frozen=True)
class DType:
    name: str  # our name, also torch's (torch.float32 ...) and transformers' config value
    numpy: Any  # numpy / ml_dtypes scalar type
    safetensors: str  # dtype code in a safetensors header


TABLE: dict[str, DType] = {
    "float32": DType("float32", np.float32, "F32"),
    "bfloat16": DType("bfloat16", ml_dtypes.bfloat16, "BF16"),
    "float16": DType("float16", np.float16, "F16"),
}
# Spellings found in configs and on command lines.
ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
           "torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}


class DTypeError(ValueError):
    """An unknown dtype name, a non-floating tensor, or a value float16 cannot hold."""


def canonical(name: Any) -> str:
    """'float32' | 'bfloat16' | 'float16' for any accepted spelling or numpy / jax dtype."""
    if not isinstance(name, str):
        try:
            name = np.dtype(name).name
        except TypeError:
            name = str(name)
    key = ALIASES.get(name, name)
    if key not in TABLE:
        raise DTypeError(f"unsupported dtype {name!r}; choose one of {', '.join(TABLE)}")
    return key


def name_of(array: Any) -> str:
    """The table name of an array's dtype; a clear error for non-floating tensors."""
    dtype = np.dtype(array.dtype)
    if dtype.name in TABLE:
        return dtype.name
    raise DTypeError(f"dtype {dtype.name} is not a float32 / bfloat16 / float16 tensor")


def resolve(requested: str | None, source_config: Mapping[str, Any] | None, stored: Mapping[str, int],
            default: str = "float32") -> tuple[str, str]:
    """(dtype, why) for a load. ``auto`` follows the source config's ``torch_dtype`` / ``dtype``, then the
    dtype most tensors are stored in; ``None`` means ``default`` (float32, for training)."""
    if requested is None:
        return default, f"default ({default})"
    if requested != "auto":
        return canonical(requested), "requested"
    for key in ("torch_dtype", "dtype"):
        value = (source_config or {}).get(key)
        if value:
            return canonical(value), f"auto: the source config's {key}"
    if stored:
        most = max(stored.items(), key=lambda kv: kv[1])[0]
        return canonical(most), "auto: the dtype most tensors are stored in (no dtype in the source config)"
    return default, f"auto: nothing to follow, default {default}"


@dataclasses.dataclass
class CastLog:
    """Every cast made, by (from, to) -> tensor names; printed by the CLI."""

    casts: dict[tuple[str, str], list[str]] = dataclasses.field(default_factory=dict)
    clipped: list[str] = dataclasses.field(default_factory=list)

    def add(self, name: str, src: str, dst: str) -> None:
        self.casts.setdefault((src, dst), []).append(name)

    def lines(self) -> list[str]:
        # Name the tensors (not only a count): a reader must see *which* ones were cast, e.g. float32
        # expert weights in a bfloat16 checkpoint.
        out = [f"cast {len(names)} tensor(s) {src} -> {dst}: {', '.join(names[:8])}"
               + (f" ... ({len(names) - 8} more)" if len(names) > 8 else "")
               for (src, dst), names in sorted(self.casts.items())]
        if self.clipped:
            out.append(f"clipped {len(self.clipped)} tensor(s) to the float16 range: {', '.join(self.clipped[:8])}"
                       + (" ..." if len(self.clipped) > 8 else ""))
        return out or ["no casts: every tensor was already in the target dtype"]


def cast_all(tensors: Mapping[str, np.ndarray], target: str, log: CastLog | None = None,
             clip_fp16: bool = False, *, in_place: bool = False, where: str = "") -> dict[str, np.ndarray]:
    """Cast every tensor to ``target`` (explicitly, recorded in ``log``).

    Casting to float16 refuses values beyond +-65504 (they would become inf) and names every offending
    tensor, unless ``clip_fp16`` clips them to the range (also recorded); NaN / inf values are refused for
    float16, ``clip_fp16`` or not (clipping cannot make a NaN finite, and an inf weight is a broken
    checkpoint, not a large one), with ``where`` (the source) leading the error. bfloat16 and float32
    keep every bit pattern (inf and NaN included, rounded as torch rounds them). ``in_place=True``
    replaces the entries of ``tensors`` (a dict) one by one and returns it: each stored array is freed as
    soon as its cast exists, so a cast never holds the whole checkpoint twice.
    """
    target = canonical(target)
    log = log if log is not None else CastLog()
    if target == "float16":
        check_finite(tensors, where)
    dst = TABLE[target].numpy
    out, too_big = (tensors if in_place else {}), []
    for name, arr in tensors.items():
        src = name_of(arr)
        if src == target:
            out[name] = arr
            continue
        if target == "float16":
            peak = float(np.max(np.abs(arr.astype(np.float32)))) if arr.size else 0.0
            if peak > FLOAT16_MAX:
                if not clip_fp16:
                    too_big.append(f"{name} (max |value| {peak:.4g})")
                    continue
                arr = np.clip(arr.astype(np.float32), -FLOAT16_MAX, FLOAT16_MAX)
                log.clipped.append(name)
        # float16 -> bfloat16 goes through float32 (exact), then rounds to nearest even once.
        wide = arr.astype(np.float32) if src != "float32" else arr
        out[name] = wide.astype(dst)
        log.add(name, src, target)
    if too_big:
        raise DTypeError(f"{len(too_big)} tensor(s) exceed the float16 range (+-{FLOAT16_MAX:.0f}) and would "
                         f"become inf: {', '.join(too_big)}; export as bfloat16/float32 or pass --clip-fp16")
    return out


def non_finite(tensors: Mapping[str, Any]) -> dict[str, int]:
    """Tensor name -> number of NaN / inf values, for every tensor that holds any."""
    bad = {}
    for name, arr in tensors.items():
        count = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if count:
            bad[name] = count
    return bad


def check_finite(tensors: Mapping[str, Any], where: str = "") -> None:
    """Raise a ``DTypeError`` naming every tensor that holds NaN / inf (``where``: the file, for the message)."""
    bad = non_finite(tensors)
    if bad:
        listed = ", ".join(f"{name} ({count} of {tensors[name].size} values)" for name, count in list(bad.items())[:8])
        more = f" ... ({len(bad) - 8} more)" if len(bad) > 8 else ""
        raise DTypeError(f"{where + ': ' if where else ''}{len(bad)} tensor(s) hold NaN or inf: {listed}{more}; "
                         "the weights are broken (a diverged run?): convert an earlier checkpoint "
                         "(`python -m convert inspect PATH` lists every non-finite tensor)")


def summary(tensors: Mapping[str, Any]) -> dict[str, int]:
    """Number of tensors per dtype name."""
    counts: dict[str, int] = {}
    for arr in tensors.values():
        key = np.dtype(arr.dtype).name
        counts[key] = counts.get(key, 0) + 1
    return counts
