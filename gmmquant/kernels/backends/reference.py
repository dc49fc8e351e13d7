"""The reference backend: the GMM formulas of DESIGN.md section 3 in the NPU's order of operations.

Each scenario follows docs/KERNELS.md "Numerics" (and the upstream golden cited there): integer products
are exact (float64 accumulator), epilogues run in float32, the weight-only weight is dequantized in the
activation dtype, A8W4 accumulates its quant groups in float16, and every output is rounded once. It is
slow and simple on purpose: it is what the fast backends are tested against.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..activations import apply_activation
from ..antiquant import npu_antiquant_weight
from ..int4 import unpack_int4
from ..plan import GMMPlan, Mode, Operands
from ..quant_ops import decode_quant_param


def int8_accumulate(x: Tensor, w: Tensor) -> Tensor:
    """Exact int8 x int8 -> int32 product `[m, k] @ [k, n]`; float64 holds every partial sum exactly."""
    return (x.to(torch.float64) @ w.to(torch.float64)).to(torch.int32)


def finish_int8_output(y: Tensor) -> Tensor:
    """float -> int8 saturating, round half to even."""
    return torch.round(y).clamp_(-128, 127).to(torch.int8)


def _float_bias(bias: Optional[Tensor]) -> Optional[Tensor]:
    return None if bias is None or bias.dtype == torch.int32 else bias.float()


def quant_epilogue(acc: Tensor, op: Operands, mode: Mode, act_type: int, out_dtype: torch.dtype,
                   out: Optional[Tensor] = None) -> Tensor:
    """Turn the int32 accumulator of a full-quant group into its output (formulas 2-1/2-2/3-1/3-2).

    `out`: optional `[m, N]` tensor of out_dtype (a float dtype) to write the result into.
    """
    if mode is Mode.QUANT_INT32:
        return acc if op.bias is None else acc + op.bias
    if op.bias is not None and op.bias.dtype == torch.int32:
        acc = acc + op.bias
    if op.scale.dtype == torch.int64:
        scale, offset = decode_quant_param(op.scale)
    else:
        scale, offset = op.scale.float(), None
    # int32 * float32 promotes to float32: the accumulator is converted exactly as .float() converts it,
    # then scaled, in one pass; the result is a fresh tensor, so the per-token scale is applied in place.
    y = acc * scale
    if op.per_token_scale is not None:
        y = y.mul_(op.per_token_scale.float().unsqueeze(-1))
    return finish_quant(y, offset, op, act_type, out_dtype, out)


def finish_quant(y: Tensor, offset: Optional[Tensor], op: Operands, act_type: int, out_dtype: torch.dtype,
                 out: Optional[Tensor] = None) -> Tensor:
    """The end of every full-quant formula, after scaling: + offset, + float bias, activation, cast."""
    if offset is not None:
        y = y + offset
    fb = _float_bias(op.bias)
    if fb is not None:
        y = y + fb
    y = apply_activation(y, act_type)
    if out_dtype == torch.int8:
        return finish_int8_output(y)
    if out is None:
        return y.to(out_dtype)
    return out.copy_(y)  # the same round-to-nearest-even cast as .to(out_dtype)


def split_int8_for_int4(x: Tensor) -> Tensor:
    """`[m, k]` int8 -> `[2m, k]` int8: rows `x >> 4` then rows `(x & 15) - 8`, both in [-8, 7].

    `16 * hi + lo == x - 8`: how the NPU feeds int8 activations to its int4 x int4 cube unit in A8W4 mode.
    """
    return torch.cat([x >> 4, (x & 15) - 8])


def a8w4_group(
    x: Tensor,
    q: Tensor,
    scale: Tensor,
    bias: Optional[Tensor],
    per_token_scale: Optional[Tensor],
    out_dtype: torch.dtype,
    int_matmul=int8_accumulate,
) -> Tensor:
    """One A8W4 group in upstream's golden order (op-plugin test_npu_grouped_matmul, A8W4 golden).

    Per quant group j: `p = int_matmul(x2[:, j], q[j])` (exact int32), `acc16 = fp16(acc16 + fp16(p * s_j))`,
    separately for the high and low halves of x (`split_int8_for_int4`); then in float32
    `y = (16 * acc_hi + acc_lo + bias) * per_token_scale`, rounded once to out_dtype.

    Args:
        x: `[m, K]` int8. q: `[K, N]` int8 values in [-8, 7] (unpacked weight).
        scale: `[N]` or `[G, N]` int64 (float32 bits in the low 32 bits).
        bias: `[N]` float32 or None. per_token_scale: `[m]` float32 or None.
        int_matmul: exact int8 x int8 -> int32 `[a, k] @ [k, n]` (the cpu backend passes torch._int_mm).
    """
    s = decode_quant_param(scale)[0]
    s = s.unsqueeze(0) if s.dim() == 1 else s
    m, k = x.shape
    span = k // s.shape[0]
    x2 = split_int8_for_int4(x)
    acc = torch.zeros(2 * m, q.shape[1], dtype=torch.float16, device=x.device)
    for j in range(s.shape[0]):
        cols = slice(j * span, (j + 1) * span)
        p = int_matmul(x2[:, cols], q[cols])
        acc = acc + (p.to(torch.float32) * s[j]).to(torch.float16)
    y = acc[:m].to(torch.float32) * 16 + acc[m:].to(torch.float32)
    if bias is not None:
        y = y + bias.float()
    if per_token_scale is not None:
        y = y * per_token_scale.float().unsqueeze(-1)
    return y.to(out_dtype)


def compute_group(plan: GMMPlan, op: Operands) -> Tensor:
    """One group's `[m, n]` output."""
    if plan.mode is Mode.FLOAT:
        y = op.x.float() @ op.weight.float()
        if op.bias is not None:
            y = y + op.bias.float()
        return y.to(plan.out_dtype)
    if plan.mode is Mode.ANTIQUANT:
        w = npu_antiquant_weight(op.weight, op.antiquant_scale, op.antiquant_offset, op.x.dtype)
        y = op.x.float() @ w.float()
        if op.bias is not None:
            y = y + op.bias.float()
        return y.to(plan.out_dtype)
    if plan.mode is Mode.QUANT_A8W4:
        return a8w4_group(op.x, unpack_int4(op.weight), op.scale, op.bias, op.per_token_scale, plan.out_dtype)
    acc = int8_accumulate(op.x, op.weight)
    return quant_epilogue(acc, op, plan.mode, plan.act_type, plan.out_dtype)


def run(plan: GMMPlan) -> list[Tensor]:
    """Execute a validated plan group by group."""
    return plan.assemble([compute_group(plan, plan.operands(g)) if g.size else None for g in plan.groups])
