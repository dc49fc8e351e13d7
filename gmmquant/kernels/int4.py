"""int4 values packed eight to an int32, in torch_npu's layout.

Value j of a word (j = 0..7) sits at bits 4j..4j+3, low nibble first, as two's-complement int4 in
[-8, 7]. This is what `torch_npu.npu_quantize(..., dtype=torch.quint4x2, axis=-1, div_mode=False)` and
`torch_npu.npu_convert_weight_to_int4pack` produce and what npu_grouped_matmul reads from an int32 weight.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from .errors import GMMContractError

INT4_MIN, INT4_MAX = -8, 7
INT4_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # bit offset of value j within its word


def pack_int4(values: Tensor) -> Tensor:
    """Pack int4 values along the last dim.

    Args:
        values: `[..., N]` int8 / int16 / int32 / int64 with every value in [-8, 7]; N a multiple of 8.

    Returns:
        `[..., N/8]` int32. On an NPU this delegates to `torch_npu.npu_convert_weight_to_int4pack`.
    """
    if values.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
        raise GMMContractError("int4.dtype", f"pack_int4 takes an integer tensor, got {values.dtype}")
    if values.dim() == 0 or values.shape[-1] % 8:
        raise GMMContractError("int4.last_dim", f"pack_int4 needs the last dim to be a multiple of 8, got shape {list(values.shape)}")
    if values.numel() and (int(values.min()) < INT4_MIN or int(values.max()) > INT4_MAX):
        raise GMMContractError("int4.range", f"int4 values must lie in [-8, 7], got min {int(values.min())}, max {int(values.max())}")
    if values.device.type == "npu":
        import torch_npu  # noqa: PLC0415 - only importable on Ascend machines

        return torch_npu.npu_convert_weight_to_int4pack(values.to(torch.int32))
    # Shift in int64 so that a top nibble >= 8 does not overflow; the shifted nibbles occupy disjoint bits,
    # so their sum is their bitwise OR. The word is then wrapped into int32's range.
    nibbles = (values.to(torch.int64) & 0xF).reshape(*values.shape[:-1], values.shape[-1] // 8, 8)  # not -1: empty inputs
    words = (nibbles << INT4_SHIFTS.to(device=values.device, dtype=torch.int64)).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int4(packed: Tensor) -> Tensor:
    """Unpack int32 words into int4 values.

    Args:
        packed: `[..., N/8]` int32.

    Returns:
        `[..., N]` int8 in [-8, 7].
    """
    if packed.dtype != torch.int32:
        raise GMMContractError("int4.dtype", f"unpack_int4 takes int32 words, got {packed.dtype}")
    if packed.dim() and packed.stride(-1) == 1 and sys.byteorder == "little":
        # Byte j of a little-endian word holds values 2j (low nibble) and 2j+1 (high nibble); int8 shifts
        # are arithmetic, so `(b << 4) >> 4` and `b >> 4` sign-extend each nibble. ~15x faster than the
        # generic path below, which matters when weights are dequantized per call.
        b = packed.view(torch.int8)
        return torch.stack(((b << 4) >> 4, b >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 8)
    nibbles = (packed.unsqueeze(-1) >> INT4_SHIFTS.to(packed.device)) & 0xF
    signed = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return signed.to(torch.int8).reshape(*packed.shape[:-1], packed.shape[-1] * 8)
