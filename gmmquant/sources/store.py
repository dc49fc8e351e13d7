"""`TensorStore`: a checkpoint directory's logical tensors, read from memory-mapped safetensors files and
dequantized as they are read, whole or one slice of the leading (expert) axis at a time.

safetensors' `safe_open` maps each file; the pages a read touches count in the process's RSS until the
mapping goes away, so callers `release()` the store after each chunk of experts: that drops the mappings
(the page cache keeps the data warm) and keeps the resident size to one chunk, not to the files read so far.
The store also releases by itself every `MAP_BYTES` read, so a reader of many small tensors (per-expert
FP8 pieces from 4 GB shards) never holds a whole shard's pages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import torch
from safetensors import safe_open
from torch import Tensor

from ..pack.checkpoint import weight_files
from .base import SourceError, SourceFormat, Stored

Index = Union[int, slice, None]
MAP_BYTES = 256 * 2**20


class TensorStore:
    """The logical tensors of `root` in source format `fmt`, dequantized to `dtype` when they are quantized."""

    def __init__(self, root: "str | Path", fmt: SourceFormat, dtype: torch.dtype = torch.bfloat16):
        self.root = Path(root)
        self.fmt = fmt
        self.dtype = dtype
        self.files = weight_files(self.root)  # stored name -> file
        self.entries: dict[str, Stored] = fmt.group(self.files)
        self._handles: dict[str, Any] = {}
        self._read_bytes = 0

    def names(self) -> list[str]:
        """Logical tensor names, ordered by the file of their main tensor (one pass over the files)."""
        return sorted(self.entries, key=lambda n: (self.files[self.entries[n].main], n))

    def file_of(self, name: str) -> str:
        return self.files[self.entries[name].main]

    def _handle(self, stored: str) -> Any:
        file = self.files[stored]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.root / file), framework="pt")
        return self._handles[file]

    def _read(self, stored: str, index: Index) -> Tensor:
        handle = self._handle(stored)
        try:
            if index is None:
                return handle.get_tensor(stored)
            return handle.get_slice(stored)[index]
        except Exception as err:  # a truncated or corrupt file: name it and the tensor
            raise SourceError(f"{self.root / self.files[stored]}: cannot read {stored!r} ({err}); the file is corrupt "
                              "or truncated (rule: every tensor in the index must be readable)") from None

    def get(self, name: str, index: Index = None) -> Tensor:
        """Logical tensor `name` (or its slice `[index]` along dim 0), dequantized to the store's dtype."""
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(f"{name!r} is not a tensor of {self.root}")
        main = self._read(entry.main, index)
        parts = {role: self._read(stored, index if role not in ("weight_shape",) else None)
                 for role, stored in entry.companions.items()}
        self._read_bytes += main.numel() * main.element_size()
        if self._read_bytes > MAP_BYTES:  # the tensors are copies: the mappings can go
            self.release()
        return self.fmt.dequantize(name, main, parts, self.dtype)

    def release(self) -> None:
        """Close every file mapping (see the module docstring)."""
        self._handles.clear()
        self._read_bytes = 0


__all__ = ["TensorStore"]
