"""compressed-tensors checkpoints (llm-compressor): `quantization_config.quant_method == "compressed-tensors"`.

Two formats are read as sources (dequantized, then re-quantized by gmmquant's recipes):
- `float-quantized` (FP8): `X.weight` float8_e4m3fn `[out, in]` and `X.weight_scale` float32 whose shape
  says the strategy: `[1]` / scalar (tensor), `[out, 1]` (channel), `[out, in/g]` (group),
  `[ceil(out/b0), ceil(in/b1)]` (block); `w = weight * weight_scale` broadcast over its block.
- `pack-quantized` (int4 / int8 in int32): `X.weight_packed` int32 `[out, in*bits/32]` (offset-binary,
  interop/packing.py), `X.weight_scale` `[out, groups]`, optional `X.weight_zero_point` (packed along out),
  `X.weight_shape` int `[2]`; `w = (q - zero_point) * scale`. The bit width comes from the config group
  whose `targets` match (only one weight bit width per checkpoint is supported).
Activation companions (`input_scale`, `input_zero_point`) are dropped: gmmquant calibrates its own.
Other formats (`int-quantized`, `nvfp4-pack-quantized`, `marlin-24`, sparse ones) are refused by name.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from ..interop.packing import unpack_offset_binary, unpack_rows
from .base import SourceError, SourceFormat, Stored, expand_blocks

SUPPORTED = ("float-quantized", "pack-quantized", "dense", "naive-quantized")
COMPANIONS = ("weight_scale", "weight_zero_point", "weight_shape", "input_scale", "input_zero_point",
              "weight_g_idx", "weight_global_scale")
RULE = ("compressed-tensors stores X.weight (float-quantized) or X.weight_packed (pack-quantized) with "
        "X.weight_scale [out, groups] or a block grid")


def _formats(qc: dict[str, Any]) -> set[str]:
    groups = qc.get("config_groups") or {}
    found = {g.get("format") for g in groups.values() if isinstance(g, dict) and g.get("format")}
    return found or {qc.get("format") or "dense"}


def _weight_bits(qc: dict[str, Any]) -> int:
    bits = {int(g["weights"]["num_bits"]) for g in (qc.get("config_groups") or {}).values()
            if isinstance(g, dict) and isinstance(g.get("weights"), dict) and "num_bits" in g["weights"]}
    if len(bits) > 1:
        raise SourceError(f"compressed-tensors: weight bit widths {sorted(bits)} in one checkpoint; one is supported")
    return bits.pop() if bits else 4


def group(names: Iterable[str]) -> dict[str, Stored]:
    """`X.weight[_packed]` + companions -> logical `X.weight`."""
    names = set(names)
    out = {}
    for name in names:
        base, _, leaf = name.rpartition(".")
        if leaf in COMPANIONS:
            continue
        if leaf == "weight_packed":
            parts = {c: f"{base}.{c}" for c in COMPANIONS if f"{base}.{c}" in names}
            if "weight_scale" not in parts:
                raise SourceError(f"{name}: packed weight without {base}.weight_scale (rule: {RULE})")
            out[f"{base}.weight"] = Stored(name, parts)
        elif leaf == "weight":
            parts = {c: f"{base}.{c}" for c in COMPANIONS if f"{base}.{c}" in names}
            out[name] = Stored(name, parts)
        else:
            out[name] = Stored(name)
    return out


def _scale_grid(scale: Tensor, rows: int, cols: int, where: str) -> Tensor:
    """A weight_scale of any strategy as a float32 `[..., rows, cols]` tensor (a broadcast view where possible)."""
    s = scale.float()
    if s.numel() == 1:
        return s.reshape(()).expand(rows, cols) if scale.dim() <= 2 else s
    if s.dim() == 1:
        s = s.unsqueeze(-1)  # [out] per channel
    return expand_blocks(s, rows, cols, where, RULE)


def make(qc: dict[str, Any]) -> SourceFormat:
    """The SourceFormat of a `quant_method: compressed-tensors` quantization_config."""
    formats = _formats(qc)
    unsupported = sorted(f for f in formats if f not in SUPPORTED)
    if unsupported:
        raise SourceError(f"compressed-tensors format(s) {unsupported} are not supported as a source (rule: gmmquant reads "
                          "float-quantized and pack-quantized weights); dequantize the checkpoint first")
    bits = _weight_bits(qc)

    def dequantize(name: str, main: Tensor, companions: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        scale = companions.get("weight_scale")
        if scale is None:
            if main.dtype.is_floating_point and main.element_size() == 1:
                raise SourceError(f"{name}: float8 weight without weight_scale (rule: {RULE})")
            return main
        if main.dtype == torch.int32:  # pack-quantized
            shape = companions.get("weight_shape")
            rows = main.shape[-2]
            cols = int(shape.reshape(-1)[-1]) if shape is not None else main.shape[-1] * (32 // bits)
            q = unpack_offset_binary(main, bits, cols).float()
            zp = companions.get("weight_zero_point")
            if zp is not None:
                zp = unpack_rows(zp, bits, rows).float() if zp.dtype == torch.int32 else zp.float()
                q = q - _scale_grid(zp, rows, cols, name)
            return (q * _scale_grid(scale, rows, cols, name)).to(dtype)
        if main.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8):
            raise SourceError(f"{name}: dtype {main.dtype} with a weight_scale is neither float8 nor packed int32 (rule: {RULE})")
        rows, cols = main.shape[-2:]
        w = main.float()
        zp = companions.get("weight_zero_point")
        if zp is not None and main.dtype == torch.int8:
            w = w - _scale_grid(zp, rows, cols, name)
        return (w * _scale_grid(scale, rows, cols, name)).to(dtype)

    return SourceFormat("compressed-tensors", group, dequantize, quantized=True)


__all__ = ["group", "make"]
