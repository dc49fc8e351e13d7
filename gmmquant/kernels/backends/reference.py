"""The reference backend: the GMM formulas of DESIGN.md section 3, written plainly, on any device.

Every group is computed on its own in float32 (float64 for the exact int8 x int8 accumulator), then cast
to the output dtype once, as the NPU does. It is slow and simple on purpose: it is what the fast backends
are tested against.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..activations import apply_activation
from ..antiquant import antiquant_dequantize
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


def quant_epilogue(acc: Tensor, op: Operands, mode: Mode, act_type: int, out_dtype: torch.dtype) -> Tensor:
    """Turn the int32 accumulator of a full-quant group into its output (formulas 2-1/2-2/3-1/3-2)."""
    if mode is Mode.QUANT_INT32:
        return acc if op.bias is None else acc + op.bias
    y = acc.to(torch.float32)
    if op.bias is not None and op.bias.dtype == torch.int32:
        y = (acc + op.bias).to(torch.float32)
    if op.scale.dtype == torch.int64:
        scale, offset = decode_quant_param(op.scale)
    else:
        scale, offset = op.scale.float(), None
    y = y * scale
    if op.per_token_scale is not None:
        y = y * op.per_token_scale.float().unsqueeze(-1)
    return finish_quant(y, offset, op, act_type, out_dtype)


def finish_quant(y: Tensor, offset: Optional[Tensor], op: Operands, act_type: int, out_dtype: torch.dtype) -> Tensor:
    """The end of every full-quant formula, after scaling: + offset, + float bias, activation, cast."""
    if offset is not None:
        y = y + offset
    fb = _float_bias(op.bias)
    if fb is not None:
        y = y + fb
    y = apply_activation(y, act_type)
    return finish_int8_output(y) if out_dtype == torch.int8 else y.to(out_dtype)


def compute_group(plan: GMMPlan, op: Operands) -> Tensor:
    """One group's `[m, n]` output."""
    if plan.mode is Mode.FLOAT:
        y = op.x.float() @ op.weight.float()
        if op.bias is not None:
            y = y + op.bias.float()
        return y.to(plan.out_dtype)
    if plan.mode is Mode.ANTIQUANT:
        w = antiquant_dequantize(op.weight, op.antiquant_scale, op.antiquant_offset)
        y = op.x.float() @ w
        if op.bias is not None:
            y = y + op.bias.float()
        return y.to(plan.out_dtype)
    acc = int8_accumulate(op.x, op.weight)
    return quant_epilogue(acc, op, plan.mode, plan.act_type, plan.out_dtype)


def run(plan: GMMPlan) -> list[Tensor]:
    """Execute a validated plan group by group."""
    return plan.assemble([compute_group(plan, plan.operands(g)) if g.size else None for g in plan.groups])
