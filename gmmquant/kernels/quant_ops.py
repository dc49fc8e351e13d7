"""Companion ops with torch_npu semantics: per-token dynamic quant and the int64 scale encoding.

- `dynamic_quant` is `torch_npu.npu_dynamic_quant`: symmetric per-token int8 (or packed int4).
- `trans_quant_param` / `decode_quant_param` are `torch_npu.npu_trans_quant_param` and its inverse: a
  float32 scale (and optional offset) carried in int64, the form npu_grouped_matmul takes for int8 output.
On an NPU the first two delegate to torch_npu; elsewhere they compute the same values.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .errors import GMMContractError
from .int4 import pack_int4, unpack_int4

_FP19_MASK = 0xFFFFE000  # keep sign, exponent and the top 10 mantissa bits of a float32
_SCALE_FLAG = 1 << 46  # set by npu_trans_quant_param on every encoded value
_OFFSET_SHIFT = 37  # a 9-bit signed offset sits at bits 37..45


def _torch_npu():
    import torch_npu  # noqa: PLC0415 - importable only on Ascend machines

    return torch_npu


def dynamic_quant(
    x: Tensor,
    *,
    smooth_scales: Optional[Tensor] = None,
    group_index: Optional[Tensor] = None,
    dst_type: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    """Symmetric per-token quantization, as `torch_npu.npu_dynamic_quant`.

    `xs = x * smooth`; `scale = rowmax(|xs|) / D` (D = 127 for int8, 7 for int4); `y = rint(xs / scale)`,
    round half to even, so values lie in [-D, D]. Computed in float32. A row of zeros gets scale 0 and
    y 0 (the NPU divides by zero there).

    Args:
        x: `[..., H]` float16 / bfloat16, at least 2-D.
        smooth_scales: `[H]`, or `[G, H]` with `group_index`; x's dtype.
        group_index: `[G]` int32 cumulative row ends: rows `group_index[i-1]:group_index[i]` use
            `smooth_scales[i]`; the last value equals the number of rows.
        dst_type: None / torch.int8 -> `[..., H]` int8; torch.quint4x2 -> `[..., H/8]` int32 packed int4.

    Returns:
        (y, scale) with scale `x.shape[:-1]` float32.
    """
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise GMMContractError("dynamic_quant.dtype", f"x must be float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2:
        raise GMMContractError("dynamic_quant.rank", f"x must have at least 2 dims, got shape {list(x.shape)}")
    if dst_type not in (None, torch.int8, torch.quint4x2):
        raise GMMContractError("dynamic_quant.dst_type", f"dst_type must be None, torch.int8 or torch.quint4x2, got {dst_type}")
    hidden = x.shape[-1]
    if dst_type == torch.quint4x2 and hidden % 8:
        raise GMMContractError("dynamic_quant.int4_last_dim", f"int4 output needs the last dim to be a multiple of 8, got {hidden}")
    rows = x.reshape(-1, hidden)
    if smooth_scales is not None:
        if smooth_scales.dtype != x.dtype:
            raise GMMContractError("dynamic_quant.smooth_dtype", f"smooth_scales must have x's dtype {x.dtype}, got {smooth_scales.dtype}")
        want = 2 if group_index is not None else 1
        if smooth_scales.dim() != want or smooth_scales.shape[-1] != hidden:
            form = "[G, H]" if want == 2 else "[H]"
            raise GMMContractError("dynamic_quant.smooth_shape", f"smooth_scales must be {form} with H={hidden}, got {list(smooth_scales.shape)}")
    if group_index is not None:
        if smooth_scales is None:
            raise GMMContractError("dynamic_quant.group_index", "group_index needs smooth_scales [G, H]")
        if group_index.dtype != torch.int32 or group_index.dim() != 1 or group_index.shape[0] != smooth_scales.shape[0]:
            raise GMMContractError("dynamic_quant.group_index", f"group_index must be int32 [G] with G={smooth_scales.shape[0]}, got {group_index.dtype} {list(group_index.shape)}")
    if x.device.type == "npu":
        return _torch_npu().npu_dynamic_quant(x, smooth_scales=smooth_scales, group_index=group_index, dst_type=dst_type)

    xs = rows.float()
    if smooth_scales is not None:
        if group_index is None:
            xs = xs * smooth_scales.float()
        else:
            ends = group_index.to(torch.int64)
            if ends.numel() and (bool((ends[1:] < ends[:-1]).any()) or int(ends[-1]) != rows.shape[0]):
                raise GMMContractError("dynamic_quant.group_index", f"group_index must be non-decreasing and end at the row count {rows.shape[0]}, got {ends.tolist()}")
            # Row r uses the first group whose cumulative end exceeds r.
            which = torch.searchsorted(ends, torch.arange(rows.shape[0], device=x.device), right=True)
            xs = xs * smooth_scales.float()[which]
    dmax = 7.0 if dst_type == torch.quint4x2 else 127.0
    lo, hi = torch.aminmax(xs, dim=-1)  # |x|'s row max without materialising |x|
    amax = torch.maximum(hi, -lo)
    scale = amax / dmax
    inv = torch.where(amax > 0, dmax / amax, torch.zeros_like(amax))
    # xs is this function's own float32 copy (x is half precision), so it is scaled in place.
    q = xs.mul_(inv.unsqueeze(-1)).round_().clamp_(-dmax, dmax)
    if dst_type == torch.quint4x2:
        y = pack_int4(q.to(torch.int8)).reshape(*x.shape[:-1], hidden // 8)
    else:
        y = q.to(torch.int8).reshape(x.shape)
    return y, scale.reshape(x.shape[:-1])


def trans_quant_param(scale: Tensor, offset: Optional[Tensor] = None, round_mode: int = 0) -> Tensor:
    """Encode a float32 quantization scale (and offset) into int64, as `torch_npu.npu_trans_quant_param`.

    Bits 13..31 hold the scale as FP19 (float32 with the low 13 mantissa bits cut: round_mode 0 truncates,
    1 rounds to nearest even), bit 46 is set, and bits 37..45 hold `clamp(rint(offset), -256, 255)` as
    9-bit two's complement.

    Args:
        scale: `[t]` or `[1, n]` float32.
        offset: None or float32 of scale's shape (1-D: length 1 or n, broadcast against scale).
        round_mode: 0 (truncate) or 1 (round to nearest even).

    Returns:
        int64 of the broadcast shape.
    """
    if scale.dtype != torch.float32 or (offset is not None and offset.dtype != torch.float32):
        raise GMMContractError("trans_quant_param.dtype", f"scale and offset must be float32, got {scale.dtype} / {None if offset is None else offset.dtype}")
    if scale.dim() not in (1, 2) or (scale.dim() == 2 and scale.shape[0] != 1):
        raise GMMContractError("trans_quant_param.shape", f"scale must be [t] or [1, n], got {list(scale.shape)}")
    if round_mode not in (0, 1):
        raise GMMContractError("trans_quant_param.round_mode", f"round_mode must be 0 or 1, got {round_mode}")
    if scale.device.type == "npu":
        return _torch_npu().npu_trans_quant_param(scale, offset, round_mode=round_mode)
    bits = scale.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if round_mode == 1:
        # Round to nearest even at bit 13; a mantissa carry correctly spills into the exponent.
        low = bits & 0x1FFF
        keep_lsb = (bits >> 13) & 1
        round_up = (low > 0x1000) | ((low == 0x1000) & (keep_lsb == 1))
        bits = bits + round_up.to(torch.int64) * 0x2000
    q = (bits & _FP19_MASK) | _SCALE_FLAG
    if offset is not None:
        o = torch.round(offset).clamp(-256, 255).to(torch.int64) & 0x1FF
        q = q | (o << _OFFSET_SHIFT)
    return q


def decode_quant_param(encoded: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """Inverse of `trans_quant_param`: int64 -> (float32 scale, float32 offset or None if all zero)."""
    if encoded.dtype != torch.int64:
        raise GMMContractError("trans_quant_param.dtype", f"an encoded scale is int64, got {encoded.dtype}")
    low = encoded & 0xFFFFFFFF
    scale = torch.where(low >= 2**31, low - 2**32, low).to(torch.int32).view(torch.float32)
    raw = (encoded >> _OFFSET_SHIFT) & 0x1FF
    offset = torch.where(raw >= 256, raw - 512, raw)
    if not bool(offset.any()):
        return scale, None
    return scale, offset.to(torch.float32)


def a8w4_scale_bias(weight: Tensor, scale: Tensor) -> Tensor:
    """The float32 bias an A8W4 grouped matmul needs: `8 * sum_k(w[k, n] * scale[k // (K/G), n])`.

    The NPU's A8W4 mode splits each int8 activation into two int4 halves, `x = 16 * (x >> 4) + (x & 15)`,
    and offsets the low half by -8 to make it a signed int4, so it computes `(x - 8) @ (w * scale)`;
    this bias restores `x @ (w * scale)`. It is what vllm-ascend builds for llm-compressor W4A8 checkpoints
    and what msModelSlim stores as `scale_bias`.

    Args:
        weight: `[..., K, N/8]` int32 (packed int4) or `[..., K, N]` int8 values in [-8, 7].
        scale: float32 `[..., N]` (per channel) or `[..., G, N]` (per group), or their int64 encoding.

    Returns:
        `[..., N]` float32.
    """
    q = unpack_int4(weight) if weight.dtype == torch.int32 else weight
    s = decode_quant_param(scale)[0] if scale.dtype == torch.int64 else scale.float()
    if s.dim() == q.dim() - 1:
        s = s.unsqueeze(-2)
    k, groups = q.shape[-2], s.shape[-2]
    per_group = q.reshape(*q.shape[:-2], groups, k // groups, q.shape[-1]).to(torch.float32).sum(dim=-2)
    return 8.0 * (per_group * s).sum(dim=-2)
