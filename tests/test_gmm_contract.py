"""Every contract rule raises GMMContractError naming the rule, before any backend runs."""

from __future__ import annotations

import pytest
import torch

from gmmquant.kernels import GMMContractError, grouped_matmul, pack_int4
from gmmquant.kernels.contract import INNER_AXIS_LIMIT

K, N, E = 32, 16, 4
COUNTS = [3, 0, 2, 1]
M = sum(COUNTS)
bf16 = torch.bfloat16


def xs(m=M, k=K, dtype=bf16):
    return [torch.randn(m, k).to(dtype)]


def w3(e=E, k=K, n=N, dtype=bf16):
    return [torch.randn(e, k, n).to(dtype)]


def counts(values=COUNTS):
    return torch.tensor(values, dtype=torch.int64)


def moe(**overrides):
    """A valid bf16 single/single/single call; each test breaks one thing."""
    kw = dict(x=xs(), weight=w3(), group_list=counts(), group_list_type=1, group_type=0, split_item=2)
    kw.update(overrides)
    return kw


def int8_call(**overrides):
    kw = dict(x=xs(dtype=torch.int8), weight=w3(dtype=torch.int8), scale=[torch.rand(E, N).to(bf16)],
              per_token_scale=[torch.rand(M)], group_list=counts(), group_list_type=1, group_type=0,
              split_item=2, output_dtype=bf16)
    for key in ("x", "weight"):
        kw[key] = [torch.randint(-5, 5, t.shape, dtype=torch.int8) for t in kw[key]]
    kw.update(overrides)
    return kw


def w4_call(**overrides):
    q = torch.randint(-8, 8, (E, K, N), dtype=torch.int8)
    kw = dict(x=xs(), weight=[pack_int4(q)], antiquant_scale=[torch.rand(E, 2, N).to(bf16)],
              group_list=counts(), group_list_type=1, group_type=0, split_item=2)
    kw.update(overrides)
    return kw


CASES = [
    # lists and reserved parameters
    ("x.list", moe(x=torch.randn(M, K).to(bf16))),
    ("x.list", moe(x=[])),
    ("x.max_len", dict(x=[torch.randn(1, K).to(bf16)] * 129, weight=[torch.randn(K, N).to(bf16)] * 129, group_type=-1)),
    ("weight.list", moe(weight=[torch.randn(E, K, N).to(bf16), "w"])),
    ("offset.none", moe(offset=[torch.zeros(E, N)])),
    ("activation_input.none", moe(activation_input=[torch.zeros(1)])),
    ("activation_quant_scale.none", moe(activation_quant_scale=[torch.zeros(1)])),
    ("activation_quant_offset.none", moe(activation_quant_offset=[torch.zeros(1)])),
    ("split_item.range", moe(split_item=4)),
    # API / grouping parameters
    ("group_type.required", moe(group_type=None)),
    ("group_type.n_axis", moe(group_type=1)),
    ("group_type.range", moe(group_type=3)),
    ("group_list_type.range", moe(group_list_type=3)),
    ("group_type.list_api", dict(x=xs(), weight=[torch.randn(K, N).to(bf16)] * E, group_list=[3, 3, 5, 6], group_type=0, split_item=2)),
    ("group_list_type.list_api", dict(x=xs(), weight=[torch.randn(K, N).to(bf16)] * E, group_list=[3, 3, 5, 6], group_list_type=1, split_item=2)),
    ("act_type.list_api", dict(x=xs(), weight=[torch.randn(K, N).to(bf16)] * E, group_list=[3, 3, 5, 6], act_type=1, split_item=2)),
    ("per_token_scale.list_api", dict(x=xs(), weight=[torch.randn(K, N).to(bf16)] * E, group_list=[3, 3, 5, 6], per_token_scale=[torch.rand(M)], split_item=2)),
    ("group_list.type", moe(group_list=(3.0, 0.0))),
    ("group_list.type", moe(group_list="3,0")),
    ("act_type.unsupported", int8_call(act_type=3)),
    ("act_type.range", int8_call(act_type=7)),
    ("act_type.per_token_only", moe(act_type=5)),
    # scenarios
    ("scenario.list_lengths", dict(x=xs() * 2, weight=[torch.randn(K, N).to(bf16)] * 3, group_type=-1)),
    ("scenario.unsupported", moe(split_item=0)),
    ("scenario.unsupported", dict(x=xs() * 2, weight=[torch.randn(K, N).to(bf16)] * 2, group_type=-1, split_item=2)),
    ("group_list.must_be_none", dict(x=xs() * 2, weight=[torch.randn(K, N).to(bf16)] * 2, group_type=-1, group_list=counts([3, 3]))),
    ("group_list.required", moe(group_list=None)),
    ("group_list.required", dict(x=xs(), weight=[torch.randn(K, N).to(bf16)] * 2, split_item=2)),
    # group_list values
    ("group_list.dtype", moe(group_list=counts().to(torch.int32))),
    ("group_list.shape", moe(group_list=counts().reshape(2, 2))),
    ("group_list.shape", int8_call(group_list=counts(), group_list_type=2)),
    ("group_list.non_negative", moe(group_list=counts([4, -1, 2, 1]))),
    ("group_list.monotonic", moe(group_list=counts([3, 2, 5, 6]), group_list_type=0)),
    ("group_list.monotonic", dict(x=xs(), weight=[torch.randn(K, N).to(bf16)] * E, group_list=[3, 2, 5, 6], split_item=2)),
    ("group_list.length", moe(group_list=counts([3, 0, 3]))),
    ("group_list.length_one", dict(x=xs(), weight=[torch.randn(K, N).to(bf16)], group_list=[M], split_item=2)),
    ("group_list.total", moe(group_list=counts([3, 0, 2, 2]))),
    ("group_list.total", moe(group_list=counts([3, 3, 5, 7]), group_list_type=0)),
    ("group_list.matches_x", dict(x=[torch.randn(2, K).to(bf16), torch.randn(3, K).to(bf16)], weight=[torch.randn(K, N).to(bf16)] * 2,
                                   group_list=counts([3, 2]), group_list_type=1, group_type=0, split_item=2)),
    ("group_list.group_index", int8_call(group_list=torch.tensor([[0, 3], [9, 3]]), group_list_type=2)),
    ("group_list_type.pairs_int8_only", moe(group_list=torch.tensor([[0, 3], [2, 3]]), group_list_type=2)),
    ("group_list.max_groups", dict(x=xs(m=0, k=2), weight=[torch.randn(1025, 2, 2).to(bf16)], group_list=torch.zeros(1025, dtype=torch.int64),
                                   group_list_type=1, group_type=0, split_item=2)),
    # devices, dtypes
    ("device.same", moe(weight=[torch.randn(E, K, N).to(bf16).to("meta")])),
    ("device.same", w4_call(antiquant_scale=[torch.rand(E, 2, N).to(bf16).to("meta")])),
    ("x.same_dtype", dict(x=[torch.randn(2, K).to(bf16), torch.randn(2, K)], weight=[torch.randn(K, N).to(bf16)] * 2, group_type=-1)),
    ("dtype.table", moe(weight=w3(dtype=torch.float16))),
    ("dtype.table", moe(x=xs(dtype=torch.int8))),
    ("dtype.float32_single_only", dict(x=xs(dtype=torch.float32), weight=[torch.randn(K, N)] * E, group_list=counts(), group_list_type=1, group_type=0, split_item=2)),
    ("bias.dtype", moe(bias=[torch.randn(E, N).to(bf16)])),
    ("bias.dtype", moe(x=xs(dtype=torch.float16), weight=w3(dtype=torch.float16), bias=[torch.randn(E, N)])),
    ("bias.dtype", int8_call(bias=[torch.randn(E, N).to(torch.float16)])),
    ("bias.k_split", dict(x=[torch.randn(K, 3).to(bf16).t()], weight=[torch.randn(K, N).to(bf16)], bias=[torch.randn(N)],
                           group_list=counts([16, 16]), group_list_type=1, group_type=2, split_item=2)),
    ("scale.must_be_none", moe(scale=[torch.rand(E, N)])),
    ("antiquant_scale.must_be_none", moe(antiquant_scale=[torch.rand(E, N).to(bf16)])),
    ("per_token_scale.must_be_none", moe(per_token_scale=[torch.rand(M)])),
    ("output_dtype.table", moe(output_dtype=torch.float16)),
    ("output_dtype.table", int8_call(output_dtype=torch.float16)),
    ("output_dtype.table", int8_call(output_dtype=None)),
    ("scale.required", int8_call(scale=None, per_token_scale=None, output_dtype=bf16)),
    ("scale.required", int8_call(scale=None)),
    ("scale.dtype", int8_call(scale=[torch.rand(E, N).to(torch.float16)], output_dtype=torch.float16)),
    ("scale.dtype", int8_call(scale=[torch.zeros(E, N, dtype=torch.int64)], output_dtype=None)),
    ("scale.dtype", dict(x=[torch.randint(-5, 5, (M, K), dtype=torch.int8)], weight=[torch.randint(-5, 5, (K, N), dtype=torch.int8)] * E,
                         scale=[torch.rand(N)] * E, group_list=[3, 3, 5, 6], split_item=2, output_dtype=torch.float16)),
    ("scale.required", dict(x=[torch.randint(-5, 5, (M, K), dtype=torch.int8)], weight=[torch.randint(-5, 5, (K, N), dtype=torch.int8)] * E,
                            group_list=[3, 3, 5, 6], split_item=2)),
    ("per_token_scale.dtype", int8_call(per_token_scale=[torch.rand(M).to(bf16)])),
    ("group_type.k_split_float_only", int8_call(x=[torch.randint(-5, 5, (K, M), dtype=torch.int8).t()], weight=[torch.randint(-5, 5, (K, N), dtype=torch.int8)],
                                                 per_token_scale=None, scale=None, output_dtype=torch.int32, group_list=counts([16, 16]), group_type=2)),
    ("tuning_config.type", int8_call(tuning_config=[-1])),
    ("tuning_config.scenario", moe(tuning_config=[4])),
    # weight-only
    ("antiquant_scale.required", w4_call(antiquant_scale=None)),
    ("antiquant_scale.dtype", w4_call(antiquant_scale=[torch.rand(E, 2, N).to(torch.float16)])),
    ("antiquant_offset.dtype", w4_call(antiquant_offset=[torch.rand(E, 2, N)])),
    ("antiquant_offset.shape", w4_call(antiquant_offset=[torch.rand(E, N).to(bf16)])),
    ("antiquant_offset.must_be_none", moe(antiquant_offset=[torch.rand(E, N).to(bf16)])),
    ("antiquant_scale.int8_per_group", moe(weight=[torch.randint(-5, 5, (E, K, N), dtype=torch.int8)], antiquant_scale=[torch.rand(E, 2, N).to(bf16)])),
    ("antiquant_scale.group_divides_k", w4_call(antiquant_scale=[torch.rand(E, 3, N).to(bf16)])),
    ("antiquant_scale.shape", w4_call(antiquant_scale=[torch.rand(E, N + 8).to(bf16)])),
    ("antiquant_scale.group_length_equal", dict(x=xs(), weight=[pack_int4(torch.zeros(K, N, dtype=torch.int8))] * E,
                                                antiquant_scale=[torch.rand(2, N).to(bf16)] * 3 + [torch.rand(4, N).to(bf16)],
                                                group_list=counts(), group_list_type=1, group_type=0, split_item=2)),
    ("antiquant_scale.len", w4_call(antiquant_scale=[torch.rand(E, 2, N).to(bf16)] * 2)),
    ("weight.int4_tensor_api", dict(x=xs(), weight=[pack_int4(torch.zeros(K, N, dtype=torch.int8))] * E, antiquant_scale=[torch.rand(N).to(bf16)] * E,
                                    group_list=[3, 3, 5, 6], split_item=2)),
    # shapes and layouts
    ("x.rank", moe(x=[torch.randn(2, 3, K).to(bf16)])),
    ("x.rank", dict(x=[torch.randn(2, 1, 1, 1, 1, 1, K).to(bf16)], weight=[torch.randn(K, N).to(bf16)], group_type=-1)),
    ("x.transposed", moe(x=[torch.randn(K, M).to(bf16).t()])),
    ("x.transposed", dict(x=[torch.randn(3, K).to(bf16)], weight=[torch.randn(K, N).to(bf16)], group_list=counts([16, 16]), group_list_type=1, group_type=2, split_item=2)),
    ("weight.rank", dict(x=xs() * 2, weight=w3() * 2, group_type=-1)),
    ("weight.rank", moe(weight=[torch.randn(E, K, N).to(bf16)] * 2, group_list=counts([3, 3]))),
    ("weight.transposed_uniform", dict(x=xs(), weight=[torch.randn(N, K).to(bf16).t(), torch.randn(K, N).to(bf16)], group_list=[3, 6], split_item=2)),
    ("weight.transposed", w4_call(weight=[pack_int4(torch.zeros(E, 8, K, dtype=torch.int8)).transpose(1, 2)], antiquant_scale=[torch.rand(E, 8).to(bf16)])),
    ("shape.k", moe(weight=w3(k=K + 1))),
    ("shape.n_equal", dict(x=xs(), weight=[torch.randn(K, N).to(bf16), torch.randn(K, N + 1).to(bf16)], group_list=[3, 6], split_item=2)),
    ("shape.inner_limit", dict(x=[torch.randn(1, 8).to(bf16)], weight=[torch.empty(8, INNER_AXIS_LIMIT, dtype=bf16)], group_type=-1)),
    ("bias.shape", moe(bias=[torch.randn(N)])),
    ("bias.len", dict(x=xs(), weight=[torch.randn(K, N).to(bf16)] * 2, bias=[torch.randn(N)], group_list=[3, 6], split_item=2)),
    ("scale.shape", int8_call(scale=[torch.rand(E, N + 1).to(bf16)])),
    ("per_token_scale.shape", int8_call(per_token_scale=[torch.rand(M + 1)])),
    ("per_token_scale.len", int8_call(per_token_scale=[torch.rand(M), torch.rand(M)])),
]


@pytest.mark.parametrize("rule,kwargs", CASES, ids=[f"{i:02d}-{rule}" for i, (rule, _) in enumerate(CASES)])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_rule_raises_with_its_name(rule, kwargs, backend):
    with pytest.raises(GMMContractError) as info:
        grouped_matmul(backend=backend, **kwargs)
    assert info.value.rule == rule, f"expected [{rule}], got: {info.value}"
    message = str(info.value)
    assert message.startswith(f"[{rule}] ") and len(message) > len(rule) + 20


def test_contract_error_is_a_value_error():
    assert issubclass(GMMContractError, ValueError)


def test_messages_show_offending_values():
    with pytest.raises(GMMContractError, match=r"sum of the counts of group_list is 7 but M \(x's first dim\) is 6"):
        grouped_matmul(**moe(group_list=counts([3, 0, 2, 2])))
    with pytest.raises(GMMContractError, match=r"\[3, 2, 5, 6\]"):
        grouped_matmul(**moe(group_list=counts([3, 2, 5, 6]), group_list_type=0))


def test_unknown_backend_and_device_mismatch():
    with pytest.raises(ValueError, match="unknown grouped_matmul backend 'tpu'"):
        grouped_matmul(backend="tpu", **moe())
    with pytest.raises(ValueError, match="needs tensors on a cuda device"):
        grouped_matmul(backend="cuda", **moe())


def test_env_var_selects_backend(monkeypatch):
    from gmmquant.kernels import select_backend

    monkeypatch.setenv("GMMQUANT_BACKEND", "reference")
    assert select_backend(xs()) == "reference"
    assert select_backend(xs(), "cpu") == "cpu"
    monkeypatch.delenv("GMMQUANT_BACKEND")
    assert select_backend(xs()) == "cpu"


def test_signature_verdicts_are_cached_and_group_list_values_still_checked(monkeypatch):
    """The signature checks run once per signature; group_list's values are checked on every call, and a
    call differing only in a dtype or a stride is checked afresh."""
    from gmmquant.kernels import contract

    monkeypatch.setattr(contract, "_verdicts", {})
    calls = []
    real = contract._check_signature
    monkeypatch.setattr(contract, "_check_signature", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    x = torch.randn(6, 16).to(torch.bfloat16)
    w = torch.randn(3, 16, 8).to(torch.bfloat16)
    kw = dict(group_list_type=1, group_type=0, split_item=2)
    first = grouped_matmul([x], [w], group_list=torch.tensor([2, 0, 4]), backend="reference", **kw)[0]
    second = grouped_matmul([x], [w], group_list=torch.tensor([1, 4, 1]), backend="reference", **kw)[0]
    assert len(calls) == 1
    expect = torch.cat([x[:1].double() @ w[0].double(), x[1:5].double() @ w[1].double(), x[5:].double() @ w[2].double()])
    torch.testing.assert_close(second.double(), expect, rtol=2**-7, atol=1e-2)
    assert not torch.equal(first, second)
    with pytest.raises(GMMContractError, match="group_list"):
        grouped_matmul([x], [w], group_list=torch.tensor([4, 4, 4]), backend="reference", **kw)
    with pytest.raises(GMMContractError, match="dtype"):
        grouped_matmul([x.half()], [w], group_list=torch.tensor([2, 0, 4]), backend="reference", **kw)
    grouped_matmul([x], [w.transpose(1, 2).contiguous().transpose(1, 2)], group_list=torch.tensor([2, 0, 4]), backend="reference", **kw)
    assert len(calls) == 3  # the half x and the transposed weight were new signatures (the first refused, not cached)
    assert len(contract._verdicts) == 2
