"""MXFP4 checkpoints (gpt-oss): `quantization_config.quant_method == "mxfp4"`.

Layout (as transformers' integrations/mxfp4.py reads it): the model's fused expert parameter `X`
(`mlp.experts.gate_up_proj` `[E, H, 2I]`, `mlp.experts.down_proj` `[E, I, H]`) is stored as
- `X_blocks` uint8 `[E, out, in/32, 16]`: 32 fp4 e2m1 values per block, two per byte, element `2j` in the
  low nibble of byte `j`, element `2j+1` in the high nibble;
- `X_scales` uint8 `[E, out, in/32]`: one e8m0 exponent per block of 32, scale `2 ** (byte - 127)`.
The float weight `[E, out, in]` is transposed to the parameter's `[E, in, out]`. Biases (`X_bias`) and every
non-expert tensor are stored in bf16 and pass through.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .base import SourceError, SourceFormat, Stored

BLOCKS, SCALES = "_blocks", "_scales"
# e2m1 codes 0..15: sign bit 3, exponent bits 1-2, mantissa bit 0.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127
RULE = "mxfp4 stores X_blocks uint8 [..., out, in/32, 16] and X_scales uint8 [..., out, in/32] for each parameter X"


def group(names: Iterable[str]) -> dict[str, Stored]:
    """`X_blocks` + `X_scales` -> logical `X`; everything else stands alone."""
    names = set(names)
    out = {}
    for name in names:
        if name.endswith(SCALES):
            if name[: -len(SCALES)] + BLOCKS not in names:
                raise SourceError(f"{name}: scales without {name[: -len(SCALES)] + BLOCKS!r} (rule: {RULE})")
            continue
        if name.endswith(BLOCKS):
            base = name[: -len(BLOCKS)]
            if base + SCALES not in names:
                raise SourceError(f"{name}: blocks without their scale tensor {base + SCALES!r} (rule: {RULE})")
            out[base] = Stored(name, {"scales": base + SCALES})
        else:
            out[name] = Stored(name)
    return out


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype, where: str) -> Tensor:
    """uint8 blocks `[..., out, G, 16]` + uint8 e8m0 scales `[..., out, G]` -> `dtype` `[..., G*32, out]`
    (transposed: the `[.., in, out]` layout of gpt-oss's parameters). e2m1 times a power of two is exact in
    float32; one rounding to `dtype`."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise SourceError(f"{where}: blocks {blocks.dtype} / scales {scales.dtype}, expected uint8 / uint8 (rule: {RULE})")
    if blocks.dim() < 3 or blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise SourceError(f"{where}: blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match (rule: {RULE})")
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    low, high = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]
    values = torch.stack([low, high], dim=-1).flatten(-2)  # [..., out, G, 32]: low nibble first
    values = torch.ldexp(values, (scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1).float())
    return values.flatten(-2).transpose(-1, -2).to(dtype)


def make(qc: dict[str, Any]) -> SourceFormat:
    """The SourceFormat of a `quant_method: mxfp4` quantization_config."""

    def dequantize(name: str, main: Tensor, companions: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        if "scales" not in companions:
            return main
        return dequantize_mxfp4(main, companions["scales"], dtype, name)

    return SourceFormat("mxfp4", group, dequantize, quantized=True)


__all__ = ["E2M1_VALUES", "dequantize_mxfp4", "group", "make"]
