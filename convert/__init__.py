"""Checkpoint conversion between PyTorch (MiniMind / Hugging Face) and this project.

The only package that knows PyTorch tensor names and layouts:

* ``convert.mapping``: the name table (``torch_to_params`` / ``params_to_torch``);
* ``convert.dtypes``: the one explicit dtype table and the recorded casts;
* ``convert.io``: safetensors (single / sharded) and ``.pth`` readers, atomic writers;
* ``convert.api``: ``load_torch`` and ``save_torch``; ``convert.cli``: ``python -m convert``.
"""

from convert.api import Report, hf_config, load_torch, save_torch
from convert.io import read_tensors, write_pth
from convert.mapping import (
    MappingError,
    expected_param_shapes,
    expected_torch_shapes,
    layer_table,
    params_to_torch,
    torch_to_params,
)

__all__ = ["MappingError", "Report", "expected_param_shapes", "expected_torch_shapes", "hf_config", "layer_table",
           "load_torch", "params_to_torch", "read_tensors", "save_torch", "torch_to_params", "write_pth"]
