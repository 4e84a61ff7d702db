"""Packed rows: documents laid end to end in rows of exactly ``max_seq_len`` tokens, with the segment ids and
positions that let the model attend within each document only.

A packed row carries, besides ``input_ids`` and ``labels`` (int32, ``max_seq_len`` each):

* ``segment_ids`` — 1, 2, ... for the documents of the row in order (the row's leading part of a document cut
  by the previous row included, as segment 1);
* ``positions`` — each token's position in its segment, from 0 at the segment's first token in the row (the
  leading part of a cut document restarts at 0 too: each segment is what the model would see run alone).

Given both (:data:`PACK_KEYS`; ``MiniMindLM(..., segment_ids=, position_ids=positions)``), a token attends only to
the earlier tokens of its own segment and each segment's logits equal those of the segment run alone, so a
packed row trains exactly what its documents train unpacked, without the padding. Without them the row is
plain causal over the whole row (a document sees the end of the previous one).

Pretrain (:func:`pretrain_row`): the token stream ``bos doc_0 eos bos doc_1 eos ...`` (the layout of an unpacked
row and of a generation prompt) cut into rows; the label at every bos is -100, so no document's eos learns to
predict the next document's bos and the trained targets are exactly those of the unpacked rows (each
document's tokens and its eos).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from minimind_jax.data.samples import IGNORE_INDEX

__all__ = ["PACK_KEYS", "stream_ends", "pretrain_row", "packed_kwargs", "reads_packed_rows"]

PACK_KEYS = ("segment_ids", "positions")


def stream_ends(offsets: np.ndarray) -> np.ndarray:
    """The stream end (exclusive) of each document in ``bos doc_0 eos bos doc_1 eos ...``: ``offsets[d + 1] +
    2 (d + 1)`` for document ``d`` of ``tokens[offsets[d]:offsets[d + 1]]``."""
    return offsets[1:] + 2 * np.arange(1, len(offsets), dtype=np.int64)


def pretrain_row(tokens: np.ndarray, offsets: np.ndarray, ends: np.ndarray, index: int, seq: int, *,
                 bos_id: int, eos_id: int) -> dict[str, np.ndarray]:
    """Row ``index`` (``seq`` tokens) of the bos / eos framed stream of the documents ``tokens[offsets[d]:
    offsets[d + 1]]`` (``ends`` = :func:`stream_ends` of ``offsets``), with its labels, segment ids and
    positions (see the module docstring). Reads only the row's own slice of ``tokens`` (a memmap stays lazy)."""
    s = np.arange(index * seq, (index + 1) * seq, dtype=np.int64)
    first = int(np.searchsorted(ends, s[0], side="right"))
    last = int(np.searchsorted(ends, s[-1], side="right"))
    d = first + np.searchsorted(ends[first: last + 1], s, side="right")
    length = offsets[d + 1] - offsets[d]
    begin = ends[d] - length - 2  # the stream position of document d's bos
    local = s - begin  # 0: the bos, 1..length: the document's tokens, length + 1: the eos
    src = offsets[d] + local - 1
    is_text = (local >= 1) & (local <= length)
    ids = np.where(local == 0, bos_id, eos_id).astype(np.int32)
    if is_text.any():
        lo, hi = int(src[is_text].min()), int(src[is_text].max()) + 1
        ids[is_text] = np.asarray(tokens[lo:hi], np.int32)[src[is_text] - lo]
    labels = np.where(local == 0, IGNORE_INDEX, ids).astype(np.int32)
    segment_ids = (d - first + 1).astype(np.int32)
    positions = (s - np.maximum(begin, s[0])).astype(np.int32)
    return {"input_ids": ids, "labels": labels, "segment_ids": segment_ids, "positions": positions}


def packed_kwargs(batch: Mapping) -> dict:
    """The model's keyword arguments for a (micro-)batch: ``segment_ids`` and ``position_ids`` when the batch
    carries :data:`PACK_KEYS` (document-aware attention), else none (plain causal attention)."""
    if "segment_ids" not in batch:
        return {}
    return {"segment_ids": batch["segment_ids"], "position_ids": batch["positions"]}


def reads_packed_rows(paths: Sequence[str | os.PathLike]) -> bool:
    """Whether the pipeline over ``paths`` yields packed pretrain rows: one prepared directory whose meta.json
    records a default packing (``pack_max_seq_len``; :class:`~minimind_jax.data.prepared.PreparedSource` then
    packs). Reads meta.json only (the reader, which imports this module, checks the rest when it opens)."""
    if len(paths) != 1:
        return False
    meta_path = os.path.join(os.fspath(paths[0]), "meta.json")
    if not os.path.isfile(meta_path):
        return False
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # a damaged directory: the reader names the problem when the pipeline opens it
    return isinstance(meta, dict) and meta.get("pack_max_seq_len") is not None
