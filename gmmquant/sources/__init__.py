"""Source checkpoint formats: float, block FP8, MXFP4, compressed-tensors; see docs/SOURCES.md.

`source_format(config_dict)` picks the format from `quantization_config`; `TensorStore` reads a model
directory's logical tensors through it, dequantizing one tensor or one expert slice at a time.
"""

from .base import FLOAT, SourceError, SourceFormat, Stored
from .registry import source_format
from .store import TensorStore

__all__ = ["FLOAT", "SourceError", "SourceFormat", "Stored", "TensorStore", "source_format"]
