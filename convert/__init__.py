"""Checkpoint conversion between PyTorch (MiniMind / Hugging Face) and this project.

The only package that knows PyTorch tensor names and layouts. ``convert.mapping`` holds the name table.
"""

from convert.mapping import MappingError, expected_torch_shapes, params_to_torch, torch_to_params

__all__ = ["MappingError", "expected_torch_shapes", "params_to_torch", "torch_to_params"]
