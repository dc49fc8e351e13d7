"""A port of Ascend op-plugin's npu_grouped_matmul tests (test/test_custom_ops/test_npu_grouped_matmul.py).

Every upstream case runs here on the `reference` and `cpu` backends with upstream's scenario, its golden
formula (`upstream_goldens.py`, our code) and its pass rule (`upstream_rules.py`, restated). Where upstream's
own check is vacuous (the int8 cases' prec = 1) the port states a real one. Cases that upstream accepts and
gmmquant refuses, or the reverse, are tests of the refusal with the reason (docs/KERNELS.md, "Upstream tests
and the contract").

Default sizes keep the module to a few seconds; `GMMQUANT_PEER_FULL=1` runs upstream's own shapes
(marker `peer_full`).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from gmmquant.kernels import GMMContractError, a8w4_scale_bias, grouped_matmul, pack_int4, trans_quant_param
from upstream_goldens import a8w4_golden, antiquant_golden, float_golden, quant_golden
from upstream_rules import close_fraction_rule, exact_or_one_off, max_abs_rule, rtol_rule

BACKENDS = ("reference", "cpu")
FULL = os.environ.get("GMMQUANT_PEER_FULL") == "1"
SIZES = ["small", pytest.param("upstream", marks=[pytest.mark.peer_full, pytest.mark.skipif(not FULL, reason="GMMQUANT_PEER_FULL=1 runs upstream's shapes")])]


def _normal(*shape: int, dtype=torch.float16, std: float = 0.1) -> torch.Tensor:
    return torch.normal(0.0, std, size=shape).to(dtype)


def _scale(size: str, small: int, upstream: int) -> int:
    return upstream if size == "upstream" else small


@pytest.fixture(autouse=True)
def _seed(one_thread):
    torch.manual_seed(0)
    np.random.seed(0)


# ---- float cases -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_0_multi_multi_multi(backend):
    """test_npu_grouped_matmul_0: three independent fp16 matmuls with bias (List API, split_item 0)."""
    x = [_normal(256, 256), _normal(1024, 256), _normal(512, 1024)]
    w = [_normal(256, 256), _normal(256, 1024), _normal(1024, 128)]
    b = [_normal(256), _normal(1024), _normal(128)]
    out = grouped_matmul(x, w, bias=b, split_item=0, backend=backend)
    for i in range(3):
        rtol_rule(float_golden(x[i], w[i], b[i]), out[i], 0.001)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_0_multi_dim(backend, size):
    """test_npu_grouped_matmul_0_multi_dim: 3-D x tensors in multi/multi/multi."""
    lead = _scale(size, 2, 7)
    x = [_normal(lead, 1024, 96), _normal(lead, 1024, 32)]
    w = [_normal(96, _scale(size, 640, 5120)), _normal(32, _scale(size, 1024, 8192))]
    b = [_normal(w[0].shape[1]), _normal(w[1].shape[1])]
    out = grouped_matmul(x, w, bias=b, split_item=0, backend=backend)
    for i in range(2):
        assert out[i].shape == (lead, 1024, w[i].shape[1])
        rtol_rule(float_golden(x[i], w[i], b[i]), out[i], 0.001)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_1_and_9_single_single_single(backend, dtype):
    """test_npu_grouped_matmul_1 (fp16) / _9 (fp32): one 3-D weight, cumulative Tensor group_list."""
    x = _normal(1792, 1024, dtype=dtype)
    w = _normal(2, 1024, 256, dtype=dtype)
    out = grouped_matmul([x], [w], group_list=torch.tensor([256, 1792]), split_item=3, group_type=0, backend=backend)[0]
    golden = torch.cat([float_golden(x[:256], w[0], None), float_golden(x[256:], w[1], None)])
    rtol_rule(golden, out, 0.001)


@pytest.mark.parametrize("backend", BACKENDS)
def test_2_multi_multi_single(backend):
    """test_npu_grouped_matmul_2: three x tensors, one output (split_item 2)."""
    x = [_normal(256, 256), _normal(1024, 256), _normal(512, 1024)]
    w = [_normal(256, 256), _normal(256, 256), _normal(1024, 256)]
    b = [_normal(256) for _ in range(3)]
    out = grouped_matmul(x, w, bias=b, split_item=2, backend=backend)[0]
    rtol_rule(torch.cat([float_golden(x[i], w[i], b[i]) for i in range(3)]), out, 0.001)


@pytest.mark.parametrize("backend", BACKENDS)
def test_3_single_multi_single_list_api(backend):
    """test_npu_grouped_matmul_3: one x, three weights, List[int] group_list."""
    x = _normal(1792, 1024)
    w = [_normal(1024, 256) for _ in range(3)]
    b = [_normal(256) for _ in range(3)]
    out = grouped_matmul([x], w, bias=b, group_list=[256, 1280, 1792], split_item=3, backend=backend)[0]
    golden = torch.cat([float_golden(x[a:z], w[i], b[i]) for i, (a, z) in enumerate([(0, 256), (256, 1280), (1280, 1792)])])
    rtol_rule(golden, out, 0.001)


@pytest.mark.parametrize("backend", BACKENDS)
def test_4_single_weight_tensor_bias(backend):
    """test_npu_grouped_matmul_4: a 3-D weight with a [E, N] bias and a cumulative Tensor group_list."""
    x = _normal(1792, 256)
    w = _normal(3, 256, 128)
    b = _normal(3, 128)
    out = grouped_matmul([x], [w], bias=[b], group_list=torch.tensor([256, 1280, 1792]), split_item=3, group_type=0, backend=backend)[0]
    golden = torch.cat([float_golden(x[a:z], w[i], b[i]) for i, (a, z) in enumerate([(0, 256), (256, 1280), (1280, 1792)])])
    rtol_rule(golden, out, 0.001)


def test_5_tuning_config_on_float_is_refused_as_the_doc_says():
    """test_npu_grouped_matmul_5 passes tuning_config=[1792] to a float call. The doc restricts tuning_config
    to int8 full quant with single tensors; gmmquant follows the doc (a hint, dropping it changes no result)."""
    x, w = _normal(1792, 256), _normal(3, 256, 128)
    with pytest.raises(GMMContractError, match=r"\[tuning_config.scenario\]"):
        grouped_matmul([x], [w], group_list=torch.tensor([256, 1280, 1792]), split_item=3, group_type=0, tuning_config=[1792])
    y = grouped_matmul([x], [w], group_list=torch.tensor([256, 1280, 1792]), split_item=3, group_type=0)[0]
    assert y.shape == (1792, 128)


@pytest.mark.parametrize("backend", BACKENDS)
def test_6_k_split(backend):
    """test_npu_grouped_matmul_6: group_type 2, x passed transposed, [G, M, N] output."""
    xt = _normal(1792, 1024)
    w = _normal(1792, 256)
    sizes = [256, 256, 512, 768]
    ends = torch.cumsum(torch.tensor(sizes), 0)
    out = grouped_matmul([xt.T], [w], group_list=ends, split_item=3, group_type=2, backend=backend)[0]
    starts = [0] + ends.tolist()[:-1]
    golden = torch.stack([float_golden(xt.T[:, a:z], w[a:z], None) for a, z in zip(starts, ends.tolist())])
    rtol_rule(golden, out, 0.001)


def test_7_fp32_single_multi_single_is_refused_as_the_doc_says():
    """test_npu_grouped_matmul_7 runs float32 x with a list of three weights and a Tensor group_list. The doc's
    dtype table allows float32 only when x, weight and y are single tensors: upstream's test and its doc
    disagree; gmmquant follows the doc. test_8 (the same data as one 3-D weight) is accepted."""
    x = _normal(1792, 1024, dtype=torch.float32)
    w = [_normal(1024, 256, dtype=torch.float32) for _ in range(3)]
    with pytest.raises(GMMContractError, match=r"\[dtype.float32_single_only\]"):
        grouped_matmul([x], w, group_list=torch.tensor([256, 1280, 1792]), split_item=3, group_type=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_8_fp32_single_weight(backend):
    """test_npu_grouped_matmul_8: float32, one 3-D weight, [E, N] float32 bias."""
    x = _normal(1792, 256, dtype=torch.float32)
    w = _normal(3, 256, 128, dtype=torch.float32)
    b = _normal(3, 128, dtype=torch.float32)
    out = grouped_matmul([x], [w], bias=[b], group_list=torch.tensor([256, 1280, 1792]), split_item=3, group_type=0, backend=backend)[0]
    golden = torch.cat([float_golden(x[a:z], w[i], b[i]) for i, (a, z) in enumerate([(0, 256), (256, 1280), (1280, 1792)])])
    rtol_rule(golden, out, 0.001)


# ---- quantized cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_antiquant_0_int8_weight_only(backend):
    """test_npu_grouped_matmul_antiquant_0 (skipped upstream): fp16 x, int8 weights, fp16 scale and offset.
    Upstream's golden dequantizes `(w + o) * s` in fp16; its rule is rtol 0.005 (prec16)."""
    x = [_normal(256, 256, std=0.05), _normal(1024, 256, std=0.05), _normal(512, 1024, std=0.05)]
    w = [torch.randint(-9, 9, s, dtype=torch.int8) for s in ((256, 256), (256, 1024), (1024, 128))]
    n = [256, 1024, 128]
    b = [_normal(k, std=0.05) for k in n]
    s = [_normal(k, std=0.05) for k in n]
    o = [_normal(k, std=0.05) for k in n]
    out = grouped_matmul(x, w, bias=b, antiquant_scale=s, antiquant_offset=o, split_item=0, backend=backend)
    for i in range(3):
        rtol_rule(antiquant_golden(x[i], w[i], s[i], o[i], b[i]), out[i], 0.005, 0.005)


def _deq_scale(n: int) -> torch.Tensor:
    return torch.from_numpy(np.random.uniform(0.01, 0.03, size=n).astype(np.float32))


@pytest.mark.parametrize("scale_dtype,output_dtype", [(torch.int64, None), (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_quant_3_per_channel(backend, scale_dtype, output_dtype):
    """test_npu_grouped_matmul_quant_3: int8 x in [1, 5), three int8 weights, int32 bias, one scale dtype each.

    Upstream builds its int64 scale as `fp32_scale.to(int64)` (all zeros) and compares with prec = 1, a check
    that passes for any output; the port encodes the scale with trans_quant_param and asserts the int8 output
    to within one step, and the float outputs to the float golden (rtol 1e-3 for fp16, 2^-8 for bf16)."""
    x = torch.randint(1, 5, (1792, 1024), dtype=torch.int8)
    w = [torch.randint(1, 5, (1024, 256), dtype=torch.int8) for _ in range(3)]
    b = [torch.randint(1, 5, (256,), dtype=torch.int32) for _ in range(3)]
    fp32 = [_deq_scale(256) for _ in range(3)]
    if scale_dtype == torch.int64:
        enc = [trans_quant_param(s) for s in fp32]
        used = [(e & 0xFFFFE000).to(torch.int32).view(torch.float32) for e in enc]  # FP19, as the kernel reads it
        scales = enc
    else:
        scales = [s.to(scale_dtype) for s in fp32]
        used = scales
    out = grouped_matmul([x], w, bias=b, scale=scales, group_list=torch.tensor([256, 1280, 1792]), split_item=3,
                         group_type=0, output_dtype=output_dtype, backend=backend)[0]
    bounds = [(0, 256), (256, 1280), (1280, 1792)]
    golden = torch.cat([quant_golden(x[a:z], w[i], b[i], used[i], output_dtype) for i, (a, z) in enumerate(bounds)])
    if output_dtype is None:
        exact_or_one_off(golden, out)
    elif output_dtype == torch.float16:
        rtol_rule(golden, out, 0.001, 0.001)
    else:
        rtol_rule(golden.float(), out.float(), 2.0**-8)


def test_empty_x_and_weight_lists_are_refused():
    """test_npu_grouped_matmul_0_empty_x_w expects a RuntimeError; gmmquant raises GMMContractError (a ValueError)."""
    with pytest.raises(GMMContractError, match=r"\[x.list\]"):
        grouped_matmul([], [], bias=[_normal(256)], split_item=0)


def test_group_list_none_without_group_type_follows_the_seed_spec():
    """test_npu_grouped_matmul_group_list_none (skipped upstream) expects torch_npu to demand group_type when
    group_list is None. The seed spec's own example omits it, and gmmquant keeps that example working as the
    List API (docs/KERNELS.md); group_type=-1 is the form that runs on every torch_npu version."""
    x = [_normal(256, 256), _normal(1024, 256)]
    w = [_normal(256, 256), _normal(256, 1024)]
    list_api = grouped_matmul(x, w, split_item=0)
    tensor_api = grouped_matmul(x, w, split_item=0, group_type=-1)
    for a, b in zip(list_api, tensor_api):
        assert torch.equal(a, b)


@pytest.mark.parametrize("group_type,rule", [(1, "group_type.n_axis"), (3, "group_type.range"), (100, "group_type.range")])
def test_invalid_group_type(group_type, rule):
    """test_npu_grouped_matmul_invalid_group_type: 1, 3 and 100 are rejected."""
    with pytest.raises(GMMContractError, match=rf"\[{rule}\]"):
        grouped_matmul([_normal(1792, 256)], [_normal(1792, 256)], group_list=torch.tensor([256, 512, 1024, 1792]),
                       split_item=3, group_type=group_type)


# ---- A16W4 and A8W4 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a16w4(backend, dtype, size):
    """test_npu_grouped_matmul_A16W4: int4 weights from randint(-5, 5), per-channel scale and offset uniform in
    [0, 1), fp32 bias (bf16 x), cumulative group_list, rule: 99.5% within isclose(0.005, 0.005). The fp16
    branch of upstream's golden is run with an fp16 bias, as the fp16 row of the dtype table requires."""
    e, m, n, k = 8, _scale(size, 256, 2048), _scale(size, 256, 2688), _scale(size, 512, 5120)
    x = torch.randint(-5, 5, (m, k)).to(dtype)
    q = torch.randint(-5, 5, (e, k, n), dtype=torch.int32)
    bias = torch.randn(e, n, dtype=torch.float32 if dtype == torch.bfloat16 else torch.float16)
    scale = torch.empty(e, n, dtype=dtype).uniform_()
    offset = torch.empty(e, n, dtype=dtype).uniform_()
    step = m // (e - 1)
    ends = torch.tensor([i * step for i in range(e)])
    ends[-1] = m
    out = grouped_matmul([x], [pack_int4(q)], bias=[bias], antiquant_scale=[scale], antiquant_offset=[offset],
                         group_list=ends, split_item=3, group_type=0, group_list_type=0, backend=backend)[0]
    starts = [0] + ends.tolist()[:-1]
    golden = torch.cat([antiquant_golden(x[a:z], q[i], scale[i], offset[i], bias[i]) for i, (a, z) in enumerate(zip(starts, ends.tolist()))])
    frac = close_fraction_rule(golden, out)
    if backend == "reference":
        assert frac == 1.0  # the reference is upstream's formula; only float32 summation order differs


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a8w4(backend, size):
    """test_npu_grouped_matmul_A8W4 (skipped upstream): int8 x, int4 weights, per-group int64 scale (float32
    bits in the low word, the per-channel scale rounded through fp16), fp32 bias, [M, 1] per-token scale,
    counts group_list, float16 output; rule: assertEqual at 1e-5, i.e. the golden bit for bit.

    Upstream's group_list is all ones (8 rows) with M = 768 rows of x and compares the first 8 rows only.
    gmmquant requires the counts to sum to M (`group_list.total`) and the per-token scale to be [M]: the port
    passes the 8 rows the kernel reads and the scale flattened."""
    e, k, n, g = 8, _scale(size, 1024, 7168), _scale(size, 256, 4096), 256
    rows = np.ones(e, dtype=np.int64)
    m = int(rows.sum())
    x = torch.randint(-5, 5, (m, k)).to(torch.int8)
    q = torch.randint(-5, 5, (e, k, n), dtype=torch.int32)
    bias = torch.empty(e, n).uniform_(-5, 5)
    per_channel = np.random.normal(0, 0.01, (e, 1, n)).astype(np.float32)
    fp32 = (per_channel * np.ones((e, k // g, n), dtype=np.float32)).astype(np.float16).astype(np.float32)
    scale_bits = torch.from_numpy(fp32.view(np.uint32).astype(np.int64))  # low word = float32 bits, no flag
    pts = torch.empty(m, 1).uniform_()
    out = grouped_matmul([x], [pack_int4(q)], bias=[bias], scale=[scale_bits], per_token_scale=[pts.reshape(-1)],
                         group_list=torch.from_numpy(rows), split_item=3, group_type=0, group_list_type=1,
                         output_dtype=torch.float16, backend=backend)[0]
    golden = torch.from_numpy(a8w4_golden(x.numpy(), q.numpy(), scale_bits.numpy(), bias.numpy(), rows, pts.numpy()))
    max_abs_rule(golden, out)


def test_a8w4_group_list_shorter_than_x_is_refused():
    """Upstream's A8W4 case passes 768 rows of x with counts summing to 8; gmmquant refuses it, naming the rule."""
    x = torch.zeros(16, 512, dtype=torch.int8)
    w = torch.zeros(2, 512, 8, dtype=torch.int32)
    with pytest.raises(GMMContractError, match=r"\[group_list.total\]"):
        grouped_matmul([x], [w], bias=[torch.zeros(2, 64)], scale=[torch.zeros(2, 2, 64, dtype=torch.int64)],
                       per_token_scale=[torch.ones(16)], group_list=torch.tensor([1, 1]), split_item=3, group_type=0,
                       group_list_type=1, output_dtype=torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a8w4_per_group_zeros(backend):
    """test_npu_grouped_matmul_a8w4_per_group_weight_nz (Ascend950, NZ weight): zeros in, zeros out, [m, n]
    bf16, quant group 256. Its group_list [m/2, m] as counts sums to 1.5 m; the port uses [m/2, m/2]."""
    m, k, n = 8, 512, 64
    scale = torch.from_numpy(np.ones((2, k // 256, n), dtype=np.float32).view(np.uint32).astype(np.int64))
    out = grouped_matmul([torch.zeros(m, k, dtype=torch.int8)], [torch.zeros(2, k, n // 8, dtype=torch.int32)],
                         bias=[torch.zeros(2, n)], scale=[scale], per_token_scale=[torch.ones(m)],
                         group_list=torch.tensor([m // 2, m // 2]), split_item=3, group_type=0, group_list_type=1,
                         output_dtype=torch.bfloat16, backend=backend)[0]
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert torch.equal(out, torch.zeros(m, n, dtype=torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a8w4_with_scale_bias_is_x_at_dequantized_w(backend):
    """The bias vllm-ascend builds (`8 * sum_k w * scale`, gmmquant's a8w4_scale_bias) turns the kernel's
    `(x - 8) @ W` into `x @ W`: checked against float64 on upstream-like data."""
    e, k, n = 4, 512, 128
    x = torch.randint(-128, 128, (12, k), dtype=torch.int8)
    q = torch.randint(-8, 8, (e, k, n), dtype=torch.int32)
    s = torch.rand(e, n) * 0.01
    enc = trans_quant_param(s.reshape(-1)).reshape(e, n)
    counts = torch.tensor([5, 0, 3, 4])
    out = grouped_matmul([x], [pack_int4(q)], bias=[a8w4_scale_bias(pack_int4(q), enc)], scale=[enc],
                         group_list=counts, split_item=3, group_type=0, group_list_type=1, output_dtype=torch.float16, backend=backend)[0]
    used = (enc & 0xFFFFFFFF).to(torch.int32).view(torch.float32).double()
    expert = torch.repeat_interleave(torch.arange(e), counts)
    exact = torch.stack([x[i].double() @ (q[expert[i]].double() * used[expert[i]]) for i in range(12)])
    assert float(((out.double() - exact).abs() / exact.abs().max()).max()) < 2e-3
