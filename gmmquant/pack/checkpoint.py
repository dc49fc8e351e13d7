"""Save and load gmmquant checkpoints (format v1, see format.py and docs/FORMAT.md).

A checkpoint is a normal HF model directory: config.json with a `quantization_config`, tokenizer and other
files copied from the source, safetensors shards (+ index). Saving is atomic; loading validates every
expert tensor's name, dtype and shape against its scheme and the kernel contract, and reports all
problems at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open

from .format import (
    FORMAT_VERSION,
    ExpertsSpec,
    FormatError,
    build_quantization_config,
    expert_tensor_owner,
    parse_quantization_config,
    validate_tensors,
)
from .primitives import QuantizedWeight
from .safety import UnsafeFileError, atomic_output_dir, copy_tree_safely, member_file, read_json_object, regular_file
from .shards import INDEX_NAME, SAFETENSORS_TO_TORCH, SINGLE_NAME, ShardWriter, parse_size
from .spool import SpooledTensor
from .validate import unexpected_tensor_problems, value_problem, values_problems

logger = logging.getLogger(__name__)

# Files of a model directory that describe weights; everything else (tokenizer, generation config, chat
# template, remote code) is copied as is.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
SKIPPED_FILES = {"config.json", INDEX_NAME, "pytorch_model.bin.index.json"}


def projection_tensors(prefix: str, proj: str, qw: QuantizedWeight, *, bias: Optional[torch.Tensor] = None,
                       input_scale: Optional[torch.Tensor] = None, smooth_scale: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized projection, by name."""
    base = f"{prefix}.{proj}"
    out = {f"{base}.qweight": qw.qweight}
    if qw.scheme.weight_only:
        out[f"{base}.antiquant_scale"] = qw.scale
        if qw.offset is not None:
            out[f"{base}.antiquant_offset"] = qw.offset
    else:
        out[f"{base}.weight_scale"] = qw.scale
    for name, t in (("bias", bias), ("input_scale", input_scale), ("smooth_scale", smooth_scale)):
        if t is not None:
            out[f"{base}.{name}"] = t
    return out


def copy_side_files(source_dir: Optional[Path], target: Path) -> list[str]:
    """Copy tokenizer and other non-weight files of a model directory; return their names."""
    if source_dir is None:
        return []
    copied = []
    for path in sorted(Path(source_dir).iterdir()):
        if path.name in SKIPPED_FILES or path.name.endswith(WEIGHT_FILE_SUFFIXES) or path.name.startswith("."):
            continue
        if path.is_dir() and not path.is_symlink():
            copy_tree_safely(path, target / path.name)
        else:  # a FIFO, device or linked directory would hang or copy without end: refused, naming it
            shutil.copyfile(regular_file(path, "side file"), target / path.name)
            shutil.copystat(path, target / path.name)
        copied.append(path.name)
    return copied


@dataclass
class SaveReport:
    path: Path
    shards: int
    total_bytes: int
    copied_files: list[str]


def save_quantized(
    out_dir: "str | os.PathLike",
    *,
    config: dict[str, Any],
    specs: dict[str, ExpertsSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    act_dtype: torch.dtype,
    ignore: Optional[list[str]] = None,
    source_dir: "Optional[str | os.PathLike]" = None,
    max_shard_size: "int | str" = "2GB",
    overwrite: bool = False,
    extra_files: Optional[dict[str, str]] = None,
    checksums: bool = True,
) -> SaveReport:
    """Write a gmmquant checkpoint atomically.

    Args:
        out_dir: the checkpoint directory to create.
        config: the model's config as a dict (`PretrainedConfig.to_dict()` or config.json); its
            `quantization_config` is replaced.
        specs: the quantized experts modules, by model path.
        tensors: every tensor of the checkpoint as (name, tensor) pairs: the quantized expert tensors
            (see `projection_tensors`) and the untouched non-expert tensors. May be a generator, so the
            model never has to be in memory at once.
        act_dtype: the model's activation dtype (bfloat16 / float16).
        ignore: module-name patterns that were deliberately left unquantized.
        source_dir: a model directory whose tokenizer and other non-weight files are copied.
        max_shard_size: upper bound of one safetensors file (`"2GB"`, bytes...).
        overwrite: replace an existing `out_dir` (still atomically).
        extra_files: file name -> text, written after every tensor was consumed (so a generator of
            `tensors` may still fill it in, e.g. a calibration report).
        checksums: record every tensor's SHA-256 in its shard's metadata (`gmmquant inspect --verify`).

    Raises:
        FormatError: the tensors do not form a valid checkpoint for `specs` (nothing is written).
        OutputError, OutputBusyError, FileExistsError: see `safety.atomic_output_dir` (`source_dir` is protected).
    """
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    shard_bytes = parse_size(max_shard_size)
    with atomic_output_dir(out_dir, overwrite=overwrite, protect=[source_dir] if source_dir else []) as tmp:
        writer = ShardWriter(tmp, shard_bytes, metadata={"gmmquant_format_version": str(FORMAT_VERSION)}, checksums=checksums)
        seen: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for name, tensor in tensors:
            if expert_tensor_owner(name, specs) is not None:
                seen[name] = (tensor.dtype, tuple(tensor.shape))
                # a spooled tensor's values were checked chunk by chunk as they were written
                problem = None if isinstance(tensor, SpooledTensor) else value_problem(name, tensor)
                if problem:
                    raise FormatError(f"refusing to write {problem}")
            writer.add(name, tensor)
        problems = validate_tensors(specs, seen) + unexpected_tensor_problems(specs, seen)
        if problems:
            raise FormatError("refusing to write an invalid checkpoint:\n  " + "\n  ".join(problems))
        weight_map = writer.close()
        # Built after the tensors: a generator may still have completed `specs` (e.g. calibration extras).
        config["quantization_config"] = build_quantization_config(specs, act_dtype, ignore or [])
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copied = copy_side_files(Path(source_dir) if source_dir else None, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        shards = len(set(weight_map.values()))
        total = writer.total_bytes
    logger.info("wrote %s: %d shard(s), %.1f MB", out_dir, shards, total / 1e6)
    return SaveReport(Path(out_dir), shards, total, copied)


def weight_files(path: Path) -> dict[str, str]:
    """tensor name -> shard file of a model directory (from the index, or the single file's header)."""
    return {name: str(file.relative_to(path)) for name, file in weight_paths(path).items()}


def weight_paths(path: Path) -> dict[str, Path]:
    """tensor name -> shard path, every shard checked: a plain name inside `path`, a regular file."""
    path = Path(path)
    if not path.is_dir():
        raise FormatError(f"{path}: not a directory" if path.exists() else f"{path}: no such model directory")
    index = path / INDEX_NAME
    if os.path.lexists(index):
        weight_map = read_json_object(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
            raise FormatError(f"{index}: 'weight_map' must be an object of tensor name -> shard file name")
        bad = next(((n, f) for n, f in weight_map.items() if not isinstance(f, str)), None)
        if bad is not None:
            raise FormatError(f"{index}: weight_map[{bad[0]!r}] is {bad[1]!r}, not a shard file name")
        try:
            files = {f: member_file(path, f, str(index)) for f in set(weight_map.values())}
            missing = sorted(f for f, p in files.items() if not os.path.exists(p))
            if missing:
                raise FormatError(f"{path}: the index names shard(s) that do not exist: {missing}")
            for p in files.values():
                regular_file(p, "shard")
        except UnsafeFileError as err:
            raise FormatError(str(err)) from err
        return {name: files[f] for name, f in weight_map.items()}
    single = path / SINGLE_NAME
    if not os.path.exists(single):
        raise FormatError(f"{path}: no {SINGLE_NAME} and no {INDEX_NAME}")
    try:
        regular_file(single, "weights file")
    except UnsafeFileError as err:
        raise FormatError(str(err)) from err
    return {name: single for name in read_header(single)}


def read_header(file: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of a safetensors file, without reading tensor data."""
    try:
        with safe_open(str(file), framework="pt") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (SAFETENSORS_TO_TORCH.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape()))
            return out
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise FormatError(f"{file}: corrupt or truncated safetensors file ({err})") from err


@dataclass
class QuantizedCheckpoint:
    """A validated gmmquant checkpoint on disk; tensors are read on demand."""

    path: Path
    config: dict[str, Any]
    specs: dict[str, ExpertsSpec]
    ignore: list[str]
    act_dtype: torch.dtype
    weight_map: dict[str, str]
    headers: dict[str, tuple[torch.dtype, tuple[int, ...]]]

    def tensor(self, name: str, device: "str | torch.device" = "cpu") -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{name} is not in {self.path}")
        try:
            with safe_open(str(self.path / self.weight_map[name]), framework="pt", device=str(device)) as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise FormatError(f"{self.path / self.weight_map[name]}: cannot read {name} ({err})") from err

    def projections(self, prefix: str, device: "str | torch.device" = "cpu") -> dict[str, QuantizedWeight]:
        """The QuantizedWeight of each projection of one experts module."""
        spec = self.specs[prefix]
        out = {}
        for proj in spec.projections:
            base = f"{prefix}.{proj}"
            if spec.scheme.weight_only:
                scale = self.tensor(f"{base}.antiquant_scale", device)
                offset = None if spec.scheme.symmetric else self.tensor(f"{base}.antiquant_offset", device)
            else:
                scale, offset = self.tensor(f"{base}.weight_scale", device), None
            out[proj] = QuantizedWeight(self.tensor(f"{base}.qweight", device), scale, offset, spec.scheme)
        return out

    def iter_tensors(self, device: "str | torch.device" = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, shard by shard (one shard's tensors at a time)."""
        by_file: dict[str, list[str]] = {}
        for name, file in self.weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):
            with safe_open(str(self.path / file), framework="pt", device=str(device)) as f:
                for name in names:
                    yield name, f.get_tensor(name)


def load_quantized(path: "str | os.PathLike", *, validate: bool = True) -> QuantizedCheckpoint:
    """Open a gmmquant checkpoint and validate it.

    Raises:
        FormatError: listing every problem (not a gmmquant checkpoint, unknown format version, missing or
            corrupt shard, missing tensor, wrong dtype / shape, a module the kernel would reject).
    """
    root = Path(path)
    if not root.is_dir():
        raise FormatError(f"{root}: not a directory" if root.exists() else f"{root}: no such checkpoint directory")
    config_file = root / "config.json"
    if not os.path.lexists(config_file):
        raise FormatError(f"{root}: no config.json (not a model directory)")
    config = read_json_object(config_file, "config.json")
    specs, ignore, act_dtype = parse_quantization_config(config.get("quantization_config"))
    weight_map = weight_files(root)
    headers: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    problems = []
    for file in sorted(set(weight_map.values())):
        for name, header in read_header(root / file).items():
            if name in headers:  # two shards claim it: which one a loader takes is arbitrary
                problems.append(f"{name} is stored in more than one shard (one of them {file})")
            headers[name] = header
    if validate:
        problems += validate_tensors(specs, headers) + unexpected_tensor_problems(specs, headers)
        problems += [f"{n} is in the index but not in its shard {weight_map[n]}" for n in weight_map if n not in headers]
    ck = QuantizedCheckpoint(root, config, specs, ignore, act_dtype, weight_map, headers)
    if validate and not problems:
        problems = values_problems(ck)
    if problems:
        raise FormatError(f"{root} is not a valid gmmquant checkpoint:\n  " + "\n  ".join(problems))
    return ck
