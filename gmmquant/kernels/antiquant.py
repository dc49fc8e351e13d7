"""Weight-only dequantization: the one place that fixes the sign of the antiquant offset.

`antiquant_dequantize` is the quantization math (any dtype, float32 by default). `npu_antiquant_weight`
is what npu_grouped_matmul multiplies by in its weight-only mode: the same formula, rounded to the
activation dtype the way the NPU rounds it (docs/KERNELS.md, "Numerics").
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .int4 import unpack_int4


def _by_group(q: Tensor, param: Tensor) -> tuple[Tensor, Tensor]:
    """Views of q `[..., K, N]` and param that broadcast without copying the parameter K / G times.

    Per-group: q as `[..., G, K/G, N]` and param as `[..., G, 1, N]`; per-channel: q and param `[..., 1, N]`.
    """
    if param.dim() == q.dim():
        g = param.shape[-2]
        return q.reshape(*q.shape[:-2], g, q.shape[-2] // g, q.shape[-1]), param.unsqueeze(-2)
    return q, param.unsqueeze(-2)


def antiquant_dequantize(
    weight: Tensor,
    antiquant_scale: Tensor,
    antiquant_offset: Optional[Tensor] = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Dequantize a weight-only weight as npu_grouped_matmul does: `w = (q + antiquant_offset) * antiquant_scale`.

    The offset is ADDED, so a quantizer with zero point z stores `antiquant_offset = -z`.

    Args:
        weight: `[..., K, N]` int8, or `[..., K, N/8]` int32 (packed int4, see `int4.py`).
        antiquant_scale: `[..., N]` (per-channel) or `[..., G, N]` with G dividing K (per-group: row k
            uses group `k // (K / G)`), in the activation dtype.
        antiquant_offset: None or the shape of antiquant_scale.
        dtype: dtype of the result and of the arithmetic.

    Returns:
        `[..., K, N]` tensor of `dtype`.
    """
    q = unpack_int4(weight) if weight.dtype == torch.int32 else weight
    w, scale = _by_group(q.to(dtype), antiquant_scale.to(dtype))
    if antiquant_offset is not None:
        w = w + _by_group(q, antiquant_offset.to(dtype))[1]
    return (w * scale).reshape(q.shape)


def npu_antiquant_weight(
    weight: Tensor,
    antiquant_scale: Tensor,
    antiquant_offset: Optional[Tensor],
    x_dtype: torch.dtype,
) -> Tensor:
    """The dequantized weight npu_grouped_matmul's weight-only mode multiplies x by, in x's dtype.

    The NPU dequantizes in the activation dtype (upstream's A16W4 golden):
      - float16: `w16 = q.to(fp16)`, `w16 = w16 + offset` (rounded to fp16), `w16 = w16 * scale` (rounded);
      - bfloat16: `(q + offset) * scale` in float32, rounded to bf16 once.
    The matmul then accumulates in float32 and the output is rounded once.

    Args:
        weight: `[..., K, N]` int8 or `[..., K, N/8]` int32 (packed int4).
        antiquant_scale / antiquant_offset: `[..., N]` or `[..., G, N]` in x_dtype (offset may be None).
        x_dtype: torch.float16 or torch.bfloat16.

    Returns:
        `[..., K, N]` tensor of x_dtype.
    """
    q = unpack_int4(weight) if weight.dtype == torch.int32 else weight
    shape = q.shape
    if x_dtype == torch.float16:
        w, scale = _by_group(q.to(torch.float16), antiquant_scale.to(torch.float16))
        if antiquant_offset is not None:
            w = w + _by_group(q, antiquant_offset.to(torch.float16))[1]
        return w.mul_(scale).reshape(shape)
    if antiquant_offset is None:
        # q has at most 8 significant bits and a bf16 scale 8, so their float32 product is exact and a
        # bf16 multiply (float32 product, one rounding) equals the float32 formula below, bit for bit,
        # at half the memory traffic.
        w, scale = _by_group(q.to(torch.bfloat16), antiquant_scale.to(torch.bfloat16))
        return (w * scale).reshape(shape)
    w, scale = _by_group(q.to(torch.float32), antiquant_scale.float())
    w.add_(_by_group(q, antiquant_offset.float())[1]).mul_(scale)
    return w.reshape(shape).to(x_dtype)
