"""Property tests: over random group splits, shapes, group_list forms and modes, cpu == reference."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmm_oracle import TOLERANCES
from gmmquant.kernels import grouped_matmul, pack_int4

settings.register_profile("gmm", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("gmm")


@st.composite
def moe_calls(draw):
    experts = draw(st.integers(2, 9))
    counts = draw(st.lists(st.integers(0, 6), min_size=experts, max_size=experts))
    k = 32 * draw(st.integers(1, 4))
    n = 16 * draw(st.integers(1, 4))
    mode = draw(st.sampled_from(["float", "w8", "w4-channel", "w4-group", "w8a8"]))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    form = draw(st.sampled_from([0, 1, 2] if mode == "w8a8" else [0, 1]))
    seed = draw(st.integers(0, 2**31 - 1))
    asym = draw(st.booleans())
    return experts, counts, k, n, mode, dtype, form, seed, asym


def build(experts, counts, k, n, mode, dtype, form, seed, asym):
    g = torch.Generator().manual_seed(seed)
    m = sum(counts)
    if form == 2:
        group_list = torch.tensor([[e, c] for e, c in enumerate(counts) if c] + [[0, 0]], dtype=torch.int64)
    elif form == 1:
        group_list = torch.tensor(counts, dtype=torch.int64)
    else:
        group_list = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    kw = dict(group_list=group_list, group_list_type=form, group_type=0, split_item=2)
    x = torch.randn(m, k, generator=g).to(dtype)
    if mode == "float":
        kw.update(x=[x], weight=[(torch.randn(experts, k, n, generator=g) / k**0.5).to(dtype)])
    elif mode == "w8a8":
        kw.update(x=[torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)],
                  weight=[torch.randint(-127, 128, (experts, k, n), generator=g, dtype=torch.int8)],
                  scale=[(torch.rand(experts, n, generator=g) / (127 * k)).to(torch.bfloat16)],
                  per_token_scale=[torch.rand(m, generator=g) / 127], output_dtype=torch.bfloat16)
        dtype = torch.bfloat16
    else:
        groups = k // 32 if mode == "w4-group" else None
        shape = (experts, groups, n) if groups else (experts, n)
        s = (torch.rand(*shape, generator=g) * 0.02 + 1e-3).to(dtype)
        o = torch.randn(*shape, generator=g).to(dtype) if asym else None
        if mode == "w8":
            w = torch.randint(-127, 128, (experts, k, n), generator=g, dtype=torch.int8)
        else:
            w = pack_int4(torch.randint(-8, 8, (experts, k, n), generator=g, dtype=torch.int8))
        kw.update(x=[x], weight=[w], antiquant_scale=[s], antiquant_offset=None if o is None else [o])
    return kw, dtype


@given(moe_calls())
def test_cpu_equals_reference(call):
    kw, dtype = build(*call)
    (fast,) = grouped_matmul(backend="cpu", **kw)
    (ref,) = grouped_matmul(backend="reference", **kw)
    assert fast.shape == ref.shape and fast.dtype == ref.dtype == dtype
    if ref.numel() == 0:
        return
    rtol, atol = TOLERANCES[dtype]
    scale = float(ref.double().abs().max()) or 1.0
    err = (fast.double() - ref.double()).abs()
    # Both results are rounded to the output dtype, so allow the tolerance from each side.
    assert bool((err <= 2 * (rtol * ref.double().abs() + atol * scale)).all()), float(err.max())
