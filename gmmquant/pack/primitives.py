"""Quantization math in one place: ranges, scales, zero points, quantize / dequantize, GMM packing.

Conventions (DESIGN.md section 2):
- weights are `[..., K, N]` (y = x @ w); per-channel parameters are `[..., N]`, per-group `[..., K/g, N]`;
- quantized values are signed: int8 in [-128, 127], int4 in [-8, 7];
- `w ~ (q - zero_point) * scale`, stored for the kernel as `antiquant_offset = -zero_point`
  (`antiquant_offset` is ADDED by npu_grouped_matmul). `antiquant_offset()` below is the one place that
  knows the sign; `dequantize` goes through the kernel layer's `antiquant_dequantize`.
- a scale is rounded to the dtype it is stored in BEFORE values are quantized with it, so the stored
  checkpoint dequantizes to exactly what the error bounds below were computed against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..kernels import a8w4_scale_bias, antiquant_dequantize, pack_int4, trans_quant_param
from .schemes import QuantScheme

_TINY = torch.finfo(torch.float32).tiny


def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax). Symmetric ranges drop the most negative code so that -q is always representable."""
    top = 2 ** (bits - 1) - 1
    return (-top, top) if symmetric else (-top - 1, top)


def group_view(w: Tensor, group_size: Optional[int]) -> Tensor:
    """`[..., K, N]` -> `[..., 1, K, N]` (per-channel) or `[..., K/g, g, N]` (per-group)."""
    k, n = w.shape[-2], w.shape[-1]
    if group_size is None:
        return w.unsqueeze(-3)
    return w.reshape(*w.shape[:-2], k // group_size, group_size, n)


def minmax(w: Tensor, group_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Per-channel `[..., N]` or per-group `[..., K/g, N]` min and max of a `[..., K, N]` weight (float32)."""
    g = group_view(w.float(), group_size)
    wmin, wmax = g.amin(dim=-2), g.amax(dim=-2)
    if group_size is None:
        wmin, wmax = wmin.squeeze(-2), wmax.squeeze(-2)
    return wmin, wmax


def choose_qparams(wmin: Tensor, wmax: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Scale (float32) and zero point (int32, None if symmetric) that map [wmin, wmax] onto the int range.

    The range always contains 0 (so that zero is exact); an all-zero channel gets scale 1 instead of 0.
    """
    qmin, qmax = quant_range(bits, symmetric)
    wmin = wmin.float().clamp(max=0)
    wmax = wmax.float().clamp(min=0)
    if symmetric:
        scale = torch.maximum(-wmin, wmax) / qmax
        return torch.where(scale > _TINY, scale, torch.ones_like(scale)), None
    scale = (wmax - wmin) / (qmax - qmin)
    scale = torch.where(scale > _TINY, scale, torch.ones_like(scale))
    return scale, zero_point_for(wmin, scale, bits)


def zero_point_for(wmin: Tensor, scale: Tensor, bits: int) -> Tensor:
    """The int32 zero point that puts `min(wmin, 0)` on the lowest code of the asymmetric range."""
    qmin, qmax = quant_range(bits, symmetric=False)
    return torch.round(qmin - wmin.float().clamp(max=0) / scale.float()).clamp(qmin, qmax).to(torch.int32)


def round_scale_up(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """`scale` in `dtype`, rounded up where rounding to nearest went down (the range must still fit)."""
    stored = scale.to(dtype)
    up = torch.nextafter(stored, torch.full_like(stored, float("inf")))
    return torch.where(stored.float() < scale, up, stored)


def _expand(param: Tensor, w: Tensor, group_size: Optional[int]) -> Tensor:
    """Broadcast a per-channel / per-group parameter against the grouped view of w."""
    return param.unsqueeze(-2) if group_size is not None else param.unsqueeze(-2).unsqueeze(-3)


def quantize(w: Tensor, scale: Tensor, zero_point: Optional[Tensor], bits: int, group_size: Optional[int] = None) -> Tensor:
    """`q = clamp(round(w / scale) + zero_point)` -> int8 `[..., K, N]` (int4 values stay unpacked here)."""
    qmin, qmax = quant_range(bits, zero_point is None)
    g = group_view(w.float(), group_size)
    q = torch.round(g / _expand(scale.float(), w, group_size))
    if zero_point is not None:
        q = q + _expand(zero_point.float(), w, group_size)
    return q.clamp_(qmin, qmax).to(torch.int8).reshape(w.shape)


def antiquant_offset(zero_point: Tensor, dtype: torch.dtype) -> Tensor:
    """The kernel's `antiquant_offset` for a zero point: `-zero_point` (the kernel adds it to q)."""
    return (-zero_point).to(dtype)


def dequantize(q: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """`(q - zero_point) * scale` for int8 `[..., K, N]` values (or int32-packed int4) -> `dtype`."""
    offset = None if zero_point is None else antiquant_offset(zero_point, torch.float32)
    return antiquant_dequantize(q, scale, offset, dtype=dtype)


def activation_dtype(model_dtype: Optional[torch.dtype], requested: Optional[torch.dtype] = None) -> torch.dtype:
    """The kernel activation dtype for a model: `requested`, else the model's if bf16/fp16, else bf16."""
    if requested is not None:
        return requested
    return model_dtype if model_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def bias_dtype(act_dtype: torch.dtype) -> torch.dtype:
    """Expert bias dtype the kernel's tables pair with each activation dtype: bf16 -> fp32, fp16 -> fp16."""
    return torch.float16 if act_dtype == torch.float16 else torch.float32


def w8a8_scale_dtype(act_dtype: torch.dtype) -> torch.dtype:
    """Full-quant `scale` dtype the spec pairs with each activation dtype: bf16 -> bf16, fp16 -> fp32."""
    if act_dtype == torch.bfloat16:
        return torch.bfloat16
    if act_dtype == torch.float16:
        return torch.float32
    raise ValueError(f"W8A8 needs bfloat16 or float16 activations, got {act_dtype}")


def stored_scale_dtype(scheme: QuantScheme, act_dtype: torch.dtype) -> torch.dtype:
    """dtype a scheme's scale (and offset) is stored in: act_dtype (weight-only), float32 (W4A8: the kernel
    takes it as an int64-encoded float32), else w8a8_scale_dtype (W8A8)."""
    if scheme.weight_only:
        return act_dtype
    return torch.float32 if scheme.a8w4 else w8a8_scale_dtype(act_dtype)


def round_scale_up_fp19(scale: Tensor) -> Tensor:
    """float32 `scale` rounded up to FP19 (float32 with the low 13 mantissa bits zero), the precision the NPU's
    int64-encoded quantization scales carry (`trans_quant_param`)."""
    bits = scale.float().contiguous().view(torch.int32)
    cut = (bits & ~0x1FFF).view(torch.float32)
    return torch.where(cut < scale, (bits.bitwise_and(~0x1FFF) + 0x2000).view(torch.float32), cut)


def stored_scale(scale: Tensor, scheme: QuantScheme, act_dtype: torch.dtype) -> Tensor:
    """A float32 scale as a checkpoint stores it: rounded UP (the clip range must still fit) to the values the
    kernel sees, in `stored_scale_dtype`.

    W4A8 scales reach the kernel as int64-encoded float32 with 13 mantissa bits cut (FP19); per-group ones are
    also rounded to float16 first by Ascend's loaders (vllm-ascend's W4A8_DYNAMIC, which multiplies the two
    msModelSlim levels and casts to float16). Restricting W4A8 scales to those values makes every reader
    (gmmquant, vllm-ascend, the NPU) multiply by exactly the stored scale.
    """
    if scheme.a8w4:
        return round_scale_up_fp19(round_scale_up(scale, torch.float16).float() if scheme.group_size else scale.float())
    return round_scale_up(scale, stored_scale_dtype(scheme, act_dtype))


def stored_qparams(wmin: Tensor, wmax: Tensor, scheme: QuantScheme, act_dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """Scale and zero point for a clip range, exactly as a checkpoint stores them.

    The one rule shared by `quantize_weight`, the MSE observer and GPTQ, so that an error computed while
    searching is the error of the stored tensors: the scale is rounded up to `stored_scale_dtype`, then the
    asymmetric zero point is refit to that stored scale.

    Args:
        wmin, wmax: clip range, any (matching) shape, e.g. `[..., N]` or `[..., K/g, N]`.
        scheme, act_dtype: decide bits, symmetry and the stored dtype.

    Returns:
        (scale in `stored_scale_dtype(scheme, act_dtype)`, int32 zero point or None if symmetric), wmin's shape.
    """
    scale, zero_point = choose_qparams(wmin, wmax, scheme.weight_bits, scheme.symmetric)
    stored = stored_scale(scale, scheme, act_dtype)
    if zero_point is not None:  # refit the zero point to the scale actually stored
        zero_point = zero_point_for(wmin, stored, scheme.weight_bits)
    return stored, zero_point


@dataclass
class QuantizedWeight:
    """One projection of one experts module, in the tensors its grouped_matmul call takes.

    Attributes:
        qweight: `[E, K, N]` int8, or `[E, K, N/8]` int32 (packed int4).
        scale: weight-only: `antiquant_scale` `[E, N]` / `[E, K/g, N]` in the activation dtype;
            W8A8: the full-quant `scale` `[E, N]` (bf16 for bf16 models, float32 for fp16);
            W4A8: float32 `[E, N]` / `[E, K/g, N]` (per group: float16 values), encoded for the kernel by
            `gmm_kwargs`.
        offset: `antiquant_offset` (= -zero_point), scale's shape and dtype; None if symmetric.
        scheme: how it was made.
    """

    qweight: Tensor
    scale: Tensor
    offset: Optional[Tensor]
    scheme: QuantScheme

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The `[E, K, N]` weight the kernel effectively multiplies by."""
        return antiquant_dequantize(self.qweight, self.scale, self.offset, dtype=dtype)

    def gmm_kwargs(self) -> dict[str, list[Tensor]]:
        """The weight-side keyword arguments of grouped_matmul for this projection."""
        if self.scheme.weight_only:
            kwargs = {"antiquant_scale": [self.scale]}
            if self.offset is not None:
                kwargs["antiquant_offset"] = [self.offset]
            return kwargs
        if self.scheme.a8w4:
            return a8w4_kwargs(self.qweight, self.scale)
        return {"scale": [self.scale]}


def a8w4_kwargs(qweight: Tensor, scale: Tensor) -> dict[str, list[Tensor]]:
    """The A8W4 grouped_matmul's weight-side arguments for int32-packed int4 weights and float32 scales:
    `scale` int64 (`trans_quant_param` of the float32 scale, same shape) and the float32 `bias` the mode needs
    (`a8w4_scale_bias`, `[E, N]`)."""
    encoded = trans_quant_param(scale.float().reshape(-1)).reshape(scale.shape)  # the op takes [t]: flatten, restore
    return {"scale": [encoded], "bias": [a8w4_scale_bias(qweight, scale.float())]}


def quantize_weight(
    w: Tensor,
    scheme: QuantScheme,
    act_dtype: torch.dtype,
    *,
    clip_min: Optional[Tensor] = None,
    clip_max: Optional[Tensor] = None,
) -> QuantizedWeight:
    """Round-to-nearest quantization of a stacked expert weight into GMM tensors.

    Args:
        w: `[E, K, N]` float (the canonical layout: y = x @ w[e]).
        scheme: the scheme; it is checked against K and N first.
        act_dtype: the model's activation dtype (bfloat16 / float16): dtype of antiquant parameters.
        clip_min, clip_max: optional clip range per channel `[E, N]` / per group `[E, K/g, N]` (e.g. from
            an MSE search); default: the weight's min / max.

    Returns:
        QuantizedWeight with every element within half a quantization step of `clamp(w, clip)`.
    """
    if w.dim() != 3:
        raise ValueError(f"quantize_weight expects a stacked [E, K, N] weight, got shape {list(w.shape)}")
    if act_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"act_dtype must be bfloat16 or float16 (the kernel's activation dtypes), got {act_dtype}")
    e, k, n = w.shape
    scheme.check_shape(k, n)
    bad = int((~torch.isfinite(w)).sum()) if w.is_floating_point() else 0
    if bad:  # NaN would silently become an arbitrary code (and scale 1): the source weights are broken
        raise ValueError(f"the weight holds {bad} NaN or inf value(s); refusing to quantize it")
    wmin, wmax = minmax(w, scheme.group_size)
    if clip_min is not None:
        wmin = clip_min.float()
    if clip_max is not None:
        wmax = clip_max.float()
    scale, zero_point = stored_qparams(wmin, wmax, scheme, act_dtype)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"the weight's range (max |w| = {float(w.abs().max()):.3g}) overflows {act_dtype} scales; "
                         "use bfloat16 activations")
    q = quantize(w, scale.float(), zero_point, scheme.weight_bits, scheme.group_size)
    qweight = pack_int4(q) if scheme.weight_bits == 4 else q
    offset = None if zero_point is None else antiquant_offset(zero_point, scale.dtype)
    return QuantizedWeight(qweight=qweight, scale=scale, offset=offset, scheme=scheme)


def error_bound(qw: QuantizedWeight) -> Tensor:
    """Per-element bound on |w - dequantize(q)| for weights inside the clip range: half a step.

    Shape `[E, K, N]` (float32), to compare against the dequantization error elementwise.
    """
    e, k = qw.qweight.shape[0], qw.qweight.shape[1]
    half = qw.scale.float() / 2
    if half.dim() == 3:
        return half.repeat_interleave(k // half.shape[1], dim=1)
    return half.unsqueeze(1).expand(e, k, -1)
