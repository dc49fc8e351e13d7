"""The A8W4 mode's contract rules (docs/KERNELS.md "A8W4"): each has a negative test; the NPU gets the call as is."""

from __future__ import annotations

import pytest
import torch

from gmmquant.kernels import GMMContractError, a8w4_scale_bias, grouped_matmul, pack_int4, trans_quant_param
from test_npu_backend import fake_torch_npu, on_npu  # noqa: F401 - fixture

E, K, N, M = 4, 256, 32, 10


def a8w4_kwargs(groups=None, **over):
    q = torch.randint(-8, 8, (E, K, N), dtype=torch.int8)
    shape = (E, N) if groups is None else (E, groups, N)
    scale = trans_quant_param((torch.rand(shape) * 0.01).reshape(-1)).reshape(shape)
    kw = dict(x=[torch.randint(-128, 128, (M, K), dtype=torch.int8)], weight=[pack_int4(q)], scale=[scale],
              bias=[a8w4_scale_bias(q, scale)], per_token_scale=[torch.rand(M)], group_list=torch.tensor([3, 0, 4, 3]),
              split_item=3, group_type=0, group_list_type=1, output_dtype=torch.bfloat16)
    kw.update(over)
    return kw


@pytest.mark.parametrize("groups", [None, 1, 2, 8])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_legal_calls_run(groups, backend):
    y = grouped_matmul(backend=backend, **a8w4_kwargs(groups))[0]
    assert y.shape == (M, N) and y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_bias_and_per_token_scale_are_optional():
    kw = a8w4_kwargs(bias=None, per_token_scale=None)
    ref = grouped_matmul(backend="reference", **kw)[0]
    assert torch.equal(grouped_matmul(backend="cpu", **kw)[0], ref)


def test_list_of_weights_single_x():
    kw = a8w4_kwargs()
    w = kw["weight"][0]
    kw.update(weight=list(w.unbind(0)), scale=list(kw["scale"][0].unbind(0)), bias=list(kw["bias"][0].unbind(0)), split_item=2)
    single = grouped_matmul(backend="reference", **a8w4_kwargs() | {"x": kw["x"], "per_token_scale": kw["per_token_scale"],
                            "weight": [w], "scale": [torch.stack(kw["scale"])], "bias": [torch.stack(kw["bias"])]})[0]
    assert torch.equal(grouped_matmul(backend="cpu", **kw)[0], single)


BAD = {
    "a8w4.tensor_api": dict(weight=[torch.zeros(K, N // 8, dtype=torch.int32)] * 4, scale=[torch.zeros(N, dtype=torch.int64)] * 4,
                            bias=None, group_list=[3, 3, 7, 10], group_type=None, group_list_type=0, per_token_scale=None),
    "a8w4.group_type": dict(x=[torch.zeros(3, K, dtype=torch.int8)] * 2, weight=[torch.zeros(K, N // 8, dtype=torch.int32)] * 2,
                            scale=[torch.zeros(N, dtype=torch.int64)] * 2, bias=None, per_token_scale=None,
                            group_type=-1, group_list=None, split_item=0),
    "a8w4.group_list_type": dict(group_list=torch.tensor([3, 3, 7, 10]), group_list_type=0),
    "scale.required": dict(scale=None),
    "scale.dtype": dict(scale=[torch.rand(E, N)]),
    "scale.shape": dict(scale=[torch.zeros(E, N + 8, dtype=torch.int64)]),
    "scale.a8w4_group_divides_k": dict(scale=[torch.zeros(E, 3, N, dtype=torch.int64)]),
    "bias.dtype": dict(bias=[torch.zeros(E, N, dtype=torch.int32)]),
    "per_token_scale.dtype": dict(per_token_scale=[torch.rand(M).half()]),
    "per_token_scale.shape": dict(per_token_scale=[torch.rand(M, 1)]),
    "output_dtype.table": dict(output_dtype=None),
    "antiquant_scale.must_be_none": dict(antiquant_scale=[torch.rand(E, N).bfloat16()]),
    "act_type.per_token_only": dict(act_type=5),
    "group_list.total": dict(group_list=torch.tensor([1, 1, 1, 1])),
}


@pytest.mark.parametrize("rule", sorted(BAD))
def test_each_rule_is_enforced(rule):
    kw = a8w4_kwargs(**BAD[rule])
    with pytest.raises(GMMContractError, match=rf"\[{rule}\]"):
        grouped_matmul(**kw)


def test_int8_output_is_refused():
    with pytest.raises(GMMContractError, match=r"\[output_dtype.table\]"):
        grouped_matmul(**a8w4_kwargs(output_dtype=torch.int8))


def test_npu_gets_the_call_unchanged(fake_torch_npu):
    kw = {k: ([on_npu(t) for t in v] if isinstance(v, list) else on_npu(v) if isinstance(v, torch.Tensor) else v)
          for k, v in a8w4_kwargs(groups=2).items()}
    assert grouped_matmul(**kw) == ["npu-result"]
    ((name, args, got),) = fake_torch_npu
    assert name == "npu_grouped_matmul" and args[1] is kw["weight"]
    for key in ("scale", "bias", "per_token_scale", "group_list"):
        assert got[key] is kw[key], key
    assert got["group_list_type"] == 1 and got["output_dtype"] is torch.bfloat16


def test_scale_bias_matches_the_vllm_ascend_formula():
    """8 * (w * s).sum over K, per channel and per group."""
    q = torch.randint(-8, 8, (E, K, N), dtype=torch.int8)
    s = torch.rand(E, 4, N)
    expect = 8 * (q.double() * s.double().repeat_interleave(K // 4, dim=1)).sum(dim=1)
    got = a8w4_scale_bias(pack_int4(q), s)
    assert torch.allclose(got.double(), expect, rtol=1e-6, atol=1e-4)
    got_pc = a8w4_scale_bias(q, s[:, 0])
    assert torch.allclose(got_pc.double(), 8 * (q.double() * s[:, :1].double()).sum(dim=1), rtol=1e-6, atol=1e-4)
