"""AscendV1 checkpoints (msModelSlim's layout, read by vllm-ascend and MindIE): export and import.

An AscendV1 directory holds safetensors weights, `quant_model_description.json` (every tensor name -> its
quant type string, plus `model_quant_type`, `version`, `group_size`, `metadata`) and the model's config.json
without a `quantization_config` (MindIE reads `"quantize"` from it instead). Experts are stored as one nn.Linear
per expert under the model's original names (`<base>` = e.g. `model.layers.0.mlp.experts.3.gate_proj`):

| type | tensors per expert linear | loader taking it for MoE |
|---|---|---|
| `W8A8_DYNAMIC` | `<base>.weight` int8 `[N, K]`, `<base>.weight_scale` fp32 `[N, 1]`, `<base>.weight_offset` fp32 `[N, 1]` (zeros) | vllm-ascend `AscendW8A8DynamicFusedMoEMethod`; MindIE |
| `W4A16` | `<base>.weight_packed` int32 `[N, K/8]` (compressed-tensors packing, packing.py), `<base>.weight_scale` `[N, K/g]`, `<base>.weight_shape` `[2]`; description `group_size` = g | vllm-ascend `AscendW4A16FusedMoEMethod` (symmetric only: it builds zero offsets and loads none) |
| `W8A16` | `<base>.weight` int8 `[N, K]`, `<base>.weight_scale` fp32 `[N, 1]`, `<base>.weight_offset` fp32 `[N, 1]` | msModelSlim writes it per Linear; vllm-ascend registers W8A16 for linear layers only, not MoE |

Sign: msModelSlim dequantizes `(q - weight_offset) * weight_scale`, so `weight_offset` is a zero point that is
SUBTRACTED; gmmquant's `antiquant_offset` (added by the kernel) is its negation.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from ..pack.checkpoint import copy_side_files, load_quantized
from ..pack.format import FormatError
from ..pack.safety import read_json_object
from ..pack.schemes import QuantScheme
from ..pack.shards import ShardWriter, atomic_output_dir, parse_size
from .compressed_tensors import check_exportable
from .export import expert_linears, float_experts_modules, float_tensors
from .foreign import ForeignCheckpoint, LinearFormat, make_scheme, read_all, read_foreign
from .linears import LinearCodes
from .naming import Naming
from .packing import pack_offset_binary, unpack_offset_binary

logger = logging.getLogger(__name__)

DESCRIPTION = "quant_model_description.json"
SUFFIXES = ("weight", "weight_packed", "weight_scale", "weight_offset", "weight_shape", "bias")
FLOAT = "FLOAT"
# msModelSlim records the lowest-bit type present as model_quant_type.
PRIORITY = ("FLOAT", "W8A16", "W8A8_DYNAMIC", "W4A16")


def quant_type(scheme: QuantScheme) -> str:
    """The AscendV1 type string of a gmmquant scheme, or FormatError saying why no MoE loader could take it."""
    if scheme.activation == "dynamic":
        return "W8A8_DYNAMIC"
    if scheme.activation == "static":
        raise FormatError(f"scheme {scheme.name!r}: W8A8 static experts cannot be exported to AscendV1 (rule: vllm-ascend "
                          "runs W8A8 static for linear layers only, and msModelSlim's static form needs per-Linear "
                          "deq_scale / quant_bias no MoE loader reads); re-pack with w8a8-dynamic")
    if scheme.weight_bits == 8:
        return "W8A16"
    if not scheme.symmetric:
        raise FormatError(f"scheme {scheme.name!r}: asymmetric W4A16 cannot be exported to AscendV1 (rule: vllm-ascend's "
                          "W4A16 MoE method builds all-zero weight offsets and never loads them, so a zero point would be "
                          "silently dropped); export it to compressed-tensors instead, which keeps zero points (re-packing with --symmetric "
                          "would discard calibration work such as GPTQ)")
    if scheme.group_size is None:
        raise FormatError(f"scheme {scheme.name!r}: per-channel W4A16 cannot be exported to AscendV1 (rule: vllm-ascend's "
                          "W4A16 MoE method takes per-group scales with one global group_size)")
    return "W4A16"


def linear_tensors(base: str, codes: LinearCodes, qtype: str) -> dict[str, torch.Tensor]:
    """AscendV1 tensors of one expert nn.Linear (see the module docstring)."""
    n, k = codes.q.shape
    if qtype == "W4A16":
        return {f"{base}.weight_packed": pack_offset_binary(codes.q, 4), f"{base}.weight_scale": codes.scale.contiguous(),
                f"{base}.weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    zero = torch.zeros(n, 1) if codes.zero_point is None else codes.zero_point.float()
    return {f"{base}.weight": codes.q.to(torch.int8).contiguous(), f"{base}.weight_scale": codes.scale.float().contiguous(),
            f"{base}.weight_offset": zero.contiguous()}


def export_ascend(checkpoint: "str | os.PathLike", out_dir: "str | os.PathLike", *, max_shard_size: "int | str" = "4GB",
                  overwrite: bool = False) -> Path:
    """Write a gmmquant checkpoint in the AscendV1 layout (see the module docstring for what each engine reads).

    Expert tensors become per-expert `[N, K]` linears under the model's original names; other tensors keep
    their values and are described as FLOAT. Written atomically.

    Raises:
        FormatError: a scheme no AscendV1 MoE loader represents (W8A8 static, asymmetric or per-channel
            W4A16, mixed W4A16 group sizes), SmoothQuant factors, expert biases, or a family whose experts are
            fused on disk.
    """
    from transformers import AutoConfig

    ck = load_quantized(checkpoint)
    naming = Naming(ck.config["model_type"])
    types = {}
    for prefix, spec in ck.specs.items():
        check_exportable(spec, "AscendV1", naming)
        types[prefix] = quant_type(spec.scheme)
    group_sizes = {s.scheme.group_size for p, s in ck.specs.items() if types[p] == "W4A16"}
    if len(group_sizes) > 1:
        raise FormatError(f"W4A16 experts use group sizes {sorted(group_sizes)}; AscendV1 records one global group_size "
                          "(rule: quant_model_description.json 'group_size')")
    description: dict[str, Any] = {}
    float_modules = float_experts_modules(ck, AutoConfig.for_model(**{k: v for k, v in ck.config.items() if k != "quantization_config"}))

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in float_tensors(ck, naming, float_modules):
            description[name] = FLOAT
            yield name, t
        for spec, base, codes in expert_linears(ck, naming):
            for name, t in linear_tensors(base, codes, types[spec.prefix]).items():
                description[name] = types[spec.prefix]
                yield name, t

    model_type = max(types.values(), key=PRIORITY.index)
    config = {k: v for k, v in ck.config.items() if k != "quantization_config"}
    config["quantize"] = model_type.lower()  # what MindIE reads; msModelSlim's examples set it the same way
    with atomic_output_dir(out_dir, overwrite=overwrite, protect=[checkpoint]) as tmp:
        writer = ShardWriter(tmp, parse_size(max_shard_size))
        for name, t in tensors():
            writer.add(name, t)
        writer.close()
        description.update({"model_quant_type": model_type, "version": "1.0.0",
                            "group_size": group_sizes.pop() if group_sizes else 0, "metadata": {"producer": "gmmquant"}})
        (tmp / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_side_files(ck.path, tmp)
    logger.info("exported %s -> %s (AscendV1, %s)", checkpoint, out_dir, model_type)
    return Path(out_dir)


class _Reader:
    """scheme_for / decode of one quant_model_description.json."""

    def __init__(self, description: dict[str, Any], where: str):
        self.description, self.where = description, where
        self.group_size = int(description.get("group_size") or 0) or None

    def _type(self, base: str, tensors: dict[str, torch.Tensor]) -> str:
        for suffix in ("weight", "weight_packed"):
            if suffix in tensors:
                return str(self.description.get(f"{base}.{suffix}", FLOAT))
        return FLOAT

    def scheme_for(self, base: str, tensors: dict[str, torch.Tensor]) -> Optional[QuantScheme]:
        qtype = self._type(base, tensors)
        if qtype == FLOAT:
            return None
        if qtype == "W8A8_DYNAMIC":
            return make_scheme(8, None, True, "dynamic")
        if qtype == "W4A16":
            if self.group_size is None:
                raise FormatError(f"{self.where}: {base} is W4A16 but {DESCRIPTION} has no group_size")
            return make_scheme(4, self.group_size, True)
        if qtype == "W8A16":
            scale = tensors.get("weight_scale")
            offset = tensors.get("weight_offset")
            groups = None if scale is None or scale.dim() < 2 or scale.shape[1] == 1 else tensors["weight"].shape[1] // scale.shape[1]
            symmetric = offset is None or not bool(offset.ne(0).any())
            return make_scheme(8, groups, symmetric)
        raise FormatError(f"{self.where}: {base} has quant type {qtype!r}, which gmmquant does not import "
                          "(rule: FLOAT, W8A8_DYNAMIC, W8A16 or W4A16)")

    def decode(self, base: str, tensors: dict[str, torch.Tensor], scheme: QuantScheme) -> LinearCodes:
        if "weight_packed" in tensors:
            shape = tensors.get("weight_shape")
            if shape is None or shape.numel() != 2:
                raise FormatError(f"{self.where}: {base}.weight_shape missing or not [2]")
            n, k = (int(v) for v in shape.tolist())
            q = unpack_offset_binary(tensors["weight_packed"], 4, k)
        else:
            q = tensors["weight"]
            if q.dtype != torch.int8:
                raise FormatError(f"{self.where}: {base}.weight is {q.dtype}, expected int8")
            n, k = q.shape
        scale = tensors.get("weight_scale")
        if scale is None:
            raise FormatError(f"{self.where}: {base}.weight_scale missing")
        scale = scale.reshape(n, -1)
        zero = None
        if not scheme.symmetric:
            offset = tensors["weight_offset"].reshape(n, -1).float()
            zero = offset.round().to(torch.int32)
            if not torch.equal(zero.float(), offset):
                raise FormatError(f"{self.where}: {base}.weight_offset is not integer-valued: not a zero point")
        elif "weight_offset" in tensors and bool(tensors["weight_offset"].ne(0).any()):
            raise FormatError(f"{self.where}: {base}: {self.description.get(base + '.weight')} weights must be symmetric "
                              "(rule: weight_offset all zero)")
        return LinearCodes(q, scale, zero)


def read_ascend(path: "str | os.PathLike") -> ForeignCheckpoint:
    """Convert an AscendV1 MoE checkpoint (W8A8_DYNAMIC, W8A16 or W4A16 experts) to gmmquant's layout.

    Expert codes move into the kernel layout without dequantization; `antiquant_offset = -weight_offset`.
    Non-expert linears of type W8A8_DYNAMIC / W8A16 are dequantized to the model dtype.

    Raises:
        FormatError: no or invalid quant_model_description.json, or a type / scheme the kernel cannot run.
    """
    root = Path(path)
    description = read_json_object(root / DESCRIPTION, DESCRIPTION)
    config = read_json_object(root / "config.json", "config.json")
    config.pop("quantization_config", None)
    config.pop("quantize", None)
    reader = _Reader(description, str(root))
    return read_foreign(root, LinearFormat("AscendV1", SUFFIXES, reader.scheme_for, reader.decode), config, read_all(root))
