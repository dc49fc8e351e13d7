"""compressed-tensors checkpoints (what llm-compressor saves and vLLM loads): export and import.

Layout, per expert and per gate / up / down nn.Linear (`<base>` = e.g. `model.layers.0.mlp.experts.3.gate_proj`):

| format | tensors |
|---|---|
| `pack-quantized` (W4A16, W8A16) | `<base>.weight_packed` int32 `[N, K*bits/32]` (offset-binary codes, packing.py), `<base>.weight_scale` `[N, K/g]` or `[N, 1]`, `<base>.weight_shape` int64 `[2]` = (N, K), `<base>.weight_zero_point` int32 `[N*bits/32, K/g or 1]` (asymmetric only, packed along N) |
| `int-quantized` (W8A8) | `<base>.weight` int8 `[N, K]`, `<base>.weight_scale` `[N, 1]`; activations quantized dynamically per token |

Dequantization is `(q - weight_zero_point) * weight_scale` (zero point SUBTRACTED; gmmquant's
`antiquant_offset` is its negation). config.json carries `quantization_config` with `quant_method:
"compressed-tensors"`, `format`, `quantization_status: "compressed"`, `config_groups` (targets + weight /
input-activation arguments) and `ignore`. vLLM picks its MoE method from the scheme of
`<experts>.0.gate_proj` / `.0.up_proj` / `.0.down_proj` (the targets below match those names); every other
Linear-like module is listed in `ignore`, as llm-compressor does.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..pack.checkpoint import copy_side_files, load_quantized
from ..pack.format import ExpertsSpec, FormatError
from ..pack.layouts import meta_model
from ..pack.safety import read_json_object
from ..pack.schemes import QuantScheme
from ..pack.shards import ShardWriter, atomic_output_dir, parse_size
from .export import expert_linears, float_experts_modules, float_tensors, module_pattern
from .foreign import ForeignCheckpoint, LinearFormat, make_scheme, read_all, read_foreign
from .linears import LinearCodes
from .naming import Naming
from .packing import pack_offset_binary, pack_rows, unpack_offset_binary, unpack_rows

logger = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
SUFFIXES = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "input_scale",
            "input_zero_point", "bias")


# ---------------------------------------------------------------- schemes <-> quantization_config


def scheme_to_group(scheme: QuantScheme) -> dict[str, Any]:
    """The compressed-tensors config group (weights / input_activations / format) of a gmmquant scheme.

    Raises:
        FormatError: the scheme has no compressed-tensors MoE form vLLM can run (W8A8 static).
    """
    if scheme.activation == "static":
        raise FormatError(f"scheme {scheme.name!r}: W8A8 with a static activation scale cannot be exported to compressed-tensors "
                          "(rule: vLLM's int8 MoE method, CompressedTensorsW8A8Int8MoEMethod, takes dynamic per-token "
                          "activations only); re-pack with w8a8-dynamic")
    if scheme.a8w4:
        raise FormatError(f"scheme {scheme.name!r}: W4A8 experts are not exported to compressed-tensors (rule: gmmquant "
                          "exports W4A8 as AscendV1 W4A8_DYNAMIC, for vllm-ascend); use --to ascend")
    weights = {"num_bits": scheme.weight_bits, "type": "int", "symmetric": scheme.symmetric,
               "strategy": "group" if scheme.group_size else "channel", "group_size": scheme.group_size,
               "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {}}
    if scheme.weight_only:
        return {"weights": weights, "input_activations": None, "output_activations": None, "format": PACK_QUANTIZED}
    inputs = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True, "group_size": None,
              "actorder": None, "block_structure": None, "observer": None, "observer_kwargs": {}}
    return {"weights": weights, "input_activations": inputs, "output_activations": None, "format": INT_QUANTIZED}


def group_to_scheme(group: dict[str, Any], where: str) -> QuantScheme:
    """A gmmquant scheme for a compressed-tensors config group, or FormatError naming the unsupported field."""
    w = group.get("weights") or {}
    a = group.get("input_activations")
    if w.get("type", "int") != "int" or w.get("num_bits") not in (4, 8):
        raise FormatError(f"{where}: weights {w.get('type')} {w.get('num_bits')}-bit are not supported (rule: int4 or int8 weights)")
    strategy = w.get("strategy")
    if strategy not in ("group", "channel"):
        raise FormatError(f"{where}: weight strategy {strategy!r} is not supported (rule: 'channel' or 'group' scales, "
                          "the kernel's per-channel / per-group antiquant_scale)")
    if w.get("actorder") in ("group", "dynamic"):
        raise FormatError(f"{where}: actorder={w.get('actorder')!r} reorders activations by g_idx, which the grouped matmul "
                          "cannot do (rule: no activation reordering); re-quantize with actorder 'static' / 'weight' / null")
    group_size = w.get("group_size") if strategy == "group" else None
    if a is None:
        return make_scheme(w["num_bits"], group_size, bool(w.get("symmetric", True)))
    if (a.get("type", "int"), a.get("num_bits"), a.get("strategy"), bool(a.get("dynamic")), a.get("symmetric", True)) != ("int", 8, "token", True, True):
        raise FormatError(f"{where}: input activations {a} are not supported (rule: int8 symmetric dynamic per-token, "
                          "gmmquant's w8a8-dynamic)")
    return make_scheme(w["num_bits"], group_size, bool(w.get("symmetric", True)), "dynamic")


def _matches(target: str, name: str) -> Optional[int]:
    """Match strength of a compressed-tensors target on a module name: 2 name / regex, 1 class name, None."""
    if target.startswith("re:"):
        return 2 if re.match(target[3:], name) else None
    if target == name:
        return 2
    return 1 if "." not in target else None


class _Reader:
    """scheme_for / decode of one compressed-tensors quantization_config."""

    def __init__(self, qc: dict[str, Any], where: str):
        if qc.get("quantization_status", "compressed") != "compressed":
            raise FormatError(f"{where}: quantization_status is {qc.get('quantization_status')!r}; only 'compressed' "
                              "checkpoints hold integer codes (rule: save with save_compressed=True)")
        if qc.get("sparsity_config"):
            raise FormatError(f"{where}: sparse compressed-tensors checkpoints are not supported")
        self.where = where
        self.default_format = qc.get("format")
        self.ignore = list(qc.get("ignore") or [])
        self.groups = []
        for gname, group in (qc.get("config_groups") or {}).items():
            scheme = group_to_scheme(group, f"{where}: config group {gname!r}")
            self.groups.append((gname, list(group.get("targets") or []), scheme, group.get("format") or self.default_format))
        if not self.groups:
            raise FormatError(f"{where}: quantization_config has no config_groups")
        self._format: dict[QuantScheme, str] = {}

    def scheme_for(self, base: str, tensors: dict[str, torch.Tensor]) -> Optional[QuantScheme]:
        if "weight_scale" not in tensors:
            return None
        best = None
        for gname, targets, scheme, fmt in self.groups:
            strength = max((m for t in targets if (m := _matches(t, base)) is not None), default=None)
            if strength is not None and (best is None or strength > best[0]):
                best = (strength, scheme, fmt)
        if best is None:
            raise FormatError(f"{self.where}: {base} holds quantized tensors but no config group targets it")
        if best[2] not in (PACK_QUANTIZED, INT_QUANTIZED):
            raise FormatError(f"{self.where}: {base}: compression format {best[2]!r} is not supported "
                              f"(rule: {PACK_QUANTIZED!r} or {INT_QUANTIZED!r})")
        self._format[best[1]] = best[2]
        return best[1]

    def decode(self, base: str, tensors: dict[str, torch.Tensor], scheme: QuantScheme) -> LinearCodes:
        if "weight_g_idx" in tensors:
            raise FormatError(f"{self.where}: {base}.weight_g_idx: activation reordering is not supported")
        bits = scheme.weight_bits
        if "weight_packed" in tensors:
            shape = tensors.get("weight_shape")
            if shape is None or shape.numel() != 2:
                raise FormatError(f"{self.where}: {base}.weight_shape missing or not [2] (pack-quantized needs the unpacked shape)")
            n, k = (int(v) for v in shape.tolist())
            q = unpack_offset_binary(tensors["weight_packed"], bits, k)
            if q.shape[0] != n:
                raise FormatError(f"{self.where}: {base}.weight_packed has {q.shape[0]} rows, weight_shape says {n}")
        elif "weight" in tensors and tensors["weight"].dtype == torch.int8:
            q = tensors["weight"]
            n, k = q.shape
        else:
            raise FormatError(f"{self.where}: {base}: no weight_packed (int32) or int8 weight")
        scale = tensors["weight_scale"]
        if scale.dim() == 1:
            scale = scale.unsqueeze(1)
        groups = k // scheme.group_size if scheme.group_size else 1
        if tuple(scale.shape) != (n, groups):
            raise FormatError(f"{self.where}: {base}.weight_scale has shape {list(scale.shape)}, expected {[n, groups]}")
        zero = None
        if not scheme.symmetric:
            zp = tensors.get("weight_zero_point")
            if zp is None:
                raise FormatError(f"{self.where}: {base}.weight_zero_point missing for an asymmetric scheme")
            zero = (unpack_rows(zp, bits, n) if zp.dtype == torch.int32 else zp.reshape(n, groups)).to(torch.int32)
        return LinearCodes(q, scale, zero)


def read_compressed_tensors(path: "str | os.PathLike") -> ForeignCheckpoint:
    """Convert a compressed-tensors MoE checkpoint (pack-quantized / int-quantized experts) to gmmquant's layout.

    Expert codes are moved into the kernel layout without dequantization: pack-quantized int4 -> int32
    `[E, K, N/8]`, int8 -> `[E, K, N]`, scales -> `antiquant_scale` / `weight_scale` `[E, N]` or `[E, K/g, N]`
    in the activation dtype, zero points -> `antiquant_offset = -zero_point`. Quantized linears outside the
    experts are dequantized to the model dtype.

    Raises:
        FormatError: not a compressed-tensors checkpoint, or a scheme the kernel cannot run.
    """
    root = Path(path)
    config = read_json_object(root / "config.json", "config.json")
    qc = config.pop("quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise FormatError(f"{root}: config.json has no quantization_config with quant_method {QUANT_METHOD!r}")
    reader = _Reader(qc, str(root))
    fmt = LinearFormat(QUANT_METHOD, SUFFIXES, reader.scheme_for, reader.decode)
    return read_foreign(root, fmt, config, read_all(root))


# ---------------------------------------------------------------- export


def linear_tensors(base: str, codes: LinearCodes, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of one expert nn.Linear (see the module docstring)."""
    if not scheme.weight_only:
        return {f"{base}.weight": codes.q.to(torch.int8).contiguous(), f"{base}.weight_scale": codes.scale.contiguous()}
    n, k = codes.q.shape
    out = {f"{base}.weight_packed": pack_offset_binary(codes.q, scheme.weight_bits),
           f"{base}.weight_scale": codes.scale.contiguous(),
           f"{base}.weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if codes.zero_point is not None:
        out[f"{base}.weight_zero_point"] = pack_rows(codes.zero_point.to(torch.int8), scheme.weight_bits)
    return out


def check_exportable(spec: ExpertsSpec, target: str, naming: Optional[Naming] = None) -> None:
    """Refuse experts modules a per-expert-Linear target cannot hold (biases, SmoothQuant factors, and, given the
    model's naming, families whose experts have no per-expert Linear names), before anything is written."""
    if spec.has_bias:
        raise FormatError(f"{spec.prefix}: experts with biases (GPT-OSS) cannot be exported to {target} "
                          "(rule: the engines' per-expert MoE loaders for this format take no expert bias)")
    smoothed = sorted(p for p, names in spec.extra.items() if "smooth_scale" in names)
    if smoothed:
        raise FormatError(f"{spec.prefix}: per-expert SmoothQuant factors ({smoothed}) cannot be exported to {target} "
                          "(rule: the format has no activation smoothing vector and the factors cannot be folded into "
                          "int8 weights exactly); re-pack without smoothing")
    if naming is not None:
        for proj in spec.projections:
            naming.expert_linears(f"{spec.prefix}.{proj}", [0])


def ignored_modules(config: Any, naming: Naming, expert_paths: list[str]) -> list[str]:
    """Original names of every module with a 2-D weight outside the experts modules (attention, routers, shared
    experts, dense MLPs, lm_head): the Linear-like layers an engine must keep in float."""
    out = []
    for name, module in meta_model(config).named_modules():
        if any(name == p or name.startswith(p + ".") for p in expert_paths) or isinstance(module, nn.Embedding):
            continue
        weight = module._parameters.get("weight")
        if weight is not None and weight.dim() == 2:
            out.append(naming.to_disk(f"{name}.weight")[: -len(".weight")])
    return sorted(set(out))


def export_compressed_tensors(checkpoint: "str | os.PathLike", out_dir: "str | os.PathLike", *,
                              max_shard_size: "int | str" = "2GB", overwrite: bool = False) -> Path:
    """Write a gmmquant checkpoint as a compressed-tensors checkpoint vLLM loads.

    Weight-only schemes become `pack-quantized` (4 or 8 bits, per-channel or per-group, symmetric or with
    packed zero points), W8A8 dynamic becomes `int-quantized` with dynamic per-token int8 activations.
    Expert tensors are renamed to the model's per-expert nn.Linear names and transposed to `[N, K]`;
    other tensors keep their values under the model's original checkpoint names. Written atomically.

    Raises:
        FormatError: an experts module the format cannot represent (W8A8 static, SmoothQuant factors,
            expert biases, a family whose experts are fused on disk).
    """
    from transformers import AutoConfig

    ck = load_quantized(checkpoint)
    naming = Naming(ck.config["model_type"])
    for spec in ck.specs.values():
        check_exportable(spec, QUANT_METHOD, naming)
        scheme_to_group(spec.scheme)
    by_scheme: dict[QuantScheme, list[ExpertsSpec]] = {}
    for spec in ck.specs.values():
        by_scheme.setdefault(spec.scheme, []).append(spec)
    groups = {}
    for i, (scheme, specs) in enumerate(by_scheme.items()):
        groups[f"group_{i}"] = {**scheme_to_group(scheme), "targets": [module_pattern(naming, s.prefix, s.projections) for s in specs]}
    formats = {g["format"] for g in groups.values()}
    config = {k: v for k, v in ck.config.items() if k != "quantization_config"}
    hf_config = AutoConfig.for_model(**config)
    float_modules = float_experts_modules(ck, hf_config)
    ignore = ignored_modules(hf_config, naming, list(ck.specs) + list(float_modules))
    ignore += [module_pattern(naming, p, info.projections) for p, info in float_modules.items()]
    qc = {"quant_method": QUANT_METHOD, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
          "quantization_status": "compressed", "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None,
          "sparsity_config": {}, "transform_config": {}, "global_compression_ratio": None}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        yield from float_tensors(ck, naming, float_modules)
        for spec, base, codes in expert_linears(ck, naming):
            yield from linear_tensors(base, codes, spec.scheme).items()

    with atomic_output_dir(out_dir, overwrite=overwrite, protect=[checkpoint]) as tmp:
        writer = ShardWriter(tmp, parse_size(max_shard_size))
        for name, t in tensors():
            writer.add(name, t)
        writer.close()
        (tmp / "config.json").write_text(json.dumps({**config, "quantization_config": qc}, indent=2, sort_keys=True) + "\n")
        copy_side_files(ck.path, tmp)
    logger.info("exported %s -> %s (compressed-tensors, %s)", checkpoint, out_dir, qc["format"])
    return Path(out_dir)
