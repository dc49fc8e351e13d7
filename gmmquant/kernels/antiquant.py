"""Weight-only dequantization: the one place that fixes the sign of the antiquant offset."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .int4 import unpack_int4


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
    q = q.to(dtype)
    scale = antiquant_scale.to(dtype)
    offset = None if antiquant_offset is None else antiquant_offset.to(dtype)
    if scale.dim() == q.dim():  # per-group: expand each group's row over its K / G rows of the weight
        rows = q.shape[-2] // scale.shape[-2]
        scale = scale.repeat_interleave(rows, dim=-2)
        offset = None if offset is None else offset.repeat_interleave(rows, dim=-2)
    else:
        scale = scale.unsqueeze(-2)
        offset = None if offset is None else offset.unsqueeze(-2)
    if offset is not None:
        q = q + offset
    return q * scale
