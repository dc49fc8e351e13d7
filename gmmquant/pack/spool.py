"""Stacked `[E, ...]` output tensors written one chunk of experts at a time, so packing never holds a layer.

A quantized projection is one checkpoint tensor for all experts (`qweight` int32 `[E, K, N/8]`, ...), but
its experts are produced a chunk at a time (and, from per-expert source files, in file order: 0, 1, 10,
100, ...). `ExpertSpool` preallocates the tensor's bytes in a scratch file and writes each chunk at its
experts' offset; `ShardWriter.add` then copies the finished file into a shard. Resident memory is one
chunk's tensors, whatever E is; the cost is writing the quantized bytes twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class SpooledTensor:
    """A finished tensor whose bytes (C order, little-endian) are the file at `path`."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class ExpertSpool:
    """One `[E, *rest]` tensor of `dtype`, filled by expert slices in any order (see the module docstring)."""

    def __init__(self, directory: "str | Path", key: str, dtype: torch.dtype, shape: tuple[int, ...]):
        self.dtype, self.shape = dtype, tuple(shape)
        self.path = Path(directory) / f"{key}.spool"
        self.row_bytes = SpooledTensor(self.path, dtype, self.shape[1:]).nbytes
        self.filled = [False] * self.shape[0]
        with open(self.path, "wb") as f:
            f.truncate(self.row_bytes * self.shape[0])  # sparse until written

    def write(self, first: int, chunk: torch.Tensor) -> None:
        """Experts `first .. first + len(chunk) - 1`: `chunk` is `[C, *rest]` of the spool's dtype."""
        if chunk.dtype != self.dtype or tuple(chunk.shape[1:]) != self.shape[1:]:
            raise ValueError(f"{self.path.name}: chunk {chunk.dtype} {list(chunk.shape)} does not fit {self.dtype} {list(self.shape)}")
        flat = chunk.detach().to("cpu").contiguous().reshape(-1)
        data = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b""
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, first * self.row_bytes)
        finally:
            os.close(fd)
        for e in range(first, first + chunk.shape[0]):
            self.filled[e] = True

    @property
    def complete(self) -> bool:
        return all(self.filled)

    def finish(self) -> SpooledTensor:
        missing = [e for e, ok in enumerate(self.filled) if not ok]
        if missing:
            raise ValueError(f"{self.path.name}: experts {missing[:8]} were never written")
        return SpooledTensor(self.path, self.dtype, self.shape)


__all__ = ["ExpertSpool", "SpooledTensor"]
