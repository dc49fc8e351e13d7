"""The cpu backend: PyTorch's fastest CPU kernels for each mode, in the NPU's order of operations.

Every path gives what `reference` gives (docs/KERNELS.md "Numerics") to within one ulp of the output
dtype, with one documented exception (small-M weight-only, below):
- float, single x and 3-D weight in expert order, no bias: `F.grouped_mm` (one call for all experts);
  other float calls: one `torch.mm` per non-empty group; a bias is added in float32 before the one rounding.
- int8 x int8 (per-channel, per-token, int32 output): `torch._int_mm` gives the exact int32 accumulator,
  then the reference's float32 epilogue (oneDNN's VNNI/AMX int8 GEMM: faster than the int8 weight-only
  kernels at every M measured, and free of their half-precision intermediate).
- A8W4: the reference's split-and-accumulate order with `torch._int_mm` for the integer products, on a
  cached unpacked int8 copy of each expert's weight.
- weight-only: per shape, the faster of two kernels (`cpu_autotune`: measured per machine and cached, or
  the built-in rule): "dequant_gemm", the weight dequantized in the activation dtype as the NPU does
  (`npu_antiquant_weight`) then one half-precision GEMM (float32 accumulation), exact; or "fused", the
  `aten._weight_int8pack_mm` / `aten._weight_int4pack_mm_for_cpu` kernels, which read the packed weight
  once (decode) but keep the dequantized weight in float32 instead of rounding it to the activation dtype;
  the deviation is bounded by that rounding (docs/KERNELS.md). `GMMQUANT_CPU_NUMERICS=npu` allows only
  the exact kernel.
Repacked weights are cached per (weight tensor, expert) and rebuilt if the tensor changes in place; they
are never written to disk. Empty groups cost nothing.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Callable, Optional

import torch
from torch import Tensor

from ..antiquant import npu_antiquant_weight
from ..int4 import INT4_SHIFTS, unpack_int4
from ..plan import GMMPlan, Group, Mode, Operands
from . import cpu_autotune, reference
from .cpu_autotune import DEQUANT, FUSED, KernelKey, rows_bucket
from .float_grouped import float_grouped_mm

INT4_CPU_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts
NUMERICS_ENV = "GMMQUANT_CPU_NUMERICS"  # "npu": exact weight-only rounding at every M; "auto" (default)

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
    if op.bias is None:
        return op.x @ op.weight  # float32 accumulation, one rounding
    # The bias joins the float32 accumulator before the one rounding (a half-precision mm would round first).
    return (op.x.float() @ op.weight.float() + op.bias.float()).to(out_dtype)


def exact_weight_only() -> bool:
    """True when weight-only calls must round the weight as the NPU does at every M ($GMMQUANT_CPU_NUMERICS=npu)."""
    value = os.environ.get(NUMERICS_ENV, "auto")
    if value not in ("auto", "npu"):
        raise ValueError(f"${NUMERICS_ENV} must be 'auto' or 'npu', got {value!r}")
    return value == "npu"


def _weight_only_exact(plan: GMMPlan, op: Operands) -> Tensor:
    """`x @ w16` with `w16` dequantized in x's dtype as the NPU does; float32 accumulation, one rounding."""
    w = npu_antiquant_weight(op.weight, op.antiquant_scale, op.antiquant_offset, op.x.dtype)
    if op.bias is None:
        return op.x @ w
    return (op.x.float() @ w.float() + op.bias.float()).to(plan.out_dtype)


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


def _int8_full_quant(plan: GMMPlan, g: Group, op: Operands, out: Optional[Tensor] = None) -> Tensor:
    # torch._int_mm is exact; the epilogue is the reference's, so the result is the reference's bit for bit.
    acc = torch._int_mm(op.x, op.weight if op.weight.stride(-1) == 1 or op.weight.stride(-2) == 1 else op.weight.contiguous())
    return reference.quant_epilogue(acc, op, plan.mode, plan.act_type, plan.out_dtype, out)


def _a8w4(plan: GMMPlan, g: Group, op: Operands) -> Tensor:
    owner = plan.weights[g.w_index]
    q = cached_repack(owner, g.expert, "int8_values", (owner,), lambda: unpack_int4(op.weight).contiguous())
    return reference.a8w4_group(op.x, q, op.scale, op.bias, op.per_token_scale, plan.out_dtype, int_matmul=torch._int_mm)


def _fused_supported(plan: GMMPlan, op: Operands) -> bool:
    if plan.weight_bits == 8:
        return op.weight.shape[0] % 8 == 0
    k, n = op.weight.shape[0], op.weight.shape[1] * 8
    groups = op.antiquant_scale.shape[0] if op.antiquant_scale.dim() == 2 else 1
    return n % 16 == 0 and _int4_cpu_group_size(k, groups) is not None


_forced = threading.local()


def weight_only_kernel(plan: GMMPlan, g: Group, op: Operands, memo: Optional[dict] = None) -> str:
    """"fused" or "dequant_gemm" for this group (see cpu_autotune).

    `memo` holds one call's choices per (weight, rows bucket): a decode call asks for the same choice once
    per routed expert, and looking it up costs more than some of the kernels it picks.
    """
    memo_key = (g.w_index, rows_bucket(g.size))
    if memo is not None and memo_key in memo:
        return memo[memo_key]
    choice = _weight_only_choice(plan, g, op)
    if memo is not None:
        memo[memo_key] = choice
    return choice


def _weight_only_choice(plan: GMMPlan, g: Group, op: Operands) -> str:
    if not _fused_supported(plan, op):
        return DEQUANT
    forced = getattr(_forced, "choice", None)
    if forced is not None:
        return forced
    if exact_weight_only():
        return DEQUANT
    scale = op.antiquant_scale
    key = KernelKey(f"w{plan.weight_bits}a16", str(op.x.dtype).replace("torch.", ""), rows_bucket(g.size),
                    op.weight.shape[0], plan.n[g.w_index], scale.shape[0] if scale.dim() == 2 else 1)
    return cpu_autotune.choose(key)


def compute_group(plan: GMMPlan, g: Group, memo: Optional[dict] = None) -> Tensor:
    """Group g's output; `memo` (one dict per call) caches per-shape kernel choices across its groups."""
    op = plan.operands(g)
    if plan.mode is Mode.FLOAT:
        return _float_group(op, plan.out_dtype)
    if plan.mode is Mode.ANTIQUANT:
        if weight_only_kernel(plan, g, op, memo) == DEQUANT:
            return _weight_only_exact(plan, op)
        if plan.weight_bits == 8:
            return _int8_weight_only(plan, g, op)
        return _int4_weight_only(plan, g, op)
    if plan.mode is Mode.QUANT_A8W4:
        return _a8w4(plan, g, op)
    return _int8_full_quant(plan, g, op)


def _measure(key: KernelKey, choice: str, reps: int) -> float:
    """Median ms of one candidate on synthetic data of `key`'s shape (one expert, its weight repacked once)."""
    from ..grouped_matmul import grouped_matmul  # noqa: PLC0415 - grouped_matmul imports this backend
    from ..int4 import pack_int4

    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, key.x_dtype)
    lo, hi = (-8, 8) if key.kind == "w4a16" else (-128, 128)
    q = torch.randint(lo, hi, (1, key.k, key.n), generator=gen, dtype=torch.int8)
    w = pack_int4(q) if key.kind == "w4a16" else q.transpose(1, 2).contiguous().transpose(1, 2)
    shape = (1, key.n) if key.groups == 1 else (1, key.groups, key.n)
    scale = (torch.rand(shape, generator=gen) * 0.01).to(dtype)
    x = torch.randn(key.rows, key.k, generator=gen).to(dtype)
    counts = torch.tensor([key.rows])

    def call():
        return grouped_matmul([x], [w], antiquant_scale=[scale], group_list=counts, group_list_type=0,
                              group_type=0, split_item=2, backend="cpu")

    _forced.choice = choice
    try:
        return cpu_autotune.median_ms(call, reps)
    finally:
        _forced.choice = None


cpu_autotune.register_measure(_measure)


def prepack(weight: Tensor, antiquant_scale: Tensor, antiquant_offset: Optional[Tensor] = None) -> None:
    """Build the fused kernels' per-expert layouts of a weight-only weight now, not on its first routed tokens.

    Repacking an int4 expert for `_weight_int4pack_mm_for_cpu` costs tens of ms (a 32 x 2048 x 1536 weight:
    about a second); after this call every expert's packed weight and scale table is cached (see
    `cached_repack`), for as long as `weight` lives and is not modified in place.

    Args:
        weight: `[E, K, N/8]` int32 (int4) or `[E, K, N]` int8, as passed to grouped_matmul.
        antiquant_scale / antiquant_offset: `[E, N]` or `[E, G, N]` in the activation dtype.
    """
    from ..grouped_matmul import grouped_matmul  # noqa: PLC0415 - grouped_matmul imports this backend

    e, k = weight.shape[0], weight.shape[1]
    x = torch.zeros(e, k, dtype=antiquant_scale.dtype, device=weight.device)
    _forced.choice = FUSED
    try:
        grouped_matmul([x], [weight], antiquant_scale=[antiquant_scale],
                       antiquant_offset=None if antiquant_offset is None else [antiquant_offset],
                       group_list=torch.ones(e, dtype=torch.int64), group_list_type=1, group_type=0, split_item=2, backend="cpu")
    finally:
        _forced.choice = None


def run(plan: GMMPlan) -> list[Tensor]:
    """Execute a validated plan with the CPU fast paths."""
    if plan.mode is Mode.FLOAT and plan.output == "single":
        y = float_grouped_mm(plan)
        if y is not None:
            return [y]
    if _writes_in_place(plan):
        return [_full_quant_single(plan)]
    memo: dict = {}
    return plan.assemble([compute_group(plan, g, memo) if g.size else None for g in plan.groups])


def _writes_in_place(plan: GMMPlan) -> bool:
    """Int8 x int8 calls with one float output: each group's epilogue writes its rows of the output
    directly (no per-group result tensors, no final concatenation)."""
    return (plan.output == "single" and not plan.k_split and plan.out_dtype in (torch.float16, torch.bfloat16, torch.float32)
            and plan.mode not in (Mode.FLOAT, Mode.ANTIQUANT, Mode.QUANT_A8W4, Mode.QUANT_INT32) and len(plan.groups) > 1)


def _full_quant_single(plan: GMMPlan) -> Tensor:
    x = plan.xs[0]
    rows = sum(g.size for g in plan.groups)
    out = torch.empty(rows, plan.n[0], dtype=plan.out_dtype, device=x.device)
    start = 0
    for g in plan.groups:
        if g.size:
            _int8_full_quant(plan, g, plan.operands(g), out[start : start + g.size])
            start += g.size
    return out
