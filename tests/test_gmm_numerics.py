"""The order of operations and roundings of every scenario (docs/KERNELS.md "Numerics").

`reference` implements the NPU's order; `cpu` must give the same outputs to within one ulp of the output
dtype on every scenario (with the documented small-M weight-only exception, bounded here). The issue's
reproducers (per-token double rounding, fp16 intermediate overflow, bf16 scale + int32 bias) are pinned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from gmmquant.kernels import a8w4_scale_bias, grouped_matmul, pack_int4, trans_quant_param
from gmmquant.kernels.antiquant import npu_antiquant_weight
from gmmquant.kernels.backends import cpu as cpu_backend
from numerics_util import assert_within_ulps, ulp_distance

E, K, N = 4, 128, 64


def _counts(rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


@dataclass
class Call:
    name: str
    x: torch.Tensor
    w: torch.Tensor
    kwargs: dict

    def run(self, backend: str) -> torch.Tensor:
        return grouped_matmul([self.x], [self.w], backend=backend, split_item=2, group_type=0, **self.kwargs)[0]


def _float_call(dtype: torch.dtype, bias: bool, rows: list[int], gen: torch.Generator) -> Call:
    x = torch.randn(sum(rows), K, generator=gen).to(dtype)
    w = (torch.randn(E, K, N, generator=gen) * 0.1).to(dtype)
    kw = dict(group_list=_counts(rows), group_list_type=1)
    if bias:
        kw["bias"] = [torch.randn(E, N, generator=gen).to(torch.float16 if dtype == torch.float16 else torch.float32)]
    return Call(f"float-{dtype}-bias{bias}", x, w, kw)


def _antiquant_call(dtype: torch.dtype, bits: int, groups: Optional[int], asym: bool, bias: bool, rows: list[int], gen: torch.Generator) -> Call:
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    q = torch.randint(lo, hi, (E, K, N), generator=gen, dtype=torch.int8)
    w = pack_int4(q) if bits == 4 else q
    shape = (E, N) if groups is None else (E, groups, N)
    scale = (torch.rand(shape, generator=gen) * 0.02 + 0.001).to(dtype)
    kw = dict(antiquant_scale=[scale], group_list=_counts(rows), group_list_type=1)
    if asym:
        kw["antiquant_offset"] = [(torch.randn(shape, generator=gen) * 3).to(dtype)]
    if bias:
        kw["bias"] = [torch.randn(E, N, generator=gen).to(torch.float16 if dtype == torch.float16 else torch.float32)]
    x = torch.randn(sum(rows), K, generator=gen).to(dtype)
    return Call(f"w{bits}a16-{dtype}-g{groups}-asym{asym}-bias{bias}", x, w, kw)


def _w8a8_call(scale_dtype: torch.dtype, per_token: bool, bias_dtype: Optional[torch.dtype], rows: list[int], gen: torch.Generator) -> Call:
    x = torch.randint(-128, 128, (sum(rows), K), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (E, K, N), generator=gen, dtype=torch.int8)
    s = torch.rand(E, N, generator=gen) * 1e-3 + 1e-4
    if scale_dtype == torch.int64:
        s = trans_quant_param(s.reshape(-1) * 0.05).reshape(E, N)
    else:
        s = s.to(scale_dtype)
    kw = dict(scale=[s], group_list=_counts(rows), group_list_type=1)
    if scale_dtype != torch.int64:
        kw["output_dtype"] = torch.bfloat16 if scale_dtype == torch.bfloat16 else torch.float16
    if per_token:
        kw["per_token_scale"] = [torch.rand(sum(rows), generator=gen) * 0.05 + 0.01]
    if bias_dtype == torch.int32:
        kw["bias"] = [torch.randint(-5000, 5000, (E, N), generator=gen, dtype=torch.int32)]
    elif bias_dtype is not None:
        kw["bias"] = [torch.randn(E, N, generator=gen).to(bias_dtype)]
    return Call(f"w8a8-{scale_dtype}-pt{per_token}-bias{bias_dtype}", x, w, kw)


def _a8w4_call(groups: Optional[int], out_dtype: torch.dtype, rows: list[int], gen: torch.Generator) -> Call:
    x = torch.randint(-128, 128, (sum(rows), K), generator=gen, dtype=torch.int8)
    q = torch.randint(-8, 8, (E, K, N), generator=gen, dtype=torch.int8)
    shape = (E, N) if groups is None else (E, groups, N)
    s = torch.rand(shape, generator=gen) * 0.01 + 0.001
    scale = trans_quant_param(s.reshape(-1)).reshape(shape)
    kw = dict(scale=[scale], bias=[a8w4_scale_bias(q, scale)], per_token_scale=[torch.rand(sum(rows), generator=gen) * 0.02],
              group_list=_counts(rows), group_list_type=1, output_dtype=out_dtype)
    return Call(f"a8w4-g{groups}-{out_dtype}", x, pack_int4(q), kw)


def _scenarios(rows: list[int]) -> list[Call]:
    gen = torch.Generator().manual_seed(sum(rows))
    calls = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for bias in (False, True):
            calls.append(_float_call(dtype, bias, rows, gen))
    for dtype in (torch.float16, torch.bfloat16):
        for bits, groups in ((8, None), (4, None), (4, 4)):
            for asym in (False, True):
                calls.append(_antiquant_call(dtype, bits, groups, asym, bias=False, rows=rows, gen=gen))
        calls.append(_antiquant_call(dtype, 4, 2, True, bias=True, rows=rows, gen=gen))
    biases = {torch.int64: (None, torch.int32), torch.bfloat16: (None, torch.int32, torch.bfloat16, torch.float32),
              torch.float32: (None, torch.int32, torch.float16, torch.float32)}
    for scale_dtype, bias_dtypes in biases.items():
        for bias_dtype in bias_dtypes:
            calls.append(_w8a8_call(scale_dtype, False, bias_dtype, rows, gen))
            if scale_dtype != torch.int64:
                calls.append(_w8a8_call(scale_dtype, True, bias_dtype, rows, gen))
    for groups in (None, 1, 4):
        for out_dtype in (torch.float16, torch.bfloat16):
            calls.append(_a8w4_call(groups, out_dtype, rows, gen))
    return calls


DECODE_ROWS = [3, 0, 1, 5]  # fewer than EXACT_MIN_ROWS rows per expert, one empty expert
PREFILL_ROWS = [40, 0, 33, 70]
SCENARIOS = {c.name: c for c in _scenarios(PREFILL_ROWS)}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_cpu_equals_reference_within_one_ulp(name: str, one_thread):
    call = SCENARIOS[name]
    ref, got = call.run("reference"), call.run("cpu")
    assert ref.dtype == got.dtype and ref.shape == got.shape
    assert_within_ulps(got, ref, 1.0, name)


@pytest.mark.parametrize("name", sorted(c.name for c in _scenarios(DECODE_ROWS)))
def test_cpu_equals_reference_at_decode_with_npu_numerics(name: str, one_thread, monkeypatch):
    monkeypatch.setenv(cpu_backend.NUMERICS_ENV, "npu")
    call = {c.name: c for c in _scenarios(DECODE_ROWS)}[name]
    assert_within_ulps(call.run("cpu"), call.run("reference"), 1.0, name)


@pytest.mark.parametrize("name", sorted(c.name for c in _scenarios(DECODE_ROWS) if c.name.startswith("w") and "a16" in c.name))
def test_decode_weight_only_fast_path_deviation_is_bounded(name: str, one_thread):
    """Default numerics at decode: the fused int kernels keep the weight in float32. The deviation from the
    NPU's rounded weight is at most sum_k |x_k| * ulp(w_k) / 2 (plus one output ulp)."""
    call = {c.name: c for c in _scenarios(DECODE_ROWS)}[name]
    ref, got = call.run("reference"), call.run("cpu")
    kw = call.kwargs
    w16 = npu_antiquant_weight(call.w, kw["antiquant_scale"][0], kw.get("antiquant_offset", [None])[0], call.x.dtype)
    from numerics_util import ulp

    half_ulp_w = ulp(w16.double(), call.x.dtype) / 2  # [E, K, N]
    rows = kw["group_list"].tolist()
    bounds, start = [], 0
    for e, r in enumerate(rows):
        bounds.append(call.x[start:start + r].double().abs() @ half_ulp_w[e])
        start += r
    bound = torch.cat(bounds) + ulp(ref.double(), ref.dtype) * 1.01
    excess = (got.double() - ref.double()).abs() - bound
    assert float(excess.max()) <= 0, f"{name}: fast-path deviation exceeds the weight-rounding bound by {float(excess.max())}"


def test_per_token_rounds_once_reproducer(one_thread):
    """Issue reproducer: 64x128 int8 x, 4 experts, N=96, bf16 scale; the old cpu path rounded the int8 GEMM to
    bf16 and then applied per_token_scale (up to 0.125 off on 26% of outputs)."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randint(-128, 128, (64, 128), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (4, 128, 96), generator=gen, dtype=torch.int8)
    scale = (torch.rand(4, 96, generator=gen) * 0.01).to(torch.bfloat16)
    pts = torch.rand(64, generator=gen) * 0.1
    kw = dict(scale=[scale], per_token_scale=[pts], group_list=_counts([20, 4, 0, 40]), group_list_type=1,
              split_item=2, group_type=0, output_dtype=torch.bfloat16)
    ref = grouped_matmul([x], [w], backend="reference", **kw)[0]
    got = grouped_matmul([x], [w], backend="cpu", **kw)[0]
    # One rounding of the float64 formula.
    acc = torch.cat([x[a:b].double() @ w[e].double() for e, (a, b) in enumerate([(0, 20), (20, 24), (24, 24), (24, 64)])])
    expert = torch.repeat_interleave(torch.arange(4), torch.tensor([20, 4, 0, 40]))
    exact = (acc * scale.double()[expert] * pts.double().unsqueeze(-1)).to(torch.bfloat16)
    assert torch.equal(ref, got)
    assert float(ulp_distance(got, exact).max()) <= 1.0


def test_fp16_output_has_no_intermediate_overflow(one_thread):
    """Issue reproducer: x = w = 127, K = 64, scale 1, per_token_scale 1e-3: the accumulator 1032256 exceeds
    fp16's range, but the NPU's float32 epilogue gives 1032 (the old cpu path gave inf)."""
    x = torch.full((3, 64), 127, dtype=torch.int8)
    w = torch.full((2, 64, 16), 127, dtype=torch.int8)
    kw = dict(scale=[torch.ones(2, 16)], per_token_scale=[torch.full((3,), 1e-3)], group_list=_counts([1, 2]),
              group_list_type=1, split_item=2, group_type=0, output_dtype=torch.float16)
    for backend in ("reference", "cpu"):
        y = grouped_matmul([x], [w], backend=backend, **kw)[0]
        assert torch.isfinite(y).all(), backend
        assert torch.equal(y, torch.full((3, 16), 1032.256, dtype=torch.float16)), backend


def test_bf16_scale_int32_bias_per_channel_is_exact(one_thread):
    """Issue reproducer: per-channel W8A8 with a bf16 scale and an int32 bias was 1 bf16 ulp off on ~7%."""
    call = _w8a8_call(torch.bfloat16, False, torch.int32, [30, 0, 50, 20], torch.Generator().manual_seed(3))
    assert torch.equal(call.run("cpu"), call.run("reference"))


def test_weight_only_weight_is_rounded_in_activation_dtype():
    """The NPU dequantizes in x's dtype: fp16 rounds after the add and after the multiply; bf16 once."""
    q = torch.tensor([[7, -8, 3]], dtype=torch.int8)
    scale = torch.tensor([0.0123, 0.0456, 0.0789])
    offset = torch.tensor([0.3, -1.7, 2.2])
    w16 = npu_antiquant_weight(q, scale.half(), offset.half(), torch.float16)
    expect16 = ((q.half() + offset.half()) * scale.half())
    assert torch.equal(w16, expect16)
    wb = npu_antiquant_weight(q, scale.bfloat16(), offset.bfloat16(), torch.bfloat16)
    expectb = ((q.double() + offset.bfloat16().double()) * scale.bfloat16().double()).to(torch.bfloat16)
    assert torch.equal(wb, expectb)


@pytest.mark.parametrize("bits,groups", [(4, 1), (4, 8), (8, 1), (8, 4)])
@pytest.mark.parametrize("with_offset", [False, True])
def test_antiquant_weight_against_float64_on_random_data(bits, groups, with_offset):
    """Every dequantization path (int4 / int8, per-channel / per-group, with / without offset, bf16 and fp16)
    against a float64 oracle of the NPU's order: bf16 = one rounding of the exact value; fp16 = rounding
    after the add and after the multiply. Scales span 2^-24..2^4, so the bf16 multiply path meets tiny and
    large exponents."""
    from gmmquant.kernels.int4 import pack_int4

    gen = torch.Generator().manual_seed(bits * 10 + groups)
    k, n = 64, 48
    lo, hi = (-8, 8) if bits == 4 else (-128, 128)
    q = torch.randint(lo, hi, (3, k, n), generator=gen, dtype=torch.int8)
    weight = pack_int4(q) if bits == 4 else q
    shape = (3, n) if groups == 1 else (3, groups, n)
    scale = torch.exp2(torch.empty(shape).uniform_(-24, 4, generator=gen)) * torch.rand(shape, generator=gen).add_(0.5)
    offset = torch.randn(shape, generator=gen) * 3 if with_offset else None

    def per_row(t):  # [E, N] / [E, G, N] -> broadcast over [E, K, N] in float64
        t = t.double()
        return t.unsqueeze(1) if groups == 1 else t.repeat_interleave(k // groups, dim=1)

    sb = scale.bfloat16()
    ob = None if offset is None else offset.bfloat16()
    exact = q.double() + (0 if ob is None else per_row(ob))
    expect_bf16 = (exact.float() * per_row(sb).float()).to(torch.bfloat16)  # NPU: float32 math, one rounding
    assert torch.equal(npu_antiquant_weight(weight, sb, ob, torch.bfloat16), expect_bf16)
    sh = scale.clamp(min=2.0**-14).half()
    oh = None if offset is None else offset.half()
    w16 = q.double() if oh is None else (q.double() + per_row(oh)).half().double()
    expect_fp16 = (w16 * per_row(sh)).half()
    assert torch.equal(npu_antiquant_weight(weight, sh, oh, torch.float16), expect_fp16)


def test_a8w4_scale_bias_restores_x_at_w(one_thread):
    """With a8w4_scale_bias the A8W4 mode computes x @ (w * scale) * per_token_scale (the -8 shift cancels)."""
    call = _a8w4_call(4, torch.bfloat16, [30, 0, 10, 24], torch.Generator().manual_seed(5))
    y = call.run("cpu").double()
    from gmm_oracle import unpack_int4_oracle, decode_scale_oracle

    q = unpack_int4_oracle(call.w).double()
    s, _ = decode_scale_oracle(call.kwargs["scale"][0])
    wdeq = q * s.repeat_interleave(K // 4, dim=1)
    rows = [30, 0, 10, 24]
    pts = call.kwargs["per_token_scale"][0].double()
    exact = torch.cat([call.x[a:a + r].double() @ wdeq[e] for e, (a, r) in enumerate(zip([0, 30, 30, 40], rows))]) * pts.unsqueeze(-1)
    err = (y - exact).abs().max() / exact.abs().max()
    assert err < 5e-3, err  # bf16 output rounding (2^-9 relative) + float16 accumulation of the quant groups
