"""MiniMind's data formats as grain input pipelines.

* :mod:`~minimind_jax.data.jsonl`: reading and validating jsonl files (``JsonlSource``: opened by a cached
  newline-scan index from :mod:`~minimind_jax.data.jsonl_index`, each record validated when read; ``DataError``
  with ``file:line``; ``check_file`` validates a whole file in parallel; ``skip_bad_lines`` counted in
  ``ReadStats`` and logged).
* :mod:`~minimind_jax.data.samples`: pure per-example transforms (pretrain / SFT / DPO -> int32 arrays, labels
  -100 where not trained), MiniMind's assistant-mask rule and augmentations.
* :mod:`~minimind_jax.data.pipeline`: ``make_dataset`` (grain ``MapDataset``: shard, shuffle, repeat,
  transform, batch) with checkpointable iterators.
* :mod:`~minimind_jax.data.prepared`: pre-tokenised pretrain data (``prepare``, ``PreparedSource``; made by
  ``scripts/prepare_data.py``), read by ``make_dataset`` without re-tokenising, optionally packed.
"""

from minimind_jax.data.jsonl import ROLES, STAGES, DataError, JsonlSource, ReadStats, check_file, validate_record
from minimind_jax.data.pipeline import DataPipeline, make_dataset, make_transform
from minimind_jax.data.prepared import PreparedSource, encode_prepared_pretrain, is_prepared_dir, prepare
from minimind_jax.data.samples import (
    EMPTY_THINK,
    IGNORE_INDEX,
    REASON_TAGS,
    SYSTEM_PROMPTS,
    ChatMarkers,
    Encoded,
    assistant_labels,
    conversation_tools,
    encode_dpo,
    encode_pretrain,
    encode_sft,
    render_conversation,
    tag_weights,
)

__all__ = [
    "ROLES", "STAGES", "DataError", "JsonlSource", "ReadStats", "validate_record", "check_file", "DataPipeline", "make_dataset",
    "make_transform", "EMPTY_THINK", "IGNORE_INDEX", "SYSTEM_PROMPTS", "ChatMarkers", "Encoded", "assistant_labels",
    "conversation_tools", "encode_dpo", "REASON_TAGS", "tag_weights", "encode_pretrain", "encode_sft", "render_conversation",
    "PreparedSource", "encode_prepared_pretrain", "is_prepared_dir", "prepare",
]
