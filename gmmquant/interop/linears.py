"""Stacked GMM tensors of one projection <-> one quantized nn.Linear per expert (and per gate / up part).

Every foreign format here describes an expert projection the Hugging Face way: an nn.Linear weight `[N, K]`
of signed integer codes, a scale per output row (`[N, 1]`) or per row and K-group (`[N, K/g]`), and, if
asymmetric, a zero point of the scale's shape that is SUBTRACTED: `w = (q - zero_point) * scale`.
gmmquant stores all experts of a projection stacked in the kernel's layout `[E, K, N]` (int4 packed 8 per
int32 along N) with `antiquant_offset = -zero_point` (ADDED by the kernel). The sign flip lives only here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..kernels import pack_int4, unpack_int4
from ..pack.format import FormatError
from ..pack.primitives import QuantizedWeight, antiquant_offset, stored_scale_dtype
from ..pack.schemes import QuantScheme


@dataclass
class LinearCodes:
    """One expert's quantized nn.Linear.

    Attributes:
        q: `[N, K]` int8 signed codes (int4 codes in [-8, 7]).
        scale: `[N, G]` float (G = 1 per-channel, K/g per-group).
        zero_point: `[N, G]` int32, subtracted; None if symmetric.
    """

    q: Tensor
    scale: Tensor
    zero_point: Optional[Tensor] = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """`[N, K]` float weight `(q - zero_point) * scale`, computed in float32 then cast."""
        n, k = self.q.shape
        g = self.scale.shape[1]
        q = self.q.float().reshape(n, g, k // g)
        if self.zero_point is not None:
            q = q - self.zero_point.float().unsqueeze(-1)
        return (q * self.scale.float().unsqueeze(-1)).reshape(n, k).to(dtype)


def split_projection(qw: QuantizedWeight, parts: int) -> list[list[LinearCodes]]:
    """Per-expert nn.Linear codes of a stacked projection.

    Args:
        qw: `qweight` `[E, K, N]` int8 or `[E, K, N/8]` int32; `scale` `[E, N]` or `[E, K/g, N]`; `offset` likewise.
        parts: 2 to split N into gate and up halves (gate_up_proj), 1 otherwise.

    Returns:
        `out[e][part]` with q `[N/parts, K]`, scale and zero_point `[N/parts, G]` (scale keeps its dtype).
    """
    values = unpack_int4(qw.qweight) if qw.qweight.dtype == torch.int32 else qw.qweight
    e, k, n = values.shape
    scale = qw.scale if qw.scale.dim() == 3 else qw.scale.unsqueeze(1)  # [E, G, N]
    zero = None if qw.offset is None else (-qw.offset.float()).round().to(torch.int32)
    if zero is not None and not torch.equal(zero.float(), -qw.offset.float()):
        raise FormatError("antiquant_offset holds non-integer values: it is not a zero point any integer format can store")
    if zero is not None:
        zero = zero if zero.dim() == 3 else zero.unsqueeze(1)
    width = n // parts
    out = []
    for i in range(e):
        row = []
        for p in range(parts):
            cols = slice(p * width, (p + 1) * width)
            row.append(LinearCodes(values[i, :, cols].t().contiguous(), scale[i, :, cols].t().contiguous(),
                                   None if zero is None else zero[i, :, cols].t().contiguous()))
        out.append(row)
    return out


def merge_projection(linears: list[list[LinearCodes]], scheme: QuantScheme, act_dtype: torch.dtype) -> QuantizedWeight:
    """Inverse of `split_projection`: `linears[e][part]` -> stacked GMM tensors of `scheme`.

    Scales are cast to the dtype the kernel takes (the activation dtype for weight-only schemes, the W8A8
    `scale` dtype otherwise); codes and zero points are moved, never re-rounded.

    Raises:
        FormatError: experts or parts disagree in shape, or the codes do not fit the scheme's bit width.
    """
    for p in range(len(linears[0])):
        shapes = {(tuple(row[p].q.shape), tuple(row[p].scale.shape)) for row in linears}
        if len(shapes) != 1:
            raise FormatError(f"experts of one projection disagree in shape (part {p}): {sorted(shapes)}")
    q = torch.stack([torch.cat([c.q for c in row], dim=0).t() for row in linears])  # [E, K, N]
    scale = torch.stack([torch.cat([c.scale for c in row], dim=0).t() for row in linears])  # [E, G, N]
    half = 1 << (scheme.weight_bits - 1)
    if q.numel() and (int(q.min()) < -half or int(q.max()) > half - 1):
        raise FormatError(f"codes outside the signed {scheme.weight_bits}-bit range [{-half}, {half - 1}] "
                          f"(scheme {scheme.name}): the format reader decoded packed codes as unpacked ones")
    has_zero = [c.zero_point is not None for row in linears for c in row]
    if any(has_zero) != all(has_zero):
        raise FormatError("some experts of one projection have zero points and others do not")
    stored = stored_scale_dtype(scheme, act_dtype)
    offset = None
    if all(has_zero):
        zero = torch.stack([torch.cat([c.zero_point for c in row], dim=0).t() for row in linears])
        offset = antiquant_offset(zero, stored)
    if scheme.group_size is None:
        if scale.shape[1] != 1:
            raise FormatError(f"per-channel scheme but {scale.shape[1]} scale groups per row")
        scale = scale[:, 0]
        offset = None if offset is None else offset[:, 0]
    qweight = pack_int4(q) if scheme.weight_bits == 4 else q.to(torch.int8).contiguous()
    return QuantizedWeight(qweight.contiguous(), scale.to(stored).contiguous(), None if offset is None else offset.contiguous(), scheme)

