"""Kernel API fuzzing: `grouped_matmul` (cpu and reference backends) and int4 pack/unpack against the float64
oracle of tests/gmm_oracle.py, over random shapes, empty expert groups and extreme magnitudes; malformed calls
must fail with GMMContractError naming a rule, never another exception."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gmm_oracle import assert_matches, dequant_stacked, oracle_gmm, unpack_int4_oracle
from gmmquant import GMMContractError, grouped_matmul, pack_int4, unpack_int4
from gmmquant.pack import get_scheme, quantize_weight
from gmmquant.pack.validate import value_problem

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Magnitudes from tiny to large, bounded so that no result overflows float16 (|y| <= 30 * 127 * 0.05 * 64).
X_MAGNITUDES = [1e-3, 1.0, 30.0]
SCALES = [1e-5, 1e-3, 0.05]


@st.composite
def calls(draw):
    experts = draw(st.integers(2, 6))  # (one expert: the spec allows only cumsum group lists; the contract tests cover it)
    counts = draw(st.lists(st.integers(0, 5), min_size=experts, max_size=experts))  # all-empty included
    k = 32 * draw(st.integers(1, 2))
    n = 8 * draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["float", "w8", "w4-channel", "w4-group", "w8a8"]))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    form = draw(st.sampled_from([0, 1]))
    x_mag, scale_mag = draw(st.sampled_from(X_MAGNITUDES)), draw(st.sampled_from(SCALES))
    # float16 results below ~1e-4 are subnormal (a few bits left): tiny x times tiny scales is a bfloat16 case
    assume(dtype == torch.bfloat16 or x_mag * scale_mag >= 1e-6)
    asym, seed = draw(st.booleans()), draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    m = sum(counts)
    group_list = torch.tensor(counts, dtype=torch.int64)
    kw = dict(group_list=group_list.cumsum(0) if form == 0 else group_list, group_list_type=form, group_type=0, split_item=2)
    x = (torch.randn(m, k, generator=g) * x_mag).to(dtype)
    if mode == "float":
        kw.update(x=[x], weight=[(torch.randn(experts, k, n, generator=g) * scale_mag).to(dtype)])
    elif mode == "w8a8":
        kw.update(x=[torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)],
                  weight=[torch.randint(-128, 128, (experts, k, n), generator=g, dtype=torch.int8)],
                  scale=[(torch.rand(experts, n, generator=g) * scale_mag / 128 + 1e-7).to(torch.bfloat16)],
                  per_token_scale=[torch.rand(m, generator=g) * x_mag / 128], output_dtype=torch.bfloat16)
        dtype = torch.bfloat16
    else:
        groups = k // 32 if mode == "w4-group" else None
        shape = (experts, groups, n) if groups else (experts, n)
        s = (torch.rand(*shape, generator=g) * scale_mag + scale_mag / 10).to(dtype)
        o = torch.randint(-8, 8, shape, generator=g).to(dtype) if asym else None
        if mode == "w8":
            w = torch.randint(-128, 128, (experts, k, n), generator=g, dtype=torch.int8)
        else:
            w = pack_int4(torch.randint(-8, 8, (experts, k, n), generator=g, dtype=torch.int8))
        kw.update(x=[x], weight=[w], antiquant_scale=[s], antiquant_offset=None if o is None else [o])
    return kw, dtype


@FUZZ
@given(calls(), st.sampled_from(["cpu", "reference"]))
def test_grouped_matmul_matches_the_float64_oracle(one_thread, call, backend):
    kw, dtype = call
    (out,) = grouped_matmul(backend=backend, **kw)
    oracle_kw = {k: v for k, v in kw.items() if k != "output_dtype"}
    (ref,) = oracle_gmm(**oracle_kw)
    assert bool(torch.isfinite(out.float()).all())
    assert_matches(out, ref, dtype, f"{backend}")


@FUZZ
@given(st.integers(0, 3), st.integers(1, 5), st.integers(0, 2**31 - 1), st.booleans())
def test_int4_pack_unpack_round_trip(batch, words, seed, extremes):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, words * 8)
    values = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    if extremes and values.numel():
        values.view(-1)[::2] = -8
        values.view(-1)[1::2] = 7
    packed = pack_int4(values)
    assert packed.dtype == torch.int32 and packed.shape == (batch, words)
    assert torch.equal(unpack_int4(packed), values)
    assert torch.equal(unpack_int4_oracle(packed), values.to(torch.int64))


@FUZZ
@given(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=16))
def test_unpack_any_word_matches_the_oracle(words):
    packed = torch.tensor(words, dtype=torch.int32)
    assert torch.equal(unpack_int4(packed).to(torch.int64), unpack_int4_oracle(packed))


@FUZZ
@given(st.sampled_from(["w8a16", "w4a16", "w4a16-g32"]), st.booleans(), st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e4]),
       st.sampled_from([torch.bfloat16, torch.float16]), st.integers(0, 2**31 - 1))
def test_quantize_extreme_weights_stays_within_half_a_step(scheme_name, symmetric, magnitude, act, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, 64, 16, generator=g) * magnitude
    w[:, :, 0] = magnitude  # a constant column
    w[1] = 0.0  # an all-zero expert
    qw = quantize_weight(w, get_scheme(scheme_name, symmetric=symmetric), act)
    assert value_problem("x.antiquant_scale", qw.scale) is None  # finite and positive, whatever the input
    step = qw.scale.double()
    step = step.repeat_interleave(64 // step.shape[1], dim=1) if step.dim() == 3 else step.unsqueeze(1)
    err = (dequant_stacked(qw) - w.double()).abs()
    assert bool((err <= step / 2 * (1 + 2**-7) + 1e-12).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_quantize_refuses_non_finite_weights(bad):
    w = torch.randn(1, 32, 8)
    w[0, 3, 4] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_weight(w, get_scheme("w8a16"), torch.bfloat16)


def test_quantize_refuses_scales_that_overflow_float16():
    with pytest.raises(ValueError, match="overflows torch.float16"):
        quantize_weight(torch.full((1, 32, 8), 1e8), get_scheme("w8a16"), torch.float16)


def _valid_call(g):
    x = torch.randn(6, 32, generator=g).to(torch.bfloat16)
    w = torch.randint(-128, 128, (3, 32, 16), generator=g, dtype=torch.int8)
    s = torch.rand(3, 16, generator=g).to(torch.bfloat16) + 0.01
    return dict(x=[x], weight=[w], antiquant_scale=[s], group_list=torch.tensor([2, 0, 4]), group_list_type=1,
                group_type=0, split_item=2)


MUTATIONS = {
    "x dtype": lambda kw: kw.update(x=[kw["x"][0].double()]),
    "x inner dim": lambda kw: kw.update(x=[kw["x"][0][:, :31].contiguous()]),
    "weight dtype": lambda kw: kw.update(weight=[kw["weight"][0].to(torch.int16)]),
    "scale dtype": lambda kw: kw.update(antiquant_scale=[kw["antiquant_scale"][0].float()]),
    "scale shape": lambda kw: kw.update(antiquant_scale=[kw["antiquant_scale"][0][:, :8].contiguous()]),
    "group_list sum": lambda kw: kw.update(group_list=torch.tensor([2, 0, 5])),
    "group_list negative": lambda kw: kw.update(group_list=torch.tensor([7, -1, 0])),
    "group_list dtype": lambda kw: kw.update(group_list=torch.tensor([2.0, 0.0, 4.0])),
    "group_list length": lambda kw: kw.update(group_list=torch.tensor([2, 4])),
    "group_list_type": lambda kw: kw.update(group_list_type=7),
    "split_item": lambda kw: kw.update(split_item=9),
    "act_type": lambda kw: kw.update(act_type=3),
    "offset shape": lambda kw: kw.update(antiquant_offset=[torch.zeros(3, 8, dtype=torch.bfloat16)]),
    "weight rank": lambda kw: kw.update(weight=[kw["weight"][0][0]]),
    "nothing": lambda kw: kw.update(x=[], weight=[]),
}


@FUZZ
@given(st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=3, unique=True), st.integers(0, 2**31 - 1),
       st.sampled_from(["cpu", "reference"]))
def test_malformed_calls_fail_with_a_contract_error(mutations, seed, backend):
    kw = _valid_call(torch.Generator().manual_seed(seed))
    for name in sorted(mutations, key=lambda n: n == "nothing"):  # emptying the lists last: the others index them
        MUTATIONS[name](kw)
    with pytest.raises(GMMContractError) as info:
        grouped_matmul(backend=backend, **kw)
    assert str(info.value)  # names the rule it breaks
