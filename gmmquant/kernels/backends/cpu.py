"""The cpu backend: PyTorch's fastest CPU kernels for each mode, the reference formulas elsewhere.

- float, single x and 3-D weight in expert order: `F.grouped_mm` (one call for all experts);
  other float calls: one `torch.mm` per non-empty group.
- weight-only int8, per-channel: `aten._weight_int8pack_mm` on each expert's `[N, K]` matrix (free when the
  weight is the transposed view of `[E, N, K]` storage, else a cached copy), plus a rank-1 correction
  `rowsum(x) * (offset * scale)` for an asymmetric offset.
- weight-only int4: `aten._weight_int4pack_mm_for_cpu` on the CPU's int4 layout; per-channel scales are
  expanded to the largest supported group size (32-256) that divides K.
- int8 x int8 with a scale: `aten._weight_int8pack_mm` on `x_q * per_token_scale` (float32), which equals
  `(x_q @ w) * scale * per_token_scale` and is far faster than `torch._int_mm` here; the raw int32 output
  mode (`output_dtype=torch.int32`) uses `torch._int_mm`, which is exact.
Repacked weights are cached per (weight tensor, expert) and rebuilt if the tensor changes in place; they
are never written to disk. Empty groups cost nothing.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
from torch import Tensor

from ..int4 import INT4_SHIFTS
from ..plan import GMMPlan, Group, Mode, Operands
from ..quant_ops import decode_quant_param
from . import reference
from .float_grouped import float_grouped_mm

INT4_CPU_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts

_cache: dict[tuple, tuple[tuple, Tensor]] = {}


def _stamp(t: Optional[Tensor]) -> tuple:
    return (None,) if t is None else (t.data_ptr(), t._version, tuple(t.shape))


def cached_repack(owner: Tensor, expert: Optional[int], kind: str, sources: tuple[Optional[Tensor], ...], build: Callable[[], Tensor]) -> Tensor:
    """Return `build()`, memoised on (owner tensor, expert, kind) while `sources` are unchanged.

    Entries die with the owner tensor (weakref finalizer), so a freed weight frees its repacked copies.
    """
    key = (id(owner), expert, kind)
    stamp = tuple(s for t in sources for s in _stamp(t))
    hit = _cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = build()
    if hit is None:
        weakref.finalize(owner, _cache.pop, key, None)
    _cache[key] = (stamp, value)
    return value


def clear_cache() -> None:
    """Drop every repacked weight (e.g. before measuring memory)."""
    _cache.clear()


def _float_group(op: Operands, out_dtype: torch.dtype) -> Tensor:
    y = op.x @ op.weight
    if op.bias is not None:
        y = (y.float() + op.bias.float()).to(out_dtype)
    return y


def _int8_nk(plan: GMMPlan, g: Group, op: Operands) -> Tensor:
    """Expert g's int8 weight as the `[N, K]` contiguous matrix the int8pack kernel takes.

    A weight passed as the transposed view of `[E, N, K]` storage (legal for the kernel, and what
    GMMProjection.prepare() makes of int8 weights) already is one: no copy. Otherwise a cached copy.
    """
    w_nk = op.weight.t()
    if w_nk.is_contiguous():
        return w_nk
    owner = plan.weights[g.w_index]
    return cached_repack(owner, g.expert, "int8_nk", (owner,), lambda: w_nk.contiguous())


def _int8_weight_only(plan: GMMPlan, g: Group, op: Operands) -> Tensor:
    k = op.weight.shape[0]
    if k % 8:  # the int8pack kernel needs K to be a multiple of 8
        return reference.compute_group(plan, op)
    w_nk = _int8_nk(plan, g, op)
    scale = op.antiquant_scale
    y = torch.ops.aten._weight_int8pack_mm(op.x, w_nk, scale)
    if op.antiquant_offset is None and op.bias is None:
        return y
    y = y.float()
    if op.antiquant_offset is not None:
        # x @ ((q + o) * s) = x @ (q * s) + rowsum(x) * (o * s)
        y = y + op.x.float().sum(dim=-1, keepdim=True) * (op.antiquant_offset.float() * scale.float())
    if op.bias is not None:
        y = y + op.bias.float()
    return y.to(plan.out_dtype)


def _int4_cpu_group_size(k: int, quant_groups: int) -> Optional[int]:
    """The CPU kernel's group size for a weight with `quant_groups` scale rows (1 = per-channel)."""
    span = k // quant_groups
    for size in INT4_CPU_GROUP_SIZES:
        if span % size == 0:
            return size
    return None


def _int4_weight_only(plan: GMMPlan, g: Group, op: Operands) -> Tensor:
    k, n = op.weight.shape[0], op.weight.shape[1] * 8
    scale = op.antiquant_scale
    per_group = scale.dim() == 2
    groups = scale.shape[0] if per_group else 1
    size = _int4_cpu_group_size(k, groups)
    if size is None or n % 16:
        return reference.compute_group(plan, op)
    owner = plan.weights[g.w_index]
    x_dtype = op.x.dtype

    def pack() -> Tensor:
        # The CPU kernel takes unsigned nibbles u = q + 8 as int32 [N, K]; for a two's-complement nibble that
        # is nibble ^ 8. Done in place to keep the per-expert temporaries to two (a model repacks thousands).
        u = op.weight.unsqueeze(-1) >> INT4_SHIFTS
        u.bitwise_and_(0xF).bitwise_xor_(8)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.reshape(k, n).t().contiguous(), 1)

    def scale_and_zeros() -> Tensor:
        s = scale.float() if per_group else scale.float().unsqueeze(0)
        o = None if op.antiquant_offset is None else (op.antiquant_offset.float() if per_group else op.antiquant_offset.float().unsqueeze(0))
        # (q + o) * s == (u - 8) * s + o * s with u = q + 8: the kernel's scale is s and its zero o * s.
        zeros = torch.zeros_like(s) if o is None else o * s
        repeat = k // groups // size
        table = torch.stack([s, zeros], dim=-1).repeat_interleave(repeat, dim=0)
        return table.to(x_dtype).contiguous()

    packed = cached_repack(owner, g.expert, "int4_cpu", (owner,), pack)
    sources = (op.antiquant_scale, op.antiquant_offset)
    table = cached_repack(plan.antiquant_scale[g.w_index], g.expert, f"int4_sz_{x_dtype}", sources, scale_and_zeros)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(op.x, packed, size, table)
    if op.bias is not None:
        y = (y.float() + op.bias.float()).to(plan.out_dtype)
    return y


def _int8_full_quant(plan: GMMPlan, g: Group, op: Operands) -> Tensor:
    if plan.mode is Mode.QUANT_INT32:  # the raw accumulator must be exact: integer matmul
        acc = torch._int_mm(op.x, op.weight if op.weight.stride(-1) == 1 else op.weight.contiguous())
        return reference.quant_epilogue(acc, op, plan.mode, plan.act_type, plan.out_dtype)
    # (x_q @ w) * scale * per_token_scale == (x_q * per_token_scale) @ (w * scale): the int8 weight-only
    # kernel computes the right-hand side in float32 and is ~15x faster than torch._int_mm on CPU.
    w_nk = _int8_nk(plan, g, op)
    if op.scale.dtype == torch.int64:
        scale, offset = decode_quant_param(op.scale)
    else:
        scale, offset = op.scale.float(), None
    row_scale = None if op.per_token_scale is None else op.per_token_scale.float().unsqueeze(-1)
    k = op.x.shape[1]
    if plan.out_dtype in (torch.bfloat16, torch.float16) and k % 8 == 0:
        # int8 values are exact in bf16/fp16 and the kernel accumulates in float32; its half-precision
        # kernels are ~10x faster than the float32 one here. The per-token scale is applied afterwards.
        y = torch.ops.aten._weight_int8pack_mm(op.x.to(plan.out_dtype), w_nk, scale.to(plan.out_dtype)).float()
        if row_scale is not None:
            y = y * row_scale
    else:  # int8 output: keep the accumulator in float32 so rounding to int8 matches the exact formula
        x = op.x.float() if row_scale is None else op.x.float() * row_scale
        y = torch.ops.aten._weight_int8pack_mm(x, w_nk, scale.contiguous())
    if op.bias is not None and op.bias.dtype == torch.int32:  # (acc + b) * s * pts
        y = y + op.bias.float() * scale * (1.0 if row_scale is None else row_scale)
    return reference.finish_quant(y, offset, op, plan.act_type, plan.out_dtype)


def compute_group(plan: GMMPlan, g: Group) -> Tensor:
    op = plan.operands(g)
    if plan.mode is Mode.FLOAT:
        return _float_group(op, plan.out_dtype)
    if plan.mode is Mode.ANTIQUANT:
        if plan.weight_bits == 8:
            return _int8_weight_only(plan, g, op)
        return _int4_weight_only(plan, g, op)
    return _int8_full_quant(plan, g, op)


def run(plan: GMMPlan) -> list[Tensor]:
    """Execute a validated plan with the CPU fast paths."""
    if plan.mode is Mode.FLOAT and plan.output == "single":
        y = float_grouped_mm(plan)
        if y is not None:
            return [y]
    return plan.assemble([compute_group(plan, g) if g.size else None for g in plan.groups])
