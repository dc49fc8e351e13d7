"""compressed-tensors' int32 packing of 4- and 8-bit values (also read by vllm-ascend's W4A16 MoE loader).

The layout, as compressed-tensors' `pack_to_int32` writes it for bit widths that divide 32: values are
stored offset-binary (`q + 2**(bits-1)`, so int4 [-8, 7] becomes [0, 15]) and `32 // bits` of them share an
int32 word along the packed dim, value j of a word at bits `bits*j .. bits*j + bits - 1` (low first).
Weights are packed along their last dim (K of an nn.Linear `[N, K]` weight); zero points along dim 0.

This differs from gmmquant's own int4 layout (kernels/int4.py: two's complement, packed along N of `[K, N]`),
so converting between them is an unpack / transpose / repack of integer codes, never a dequantization.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..pack.format import FormatError

PACKED_BITS = (4, 8)


def _check_bits(bits: int) -> int:
    if bits not in PACKED_BITS:
        raise FormatError(f"pack-quantized: {bits}-bit values are not supported here (rule: 4 or 8 bits, which divide an int32)")
    return 32 // bits


def pack_offset_binary(values: Tensor, bits: int) -> Tensor:
    """Pack signed codes along the last dim, compressed-tensors style.

    Args:
        values: `[..., K]` integer tensor with codes in `[-2**(bits-1), 2**(bits-1) - 1]`; K a multiple of `32 // bits`.
        bits: 4 or 8.

    Returns:
        `[..., K * bits / 32]` int32.
    """
    per_word = _check_bits(bits)
    if values.shape[-1] % per_word:
        raise FormatError(f"pack-quantized: the packed dim ({values.shape[-1]}) must be a multiple of {per_word} for {bits}-bit values")
    half = 1 << (bits - 1)
    if values.numel() and (int(values.min()) < -half or int(values.max()) > half - 1):
        raise FormatError(f"pack-quantized: {bits}-bit codes must lie in [{-half}, {half - 1}]")
    unsigned = (values.to(torch.int64) + half).reshape(*values.shape[:-1], -1, per_word)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)
    words = (unsigned << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_offset_binary(packed: Tensor, bits: int, length: int) -> Tensor:
    """Inverse of `pack_offset_binary`: `[..., W]` int32 -> `[..., length]` int8 signed codes (`length <= W * 32/bits`)."""
    per_word = _check_bits(bits)
    if packed.dtype != torch.int32:
        raise FormatError(f"pack-quantized: packed values must be int32, got {packed.dtype}")
    if length > packed.shape[-1] * per_word:
        raise FormatError(f"pack-quantized: {packed.shape[-1]} words hold at most {packed.shape[-1] * per_word} values, shape says {length}")
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=packed.device)
    codes = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(*packed.shape[:-1], -1)[..., :length]
    return (codes - (1 << (bits - 1))).to(torch.int8)


def pack_rows(values: Tensor, bits: int) -> Tensor:
    """Pack a 2-D `[R, C]` tensor along dim 0 (compressed-tensors' layout for zero points) -> `[R * bits / 32, C]`."""
    return pack_offset_binary(values.t(), bits).t().contiguous()


def unpack_rows(packed: Tensor, bits: int, rows: int) -> Tensor:
    """Inverse of `pack_rows`: `[W, C]` int32 -> `[rows, C]` int8."""
    return unpack_offset_binary(packed.t(), bits, rows).t().contiguous()
