"""A float64 oracle for npu_grouped_matmul, written from the spec independently of gmmquant's backends.

It parses group_list, unpacks int4 and decodes int64 scales with its own (deliberately different) code:
arithmetic instead of bit shifts, `struct` instead of tensor views. It returns float64 results before the
final cast, so tests can bound each backend's error explicitly.
"""

from __future__ import annotations

import math
import struct

import torch

# Output-dtype tolerances for comparing a backend against the float64 oracle. A result must satisfy
# |y - ref| <= RTOL * |ref| + ATOL * max|ref|: RTOL covers the final rounding to the output dtype, ATOL the
# float32 / reduced-precision accumulation across K (a few output ulps at the tensor's scale).
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 8e-3),
}


def unpack_int4_oracle(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., n/8] -> int64 [..., n]; nibble j of a word is value j (low nibble first)."""
    unsigned = packed.to(torch.int64) % (2**32)
    values = []
    for j in range(8):
        nibble = torch.div(unsigned, 16**j, rounding_mode="floor") % 16
        values.append(torch.where(nibble >= 8, nibble - 16, nibble))
    return torch.stack(values, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def decode_scale_oracle(encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 npu_trans_quant_param values -> (float64 scale, float64 offset)."""
    scales, offsets = [], []
    for v in encoded.flatten().tolist():
        low = v % (2**32)
        scales.append(struct.unpack("<f", low.to_bytes(4, "little"))[0])
        raw = (v // 2**37) % 512
        offsets.append(raw - 512 if raw >= 256 else raw)
    shape = encoded.shape
    return torch.tensor(scales, dtype=torch.float64).reshape(shape), torch.tensor(offsets, dtype=torch.float64).reshape(shape)


def activation_oracle(y: torch.Tensor, act_type: int) -> torch.Tensor:
    if act_type == 0:
        return y
    if act_type == 1:
        return y.clamp(min=0)
    if act_type == 2:
        return 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))
    if act_type == 4:
        return y / (1 + torch.exp(-1.702 * y.abs())) * torch.exp(0.851 * (y - y.abs()))
    if act_type == 5:
        return y * torch.sigmoid(y)
    raise ValueError(act_type)


def group_spans(group_list, group_list_type, api):
    """[(expert, start, stop)] from a group_list, per the spec."""
    if isinstance(group_list, torch.Tensor):
        values = group_list.tolist()
    else:
        values = list(group_list)
    if api == "tensor" and group_list_type == 2:
        spans, start = [], 0
        for e, size in values:
            if size <= 0:
                break
            spans.append((e, start, start + size))
            start += size
        return spans
    if api == "tensor" and group_list_type == 1:
        ends = list(_running_sum(values))
    else:
        ends = values
    starts = [0] + ends[:-1]
    return [(e, s, t) for e, (s, t) in enumerate(zip(starts, ends))]


def _running_sum(values):
    total = 0
    for v in values:
        total += v
        yield total


def dequant_weight(w, aq_scale, aq_offset):
    """Weight-only dequantization in float64: (q + offset) * scale, per-channel or per-group."""
    q = unpack_int4_oracle(w) if w.dtype == torch.int32 else w.to(torch.int64)
    q = q.to(torch.float64)
    k = q.shape[0]
    if aq_scale.dim() == 1:
        s = aq_scale.to(torch.float64).expand(k, -1)
        o = None if aq_offset is None else aq_offset.to(torch.float64).expand(k, -1)
    else:
        rows = k // aq_scale.shape[0]
        s = torch.cat([aq_scale[i : i + 1].to(torch.float64).expand(rows, -1) for i in range(aq_scale.shape[0])])
        o = None if aq_offset is None else torch.cat([aq_offset[i : i + 1].to(torch.float64).expand(rows, -1) for i in range(aq_offset.shape[0])])
    return ((q + o) if o is not None else q) * s


def dequant_stacked(qw):
    """float64 `[E, K, N]` (q + offset) * scale of a stacked QuantizedWeight, expert by expert."""
    offset = qw.offset if qw.offset is not None else [None] * qw.qweight.shape[0]
    return torch.stack([dequant_weight(q, s, o) for q, s, o in zip(qw.qweight, qw.scale, offset)])


def matmul_oracle(x, w, *, bias=None, scale=None, aq_scale=None, aq_offset=None, pts=None, act_type=0):
    """One group in float64, per DESIGN.md section 3."""
    xf = x.to(torch.float64)
    if aq_scale is not None:
        y = xf @ dequant_weight(w, aq_scale, aq_offset)
        return y if bias is None else y + bias.to(torch.float64)
    y = xf @ w.to(torch.float64)
    if scale is None:
        return y if bias is None else y + bias.to(torch.float64)
    int_bias = bias is not None and bias.dtype == torch.int32
    if int_bias:
        y = y + bias.to(torch.float64)
    if scale.dtype == torch.int64:
        s, off = decode_scale_oracle(scale)
    else:
        s, off = scale.to(torch.float64), torch.zeros(scale.shape, dtype=torch.float64)
    y = y * s
    if pts is not None:
        y = y * pts.to(torch.float64).unsqueeze(-1)
    y = y + off
    if bias is not None and not int_bias:
        y = y + bias.to(torch.float64)
    return activation_oracle(y, act_type)


def oracle_gmm(x, weight, *, bias=None, scale=None, antiquant_scale=None, antiquant_offset=None,
               per_token_scale=None, group_list=None, split_item=0, group_type=None, group_list_type=0, act_type=0):
    """The whole call in float64: a list of float64 outputs shaped as the spec says."""
    api = "tensor" if isinstance(group_list, torch.Tensor) or group_type is not None else "list"

    def param(values, wi, e):
        if values is None:
            return None
        t = values[wi]
        return t[e] if e is not None else t

    def group(xi, wi, e, pts):
        w = weight[wi] if e is None else weight[wi][e]
        return matmul_oracle(xi, w, bias=param(bias, wi, e), scale=param(scale, wi, e),
                             aq_scale=param(antiquant_scale, wi, e), aq_offset=param(antiquant_offset, wi, e),
                             pts=pts, act_type=act_type)

    single_out = split_item in (2, 3)
    if group_type == 2:
        xx, w = x[0], weight[0]
        spans = group_spans(group_list, group_list_type, api)
        return [torch.stack([xx[:, s:t].to(torch.float64) @ w[s:t].to(torch.float64) for _, s, t in spans])]
    if len(x) == 1 and (len(weight) > 1 or weight[0].dim() == 3):
        single_w = weight[0].dim() == 3
        blocks = []
        for e, s, t in group_spans(group_list, group_list_type, api):
            pts = None if per_token_scale is None else per_token_scale[0][s:t]
            blocks.append(group(x[0][s:t], 0 if single_w else e, e if single_w else None, pts))
        return [torch.cat(blocks)] if single_out else blocks
    blocks = []
    for i, xi in enumerate(x):
        pts = None if per_token_scale is None else per_token_scale[i]
        y = group(xi.reshape(-1, xi.shape[-1]), i, None, pts)
        blocks.append(y.reshape(*xi.shape[:-1], y.shape[-1]))
    return [torch.cat(blocks)] if single_out else blocks


def to_output(y64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The exact final cast the spec implies: int8 saturates after rounding half to even."""
    if dtype == torch.int8:
        return torch.round(y64).clamp(-128, 127).to(torch.int8)
    if dtype == torch.int32:
        return y64.round().to(torch.int32)
    return y64


def assert_matches(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Check a backend output against the float64 oracle with the explicit tolerance of its dtype."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    assert tuple(out.shape) == tuple(ref64.shape), f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    if dtype == torch.int32:
        assert torch.equal(out, to_output(ref64, dtype)), f"{what}: int32 results differ"
        return
    if dtype == torch.int8:
        # Rounding an exact value differs by at most one step between float32 and float64 epilogues.
        diff = (out.to(torch.int64) - to_output(ref64, dtype).to(torch.int64)).abs()
        assert int(diff.max()) <= 1 if diff.numel() else True, f"{what}: int8 results differ by {int(diff.max())}"
        return
    rtol, atol = TOLERANCES[dtype]
    if out.numel() == 0:
        return
    scale = float(ref64.abs().max()) or 1.0
    err = (out.to(torch.float64) - ref64).abs()
    bound = rtol * ref64.abs() + atol * scale
    worst = float((err - bound).max())
    assert worst <= 0, f"{what}: max error {float(err.max()):.3e} exceeds bound (rtol {rtol}, atol {atol} x {scale:.3e})"


__all__ = [
    "TOLERANCES",
    "activation_oracle",
    "assert_matches",
    "decode_scale_oracle",
    "dequant_weight",
    "group_spans",
    "matmul_oracle",
    "to_output",
    "unpack_int4_oracle",
    "oracle_gmm",
]
