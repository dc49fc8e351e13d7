"""Size-bounded safetensors shard writing into a directory that appears atomically.

`atomic_output_dir` (safety.py) builds the checkpoint in a temporary sibling directory and swaps it into
place only when everything was written; on any error the temporary directory is removed, so an interrupted
save never leaves a half checkpoint. `ShardWriter` streams tensors into shards of at most `max_shard_bytes`
(one tensor larger than the limit gets a shard of its own) without holding a shard in memory, and writes
the HF index json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import BinaryIO, Optional

import torch

from .safety import atomic_output_dir  # noqa: F401 - re-exported: writers import it from here
from .spool import SpooledTensor

INDEX_NAME = "model.safetensors.index.json"
CHECKSUM_KEY = "gmmquant_sha256"
SINGLE_NAME = "model.safetensors"
SAFETENSORS_TO_TORCH = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}


def parse_size(size: "int | str") -> int:
    """`5GB`, `500MB`, `2GiB` or a byte count -> bytes (ValueError naming the rule for anything else, or <= 0)."""
    value: "int | float"
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"shard size {size!r}: expected a size like '2GB', '500MB', '2GiB' or a byte count")
    if isinstance(size, int):
        value = size
    else:
        text = size.strip().upper()
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
        factor = next((f for u, f in units.items() if text.endswith(u)), 1)
        number = next((text[: -len(u)] for u in units if text.endswith(u)), text)
        try:
            value = float(number) * factor
        except ValueError:
            raise ValueError(f"shard size {size!r}: expected a size like '2GB', '500MB', '2GiB' or a byte count") from None
    if not value >= 1 or value != value or value == float("inf"):
        raise ValueError(f"shard size {size!r}: must be a positive, finite number of bytes")
    return int(value)


class ShardWriter:
    """Stream tensors into size-bounded safetensors shards, then write the index.

    Each tensor's bytes go straight to a temporary data file; when a shard is full its header is written
    and the data appended behind it. Memory use is therefore one tensor, not one shard (safetensors'
    `save_file` needs a whole shard in memory, plus a bytes copy of it). The file layout is the documented
    safetensors one: 8-byte little-endian header length, JSON header with `dtype` / `shape` /
    `data_offsets` per tensor and `__metadata__`, padded with spaces to 8 bytes, then the data; files are
    read back with `safetensors.safe_open` by the loader and the tests.
    """

    def __init__(self, directory: Path, max_shard_bytes: int, metadata: Optional[dict[str, str]] = None,
                 checksums: bool = False):
        """`checksums`: record each tensor's SHA-256 in its shard's `__metadata__` (`CHECKSUM_KEY`, a JSON
        object name -> hex digest), which `gmmquant inspect --verify` checks."""
        self.checksums: Optional[dict[str, str]] = {} if checksums else None
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._entries: dict[str, dict] = {}
        self._data: Optional[BinaryIO] = None
        self._offset = 0
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: "torch.Tensor | SpooledTensor") -> None:
        """Append one tensor; a `SpooledTensor` is copied from its file in blocks (never whole in memory)."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in TORCH_TO_SAFETENSORS:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
        spooled = isinstance(tensor, SpooledTensor)
        if spooled:
            nbytes = tensor.nbytes
        else:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            nbytes = flat.numel() * flat.element_size()
        if self._entries and self._offset + nbytes > self.max_shard_bytes:
            self._flush()
        if self._data is None:
            self._data = open(self.directory / f"shard-{len(self._shards):05d}.data", "wb")
        digest = hashlib.sha256()
        if spooled:
            with open(tensor.path, "rb") as src:
                while block := src.read(16 * 2**20):
                    self._data.write(block)
                    digest.update(block)
        elif nbytes:
            data = memoryview(flat.view(torch.uint8).numpy())
            self._data.write(data)
            digest.update(data)
        if self.checksums is not None:
            self.checksums[name] = digest.hexdigest()
        self._entries[name] = {"dtype": TORCH_TO_SAFETENSORS[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes
        self._names.add(name)
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if self._data is None:
            return
        index = len(self._shards)
        self._data.close()
        data_path = self.directory / f"shard-{index:05d}.data"
        metadata = dict(self.metadata)
        if self.checksums is not None:
            metadata[CHECKSUM_KEY] = json.dumps({n: self.checksums[n] for n in self._entries}, separators=(",", ":"))
        header = json.dumps({"__metadata__": metadata, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(self.directory / f"shard-{index:05d}.tmp", "wb") as out, open(data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 16 * 2**20)
        data_path.unlink()
        self._shards.append(list(self._entries))
        self._entries, self._data, self._offset = {}, None, 0

    def close(self) -> dict[str, str]:
        """Flush, give shards their final names, write the index; return the weight map."""
        self._flush()
        count = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = SINGLE_NAME if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / f"shard-{i:05d}.tmp", self.directory / final)
            weight_map.update({n: final for n in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes, **self.metadata}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map
