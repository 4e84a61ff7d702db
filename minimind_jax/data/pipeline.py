"""grain input pipelines for every stage (pretrain text, conversations, DPO pairs, RL prompts): jsonl -> shard ->
shuffle -> repeat -> transform -> batch.

:func:`make_dataset` builds a ``grain.MapDataset`` chain::

    MapDataset.source(JsonlSource)            validated records, file order
      .map_with_index(-> (record_index, record))
      [shard_index::shard_count]              this process's disjoint slice (every shard_count-th record)
      .shuffle(seed)                          deterministic by seed (a full-dataset permutation per shard)
      .repeat(epochs)                         reshuffled each epoch (grain's reseed_each_epoch)
      .map_with_index(transform)              samples.encode_*; the augmentation rng is derived from
                                              (seed, epoch, record_index) only, so results do not depend on the
                                              number of workers, the prefetching or the sharding
      .batch(batch_size, drop_remainder=True) dict of int32 numpy arrays, each (batch_size, max_seq_len)
                                              (reason data: also float32 loss_weights)

and wraps it in a :class:`DataPipeline`. ``iter(pipeline)`` (or ``pipeline.iterator()``) gives a grain
``DatasetIterator`` (``MapDataset.to_iter_dataset``) whose ``get_state()`` / ``set_state()`` save and restore the
position: an iterator restored from a state continues with exactly the batch that followed it. The state is a
small dict (``{"next_index": n}``); ``pipeline.iterator(state)`` restores directly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import absl.flags
import grain
import numpy as np

from minimind_jax.data.jsonl import DataError, JsonlSource, ReadStats, canonical_stage
from minimind_jax.data.prepared import PreparedSource, is_prepared_dir
from minimind_jax.data.prepared_chat import PreparedChatSource, open_prepared
from minimind_jax.data.rl_prompts import encode_rl_prompt, prompt_from_record
from minimind_jax.data.samples import (
    IGNORE_INDEX,
    REASON_TAGS,
    ChatMarkers,
    Encoded,
    encode_dpo,
    encode_pretrain,
    encode_sft,
    tag_weights,
)

__all__ = ["DataPipeline", "make_dataset", "make_transform", "untrained", "PROBE_RECORDS"]

RL_STAGES = ("rlaif", "agent")  # prompts for rollouts: their batches also carry each prompt's record_index
PROBE_RECORDS = 32  # chat records transformed when a pipeline is built, to catch data that would train nothing
_log = logging.getLogger(__name__)


def untrained(arrays: dict[str, np.ndarray]) -> bool:
    """Whether a transformed chat sample has a labels array with no trained token (every reply past the cut)."""
    return any(not np.any(v != IGNORE_INDEX) for k, v in arrays.items() if k.endswith("labels"))


def _encode(transform, source, record_index: int, record: dict, rng) -> Encoded:
    try:
        return transform(record, rng)
    except Exception as e:
        raise DataError(f"{source.location(record_index)}: cannot transform the record: "
                        f"{type(e).__name__}: {e}") from e


def _probe(stage: str, ds: grain.MapDataset, transform, source, max_seq_len: int, seed: int) -> None:
    """Transform the shard's first records: a DataError when none of them has a trained token, a warning when
    most have none (chat data whose assistant replies lie past ``max_seq_len`` trains at loss 0 otherwise)."""
    if stage == "pretrain":
        return
    n = min(PROBE_RECORDS, len(ds))
    rng = np.random.default_rng(seed % 2**64)
    empty = [index for index, record in (ds[k] for k in range(n))
             if untrained(_encode(transform, source, index, record, rng).arrays)]
    where = f"{source.location(empty[0])}" if empty else ""
    advice = (f"every assistant reply starts past max_seq_len={max_seq_len} tokens, so nothing is trained; "
              "raise max_seq_len or shorten the prompts")
    if len(empty) == n:
        raise DataError(f"{where}: none of the first {n} records has a trained token: {advice}")
    if 2 * len(empty) > n:
        _log.warning("%s: %d of the first %d records have no trained token (%s)", where, len(empty), n, advice)


def make_transform(stage: str, tokenizer, max_seq_len: int, *, add_system_prompt_prob: float = 0.0,
                   drop_empty_think_prob: float = 0.0, special_token_weight: float | None = None,
                   weighted_tags: tuple[str, ...] = REASON_TAGS, thinking_ratio: float = 0.5):
    """``fn(record, rng) -> samples.Encoded`` for ``stage`` (``rng`` may be None when no augmentation is on).

    ``special_token_weight`` (chat data only) adds ``loss_weights`` (float32): that weight on the trained tokens
    of ``weighted_tags`` (reasoning distillation), 1 on the other trained tokens, 0 elsewhere.

    RL prompts (rlaif / agent) become ``prompt_ids`` / ``prompt_length`` (:func:`rl_prompts.encode_rl_prompt`:
    the generation prompt, left-truncated to ``max_seq_len``; rlaif prompts open thinking with probability
    ``thinking_ratio`` and get a random system prompt with ``add_system_prompt_prob``)."""
    stage = canonical_stage(stage)
    if special_token_weight is not None:
        if stage != "sft":
            raise ValueError(f"special_token_weight applies to chat (sft / reason) data, not {stage}")
        inner = make_transform(stage, tokenizer, max_seq_len, add_system_prompt_prob=add_system_prompt_prob,
                               drop_empty_think_prob=drop_empty_think_prob)
        tag_ids = [tokenizer.encode(tag, add_special_tokens=False) for tag in weighted_tags]

        def weighted(record, rng):
            enc = inner(record, rng)
            w = tag_weights(enc.arrays["input_ids"], enc.arrays["labels"], tag_ids, special_token_weight)
            return Encoded({**enc.arrays, "loss_weights": w}, enc.truncated)

        return weighted
    probs = {"add_system_prompt_prob": add_system_prompt_prob, "drop_empty_think_prob": drop_empty_think_prob}
    for name, p in probs.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if stage == "pretrain":
        if add_system_prompt_prob or drop_empty_think_prob:
            raise ValueError("chat augmentations do not apply to pretrain data")
        return lambda record, rng: encode_pretrain(record, tokenizer, max_seq_len)
    markers = ChatMarkers.from_tokenizer(tokenizer)
    if stage == "sft":
        return lambda record, rng: encode_sft(
            record, tokenizer, max_seq_len, markers=markers, rng=rng, add_system_prompt_prob=add_system_prompt_prob,
            drop_empty_think_prob=drop_empty_think_prob)
    if stage in RL_STAGES:
        if drop_empty_think_prob:
            raise ValueError("drop_empty_think_prob does not apply to RL prompts (they have no reply)")
        return lambda record, rng: encode_rl_prompt(
            prompt_from_record(record, stage), tokenizer, max_seq_len, rng=rng,
            add_system_prompt_prob=add_system_prompt_prob, thinking_ratio=thinking_ratio)
    if add_system_prompt_prob:
        raise ValueError("add_system_prompt_prob does not apply to DPO data (MiniMind adds none there)")
    return lambda record, rng: encode_dpo(record, tokenizer, max_seq_len, markers=markers, rng=rng,
                                          drop_empty_think_prob=drop_empty_think_prob)


@dataclasses.dataclass
class DataPipeline:
    """A batched grain dataset plus what it was built from.

    ``dataset`` is the ``grain.MapDataset`` of batches (``len`` = batches per process; None-length when
    ``epochs`` is None, i.e. endless); ``source`` the :class:`JsonlSource`; ``stats`` its :class:`ReadStats`
    (``truncated`` / ``transformed`` / ``untrained`` count the samples transformed in this process so far,
    prefetching included;
    transforms run in ``mp_prefetch`` worker processes are not counted here).

    The batches do not depend on the number of prefetch threads or worker processes: ``dataset.to_iter_dataset()
    .mp_prefetch(grain.MultiprocessingOptions(num_workers=n))`` yields the same batches as ``iter(self)``.
    """

    dataset: grain.MapDataset
    source: JsonlSource
    stats: ReadStats
    stage: str
    batch_size: int
    max_seq_len: int
    examples_per_epoch: int
    read_options: Any = None

    def __len__(self) -> int:
        return len(self.dataset)

    def iterator(self, state: dict | None = None, workers: int = 0) -> grain.DatasetIterator:
        """A fresh checkpointable iterator over the batches, restored to ``state`` when given; with ``workers``
        grain worker processes making the batches (the same ones; its state has another form)."""
        ds = self.dataset.to_iter_dataset(self.read_options)
        if workers:
            if not absl.flags.FLAGS.is_parsed():  # grain's workers read its absl flags; scripts parse none
                absl.flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        it = iter(ds)
        if state is not None:
            it.set_state(state)
        return it

    def __iter__(self):
        return self.iterator()


def _check_sizes(batch_size: int, shard_index: int, shard_count: int, epochs: int | None) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index} and {shard_count}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be positive or None, got {epochs}")


def _open_source(stage: str, paths, source, skip_bad_lines: bool):
    """``source`` checked against ``stage``, or the source ``paths`` name: one prepared directory or jsonl files."""
    if source is not None:
        if source.stage != stage:
            raise ValueError(f"source holds {source.stage} data, not {stage}")
        return source
    path_list = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if len(path_list) == 1 and is_prepared_dir(path_list[0]):
        return open_prepared(path_list[0], stage)  # a DataError when prepared for another stage
    if any(is_prepared_dir(p) for p in path_list):
        raise ValueError("give one prepared data directory at a time (or prepare the files together)")
    return JsonlSource(paths, stage, skip_bad_lines=skip_bad_lines)


def _sample_fn(stage: str, transform, source, *, seed: int, per_epoch: int, augment: bool):
    """``fn(position, (record_index, record)) -> arrays``: one sample, its augmentations drawn from an rng seeded by
    (seed, epoch, record index), counted in ``source.stats``."""
    stats = source.stats

    def apply(position: int, item: tuple[int, dict]) -> dict[str, np.ndarray]:
        record_index, record = item
        rng = None
        if augment:
            rng = np.random.default_rng([seed % 2**64, position // per_epoch, record_index])
        encoded = _encode(transform, source, record_index, record, rng)
        stats.count_sample(encoded.truncated, stage != "pretrain" and untrained(encoded.arrays))
        if stage in RL_STAGES:  # the rollout's rewards read the record (its gt) back by this index
            return {**encoded.arrays, "record_index": np.int32(record_index)}
        return encoded.arrays

    return apply


def make_dataset(
    stage: str, paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer, max_seq_len: int, batch_size: int,
    *, seed: int = 0, epochs: int | None = 1, shuffle: bool = True, shard_index: int = 0, shard_count: int = 1,
    skip_bad_lines: bool = False, add_system_prompt_prob: float = 0.0, drop_empty_think_prob: float = 0.0,
    read_options: grain.ReadOptions | None = None, source: JsonlSource | PreparedSource | None = None,
    special_token_weight: float | None = None, thinking_ratio: float = 0.5,
) -> DataPipeline:
    """The batched pipeline for ``stage`` ("pretrain", "sft" (also "reason" / "lora"), "dpo", RL prompts "rlaif" /
    "agent"); see module docstring.
    ``special_token_weight`` adds per-token ``loss_weights`` to chat batches (see :func:`make_transform`).

    ``shard_index`` / ``shard_count`` (e.g. ``jax.process_index()`` / ``jax.process_count()``) give each process
    the records ``shard_index, shard_index + shard_count, ...``: disjoint, together all of them (shards may differ
    by one record, so by one batch: bound training by steps). ``epochs=None`` repeats forever.
    ``read_options`` (``grain.ReadOptions``) sets the iterator's prefetch threads. ``source`` reuses an already
    scanned :class:`JsonlSource` (``paths`` is then ignored).

    Pretrain data prepared by ``scripts/prepare_data.py`` (a directory holding ``meta.json``, given as the only
    path, or a :class:`~minimind_jax.data.prepared.PreparedSource` as ``source``) is read without re-tokenising
    and gives the same batches as its jsonl files (packed rows when the source packs; see ``prepared.py``).

    Chat data: the shard's first :data:`PROBE_RECORDS` records are transformed up front; a :class:`DataError`
    when none has a trained token (all replies past ``max_seq_len``), a logged warning when most have none.
    """
    stage = canonical_stage(stage)
    _check_sizes(batch_size, shard_index, shard_count, epochs)
    options = {"add_system_prompt_prob": add_system_prompt_prob, "drop_empty_think_prob": drop_empty_think_prob,
               "special_token_weight": special_token_weight, "thinking_ratio": thinking_ratio}
    transform = make_transform(stage, tokenizer, max_seq_len, **options)  # checks the options for every source
    augment = bool(add_system_prompt_prob or drop_empty_think_prob) or stage in RL_STAGES
    source = _open_source(stage, paths, source, skip_bad_lines)
    if isinstance(source, PreparedChatSource):  # the same arrays from stored ids, augmentations applied on ids
        transform = source.transform(tokenizer, max_seq_len, **options)
    elif isinstance(source, PreparedSource):
        transform = source.transform(tokenizer, max_seq_len)

    n = len(source)  # grain hands later epochs' reads of record i the index i + epoch * n: fold it back
    ds = grain.MapDataset.source(source).map_with_index(lambda i, record: (i % n, record))
    ds = ds[shard_index::shard_count]
    per_epoch = len(ds)
    if per_epoch < batch_size:
        raise DataError(f"shard {shard_index}/{shard_count} holds {per_epoch} records, fewer than one batch of "
                         f"{batch_size} ({source!r})")
    _probe(stage, ds, transform, source, max_seq_len, seed)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if epochs != 1:
        ds = ds.repeat(epochs)
    apply = _sample_fn(stage, transform, source, seed=seed, per_epoch=per_epoch, augment=augment)
    ds = ds.map_with_index(apply).batch(batch_size, drop_remainder=True)
    return DataPipeline(ds, source, source.stats, stage, batch_size, max_seq_len, per_epoch, read_options)
