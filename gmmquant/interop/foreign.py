"""Read a foreign quantized MoE checkpoint (compressed-tensors, AscendV1) into gmmquant's layout, in memory.

Both formats store one quantized nn.Linear per expert under the model's original checkpoint names. This
module does the format-independent part: find the per-expert linears of every experts module through
transformers' conversion mapping (naming.py), hand each one's tensors to the format's `decode`, and stack
the codes into GMM tensors (linears.py): integer codes are moved, never dequantized. Everything else is
kept as float tensors under its in-memory name; quantized linears outside the experts (attention,
shared experts) are dequantized, because gmmquant's kernels run experts only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError, safe_open

from ..pack.checkpoint import weight_paths
from ..pack.format import DTYPES, ExpertsSpec, FormatError, validate_tensors
from ..pack.layouts import ExpertsModuleInfo, find_experts_modules, meta_model
from ..pack.primitives import QuantizedWeight, activation_dtype
from ..pack.safety import UnsafeFileError, regular_file
from ..pack.schemes import QuantScheme
from ..pack.shards import INDEX_NAME
from ..pack.validate import value_problem
from .linears import LinearCodes, merge_projection
from .naming import Naming

logger = logging.getLogger(__name__)


@dataclass
class LinearFormat:
    """What a format reader tells `read_foreign`.

    Attributes:
        name: format name for messages.
        suffixes: tensor-name suffixes that belong to one quantized nn.Linear (`weight`, `weight_scale`, ...).
        scheme_for: (disk base name of a linear, e.g. `model.layers.0.mlp.experts.3.up_proj`, {suffix: tensor})
            -> its scheme, None if it is float.
        decode: (base name, {suffix: tensor}, scheme) -> that linear's codes.
    """

    name: str
    suffixes: tuple[str, ...]
    scheme_for: Callable[[str, dict[str, torch.Tensor]], Optional[QuantScheme]]
    decode: Callable[[str, dict[str, torch.Tensor], QuantScheme], LinearCodes]


@dataclass
class ForeignCheckpoint:
    """A foreign checkpoint converted to gmmquant's layout.

    Attributes:
        config: the model config (config.json without its quantization_config).
        act_dtype: activation dtype of the quantized experts.
        specs: quantized experts modules, as gmmquant's ExpertsSpec (validated against the kernel contract).
        quantized: module path -> projection -> QuantizedWeight (canonical `[E, K, N]`, gate then up).
        other: in-memory name -> float tensor, for everything else (float experts already fused).
    """

    path: Path
    format: str
    config: dict[str, Any]
    act_dtype: torch.dtype
    specs: dict[str, ExpertsSpec]
    quantized: dict[str, dict[str, QuantizedWeight]]
    other: dict[str, torch.Tensor] = field(default_factory=dict)


def safetensors_files(root: Path) -> list[Path]:
    """The weight files of a directory: those its `model.safetensors.index.json` names, else every *.safetensors."""
    index = root / INDEX_NAME
    if os.path.lexists(index):  # names checked: inside the directory, regular files (pack.safety)
        return sorted(set(weight_paths(root).values()))
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{root}: no *.safetensors weight files")
    try:
        return [regular_file(f, "weights file") for f in files]
    except UnsafeFileError as err:
        raise FormatError(str(err)) from err


def read_all(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's safetensors files, by name."""
    out: dict[str, torch.Tensor] = {}
    for file in safetensors_files(root):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    out[name] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise FormatError(f"{file}: corrupt or truncated safetensors file ({err})") from err
    return out


def config_dtype(config: dict[str, Any]) -> Optional[torch.dtype]:
    name = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(name) if isinstance(name, str) else None


def _storage_dtype(float_tensors: list[torch.Tensor], config: dict[str, Any]) -> torch.dtype:
    """The dtype the checkpoint keeps its float weights in (most common among them), else the config's."""
    counts: dict[torch.dtype, int] = {}
    for t in float_tensors:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else (config_dtype(config) or torch.float32)


def _split_linear(name: str, suffixes: tuple[str, ...]) -> Optional[tuple[str, str]]:
    for suffix in sorted(suffixes, key=len, reverse=True):
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
    return None


def _fuse_float(info: ExpertsModuleInfo, proj: str, weights: list[list[torch.Tensor]]) -> torch.Tensor:
    """Per-expert float nn.Linear weights `[N_part, K]` -> the fused module's parameter as transformers keeps it."""
    stacked = torch.stack([torch.cat(row, dim=0) for row in weights])  # [E, N, K]
    return stacked.transpose(1, 2).contiguous() if info.is_transposed else stacked


def read_foreign(root: Path, fmt: LinearFormat, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ForeignCheckpoint:
    """Convert the tensors of a foreign checkpoint (see module docstring).

    Args:
        root: the checkpoint directory (for messages).
        fmt: the format's reader.
        config: config.json without quantization_config.
        tensors: every tensor of the checkpoint, by disk name; emptied as they are converted.

    Raises:
        FormatError: the model has no experts modules, an experts module is incomplete or mixes schemes,
            or the result would not run on the kernel (listing every problem).
    """
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if not model_type:
        raise FormatError(f"{root}/config.json has no model_type")
    hf_config = AutoConfig.for_model(**config)
    modules = find_experts_modules(meta_model(hf_config))
    if not modules:
        raise FormatError(f"{root}: model type {model_type!r} has no fused MoE experts modules in transformers")
    naming = Naming(model_type)
    # Group linear tensors: base name -> {suffix: tensor}; expert linears also by (param path, expert, part).
    linears: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for name in list(tensors):  # taken out of `tensors`, so converted experts free their source tensors
        t = tensors.pop(name)
        split = _split_linear(name, fmt.suffixes)
        if split is None:
            rest[name] = t
        else:
            linears.setdefault(split[0], {})[split[1]] = t
    pieces: dict[str, dict[tuple[int, int], str]] = {}
    parts_of: dict[str, int] = {}
    plain_linears = []
    for base in linears:
        piece = naming.expert_piece(base + ".weight")
        if piece is not None and piece[0].rsplit(".", 1)[0] in modules:
            param, e, part, parts = piece
            pieces.setdefault(param, {})[(e, part)] = base
            parts_of[param] = parts
        else:
            plain_linears.append(base)

    specs: dict[str, ExpertsSpec] = {}
    quantized: dict[str, dict[str, QuantizedWeight]] = {}
    other: dict[str, torch.Tensor] = {}
    act: Optional[torch.dtype] = None
    for path, info in modules.items():
        if not any(f"{path}.{proj}" in pieces for proj in info.projections):
            continue  # not stored per expert (e.g. GPT-OSS keeps float experts fused): its tensors pass through as named
        schemes: dict[str, Optional[QuantScheme]] = {}
        grid: dict[str, list[list[str]]] = {}
        for proj in info.projections:
            param = f"{path}.{proj}"
            found, parts = pieces.get(param, {}), parts_of.get(param, 1)
            missing = [(e, p) for e in range(info.num_experts) for p in range(parts) if (e, p) not in found]
            if missing:
                raise FormatError(f"{root}: {param}: per-expert linears missing for (expert, part) {missing[:8]}"
                                  f"{' ...' if len(missing) > 8 else ''}")
            grid[proj] = [[found[(e, p)] for p in range(parts)] for e in range(info.num_experts)]
            found_schemes = {fmt.scheme_for(b, linears[b]) for row in grid[proj] for b in row}
            if len(found_schemes) != 1:
                raise FormatError(f"{root}: {param}: experts use different schemes {sorted(map(str, found_schemes))} "
                                  "(rule: one scheme per experts module, as the grouped matmul runs them together)")
            schemes[proj] = found_schemes.pop()
        if len(set(schemes.values())) != 1:
            raise FormatError(f"{root}: {path}: projections use different schemes {schemes} (rule: one scheme per experts module)")
        scheme = next(iter(schemes.values()))
        if scheme is None:  # float experts: fused like transformers would
            for proj, rows in grid.items():
                other[f"{path}.{proj}"] = _fuse_float(info, proj, [[linears[b]["weight"] for b in row] for row in rows])
            continue
        if info.has_bias:
            raise FormatError(f"{root}: {path}: experts with biases are not supported by the {fmt.name} importer")
        codes = {proj: [[fmt.decode(b, linears[b], scheme) for b in row] for row in rows] for proj, rows in grid.items()}
        if act is None:
            first = codes[next(iter(codes))][0][0].scale.dtype
            act = first if scheme.weight_only and first in (torch.bfloat16, torch.float16) else activation_dtype(config_dtype(config))
        quantized[path] = {proj: merge_projection(c, scheme, act) for proj, c in codes.items()}
        del codes
        for rows in grid.values():
            for base in (b for row in rows for b in row):
                linears.pop(base)
        specs[path] = ExpertsSpec(path, scheme, info.num_experts, dict(info.projections), act)
    if not specs:
        raise FormatError(f"{root}: no quantized experts module found ({fmt.name}); load it as a float model instead")
    seen = {f"{p}.{proj}.{n}": (t.dtype, tuple(t.shape)) for p, projs in quantized.items() for proj, qw in projs.items()
            for n, t in (("qweight", qw.qweight), ("antiquant_scale" if qw.scheme.weight_only else "weight_scale", qw.scale),
                         ("antiquant_offset", qw.offset)) if t is not None}
    problems = validate_tensors(specs, seen)
    problems += [v for p, projs in quantized.items() for proj, qw in projs.items()
                 for n, t in (("antiquant_scale" if qw.scheme.weight_only else "weight_scale", qw.scale),
                              ("antiquant_offset", qw.offset)) if t is not None
                 for v in [value_problem(f"{p}.{proj}.{n}", t)] if v]  # NaN / zero scales (pack.validate)
    if problems:
        raise FormatError(f"{root}: the converted experts would not run on the kernel:\n  " + "\n  ".join(problems))

    dtype = _storage_dtype([linears[b]["weight"] for b in plain_linears if "weight" in linears[b]], config)
    for base in plain_linears:
        group = linears[base]
        scheme = fmt.scheme_for(base, group)
        if scheme is None:
            for suffix, t in group.items():
                other[naming.to_memory(f"{base}.{suffix}")] = t
            continue
        logger.info("%s: %s is quantized outside the experts; dequantizing it to %s", root, base, dtype)
        weight = fmt.decode(base, group, scheme).dequantize(dtype)
        other[naming.to_memory(base + ".weight")] = weight
        if "bias" in group:
            other[naming.to_memory(base + ".bias")] = group["bias"]
    for name, t in rest.items():
        other[naming.to_memory(name)] = t
    return ForeignCheckpoint(root, fmt.name, config, act, specs, quantized, other)


def make_scheme(weight_bits: int, group_size: Optional[int], symmetric: bool, activation: str = "none") -> QuantScheme:
    """The gmmquant scheme with these fields, named after its preset when one matches.

    Raises:
        FormatError: the kernel cannot run it (the SchemeError's rule is in the message).
    """
    from ..pack.schemes import PRESETS, SchemeError

    for preset in PRESETS.values():
        if (preset.weight_bits, preset.group_size, preset.symmetric, preset.activation) == (weight_bits, group_size, symmetric, activation):
            return preset
    base = {"none": f"w{weight_bits}a16", "dynamic": f"w{weight_bits}a8-dynamic", "static": "w8a8-static"}[activation]
    name = base + (f"-g{group_size}" if group_size else "") + ("-sym" if symmetric else "-asym")
    try:
        return QuantScheme(name, weight_bits, group_size, symmetric, activation)
    except SchemeError as err:
        raise FormatError(f"a scheme the grouped-matmul kernel cannot run: {err}") from err
