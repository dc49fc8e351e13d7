"""Size-bounded safetensors shard writing into a directory that appears atomically.

`atomic_output_dir` builds the checkpoint in a temporary sibling directory and renames it into place
only when everything was written; on any error the temporary directory is removed, so an interrupted save
never leaves a half checkpoint. `ShardWriter` streams tensors into shards of at most `max_shard_bytes`
(one tensor larger than the limit gets a shard of its own) without holding a shard in memory, and writes
the HF index json.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SAFETENSORS_TO_TORCH = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}


def parse_size(size: "int | str") -> int:
    """`5GB`, `500MB`, `2GiB` or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


@contextlib.contextmanager
def atomic_output_dir(out_dir: "str | os.PathLike", overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out_dir` when the block finishes without error."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output directory or pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardWriter:
    """Stream tensors into size-bounded safetensors shards, then write the index.

    Each tensor's bytes go straight to a temporary data file; when a shard is full its header is written
    and the data appended behind it. Memory use is therefore one tensor, not one shard (safetensors'
    `save_file` needs a whole shard in memory, plus a bytes copy of it). The file layout is the documented
    safetensors one: 8-byte little-endian header length, JSON header with `dtype` / `shape` /
    `data_offsets` per tensor and `__metadata__`, padded with spaces to 8 bytes, then the data; files are
    read back with `safetensors.safe_open` by the loader and the tests.
    """

    def __init__(self, directory: Path, max_shard_bytes: int, metadata: Optional[dict[str, str]] = None):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._entries: dict[str, dict] = {}
        self._data: Optional[BinaryIO] = None
        self._offset = 0
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in TORCH_TO_SAFETENSORS:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        if self._entries and self._offset + nbytes > self.max_shard_bytes:
            self._flush()
        if self._data is None:
            self._data = open(self.directory / f"shard-{len(self._shards):05d}.data", "wb")
        if nbytes:
            self._data.write(memoryview(flat.view(torch.uint8).numpy()))
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
        header = json.dumps({"__metadata__": self.metadata, **self._entries}, separators=(",", ":")).encode()
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
