"""The npu_grouped_matmul calls of the engines that serve MoE on Ascend, replayed on `reference` and `cpu`.

Each case is the keyword set one call site passes (vllm-ascend 182b75e: `ops/fused_moe/moe_mlp.py`
quant_apply_mlp / unquant_apply_mlp, `quantization/methods/w4a8.py` weight processing; MindSpeed's
grouped-matmul utils: bf16 GMM with cumulative group lists), with the tensor shapes those sites build.
Checked: the call passes the contract, `cpu` equals `reference` to one output ulp (with
GMMQUANT_CPU_NUMERICS=npu: these groups are decode-sized, where the default weight-only path keeps the
weight in float32; tests/test_gmm_numerics.py bounds that), and `reference` equals the float64 formula to
the output dtype's tolerance.
"""

from __future__ import annotations

import pytest
import torch

from gmmquant.kernels.backends.cpu import NUMERICS_ENV
from gmmquant.kernels import a8w4_scale_bias, dynamic_quant, grouped_matmul, pack_int4, trans_quant_param
from gmm_oracle import TOLERANCES
from numerics_util import assert_within_ulps

E, H, I = 8, 256, 128  # experts, hidden, intermediate (per partition)
COUNTS = torch.tensor([7, 0, 12, 3, 0, 20, 1, 5])
M = int(COUNTS.sum())
ROWS = torch.repeat_interleave(torch.arange(E), COUNTS)


def _both(x, w, **kw):
    ref = grouped_matmul(x, w, backend="reference", **kw)[0]
    got = grouped_matmul(x, w, backend="cpu", **kw)[0]
    assert_within_ulps(got, ref, 1.0, "cpu vs reference")
    return ref


def _check(ref: torch.Tensor, exact: torch.Tensor, extra_rtol: float = 0.0):
    rtol, atol = TOLERANCES[ref.dtype]
    err = (ref.double() - exact).abs()
    bound = (rtol + extra_rtol) * exact.abs() + atol * exact.abs().max()
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.fixture(autouse=True)
def _seed(one_thread, monkeypatch):
    monkeypatch.setenv(NUMERICS_ENV, "npu")
    torch.manual_seed(1)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_vllm_ascend_w8a8_dynamic_gmm1(scale_dtype):
    """quant_apply_mlp, W8A8_DYNAMIC: x int8 from npu_dynamic_quant, w13 int8 [E, H, 2I], scale [E, 2I] (cast to
    w2_scale's dtype), per_token_scale [M], counts, split_item 2, output_dtype = scale's output dtype."""
    hidden = torch.randn(M, H, dtype=torch.bfloat16)
    xq, pts = dynamic_quant(hidden)
    w = torch.randint(-127, 128, (E, H, 2 * I), dtype=torch.int8)
    s = (torch.rand(E, 2 * I) * 0.01).to(scale_dtype)
    out = torch.bfloat16 if scale_dtype == torch.bfloat16 else torch.float16
    ref = _both([xq], [w], scale=[s], per_token_scale=[pts], split_item=2, group_type=0, group_list=COUNTS,
                group_list_type=1, output_dtype=out)
    exact = torch.stack([xq[i].double() @ w[ROWS[i]].double() * s[ROWS[i]].double() for i in range(M)]) * pts.double().unsqueeze(-1)
    _check(ref, exact)


def test_vllm_ascend_w8a8_int32_gmm1():
    """The fused-swiglu path's gmm1: no scale, output_dtype int32, the raw accumulator (exact)."""
    xq = torch.randint(-127, 128, (M, H), dtype=torch.int8)
    w = torch.randint(-127, 128, (E, H, 2 * I), dtype=torch.int8)
    ref = _both([xq], [w], split_item=2, group_type=0, group_list=COUNTS.cumsum(0), group_list_type=0, output_dtype=torch.int32)
    exact = torch.stack([xq[i].long() @ w[ROWS[i]].long() for i in range(M)])
    assert torch.equal(ref.long(), exact)


def test_vllm_ascend_w4a16_antiquant():
    """quant_apply_mlp with w1_offset: bf16 x, int4 w13 [E, H, 2I/8], per-group antiquant scale and offset
    [E, H/g, 2I] bf16 (offsets all zero for msModelSlim's symmetric W4A16), counts, output bf16."""
    g = 64
    x = torch.randn(M, H, dtype=torch.bfloat16)
    q = torch.randint(-8, 8, (E, H, 2 * I), dtype=torch.int8)
    s = (torch.rand(E, H // g, 2 * I) * 0.02).to(torch.bfloat16)
    o = torch.zeros(E, H // g, 2 * I, dtype=torch.bfloat16)
    ref = _both([x], [pack_int4(q)], antiquant_scale=[s], antiquant_offset=[o], split_item=2, group_list_type=1,
                group_type=0, group_list=COUNTS, output_dtype=torch.bfloat16)
    w = q.double() * s.double().repeat_interleave(g, dim=1)
    exact = torch.stack([x[i].double() @ w[ROWS[i]] for i in range(M)])
    _check(ref, exact, extra_rtol=2.0**-8)  # the NPU rounds the dequantized weight to bf16


@pytest.mark.parametrize("per_group", [False, True])
def test_vllm_ascend_w4a8_gmm1_and_gmm2(per_group: bool):
    """W4A8_DYNAMIC: x int8, int4 w13 [E, H, 2I/8] with int64 scale [E, 2I] (w2: [E, 1, H]) built by
    `_process_scale` (float32 bits in the low word), bias = scale_bias [E, N] fp32, per_token_scale [M],
    counts, output_dtype bf16. The per-group form is msModelSlim's "version 1.0.0" second-level scale folded
    into a [E, H/g, 2I] scale."""
    hidden = torch.randn(M, H, dtype=torch.bfloat16)
    xq, pts = dynamic_quant(hidden)
    q13 = torch.randint(-8, 8, (E, H, 2 * I), dtype=torch.int8)
    s13 = torch.rand(E, H // 128, 2 * I) * 0.02 if per_group else torch.rand(E, 2 * I) * 0.02
    enc13 = (s13.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF)  # vllm-ascend's bit view
    y13 = _both([xq], [pack_int4(q13)], scale=[enc13], bias=[a8w4_scale_bias(q13, enc13)], per_token_scale=[pts],
                split_item=2, group_type=0, group_list=COUNTS, group_list_type=1, output_dtype=torch.bfloat16)
    s_full = s13.repeat_interleave(H // s13.shape[1], dim=1) if per_group else s13.unsqueeze(1)
    exact = torch.stack([xq[i].double() @ (q13[ROWS[i]].double() * s_full[ROWS[i]].double()) for i in range(M)]) * pts.double().unsqueeze(-1)
    _check(y13, exact, extra_rtol=2.0**-10)  # float16 accumulation of the int4 halves
    # gmm2 (down): per-channel scale passed as [E, 1, H]
    act = torch.nn.functional.silu(y13[:, :I].float()) * y13[:, I:].float()
    aq, apts = dynamic_quant(act.to(torch.bfloat16))
    q2 = torch.randint(-8, 8, (E, I, H), dtype=torch.int8)
    enc2 = trans_quant_param((torch.rand(E * H) * 0.02)).reshape(E, 1, H)
    _both([aq], [pack_int4(q2)], scale=[enc2], bias=[a8w4_scale_bias(q2, enc2)], per_token_scale=[apts], split_item=2,
          group_type=0, group_list=COUNTS, group_list_type=1, output_dtype=torch.bfloat16)


def test_vllm_ascend_unquant_with_transposed_weight_and_bias():
    """unquant_apply_mlp: w1 transposed from [E, 2I, H] storage (need_trans), fp32 bias [E, 2I], no output_dtype."""
    x = torch.randn(M, H, dtype=torch.bfloat16)
    w_storage = torch.randn(E, 2 * I, H, dtype=torch.bfloat16) * 0.05
    b = torch.randn(E, 2 * I)
    ref = _both([x], [w_storage.transpose(1, 2)], bias=[b], split_item=2, group_list_type=1, group_type=0, group_list=COUNTS)
    exact = torch.stack([x[i].double() @ w_storage[ROWS[i]].double().t() + b[ROWS[i]].double() for i in range(M)])
    _check(ref, exact)


def test_mindspeed_bf16_cumsum():
    """MindSpeed's GMM: bf16 x [M, K], weight [E, K, N], cumulative group_list (type 0), split_item 3."""
    x = torch.randn(M, H, dtype=torch.bfloat16)
    w = torch.randn(E, H, I, dtype=torch.bfloat16) * 0.05
    ref = _both([x], [w], group_list=COUNTS.cumsum(0), group_type=0, group_list_type=0, split_item=3)
    exact = torch.stack([x[i].double() @ w[ROWS[i]].double() for i in range(M)])
    _check(ref, exact)
