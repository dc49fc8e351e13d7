"""Interoperability: export gmmquant checkpoints to AscendV1 (vllm-ascend / MindIE) and compressed-tensors
(vLLM), and load those formats into gmmquant's runtime. See docs/INTEROP.md.

Importing this package imports transformers (for the model types' checkpoint naming).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..pack.validate import validate_checkpoint
from .ascend import export_ascend, read_ascend
from .compressed_tensors import export_compressed_tensors, read_compressed_tensors
from .load import ASCEND, COMPRESSED_TENSORS, detect_format, load_foreign_model, read_checkpoint

TARGETS = {ASCEND: export_ascend, COMPRESSED_TENSORS: export_compressed_tensors}


def export_checkpoint(checkpoint: "str | os.PathLike", out_dir: "str | os.PathLike", to: str, **kwargs) -> Path:
    """Export a gmmquant checkpoint directory to `to` ("ascend" or "compressed-tensors"); kwargs go to the exporter
    (`max_shard_size`, `overwrite`). Raises FormatError for a scheme the target cannot represent."""
    if to not in TARGETS:
        raise ValueError(f"unknown export target {to!r}; choose one of {sorted(TARGETS)}")
    validate_checkpoint(checkpoint)  # values and model structure too: nothing half-valid is converted
    return TARGETS[to](checkpoint, out_dir, **kwargs)


__all__ = ["ASCEND", "COMPRESSED_TENSORS", "TARGETS", "detect_format", "export_ascend", "export_checkpoint",
           "export_compressed_tensors", "load_foreign_model", "read_ascend", "read_checkpoint", "read_compressed_tensors"]
