"""int4 packing, dynamic_quant and the int64 scale encoding, against independent float64 / bit-level oracles."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gmm_oracle import decode_scale_oracle, unpack_int4_oracle
from gmmquant.kernels import (
    GMMContractError,
    antiquant_dequantize,
    decode_quant_param,
    dynamic_quant,
    pack_int4,
    trans_quant_param,
    unpack_int4,
)


# ---------------------------------------------------------------------------------------------- int4

def test_pack_int4_bit_layout():
    # value j of a word sits at bits 4j..4j+3, low nibble first, two's complement
    words = pack_int4(torch.tensor([[1, 2, 3, 4, 5, 6, 7, -8], [-1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.int8))
    assert words.dtype == torch.int32 and words.shape == (2, 1)
    assert words[0, 0].item() & 0xFFFFFFFF == 0x87654321
    assert words[1, 0].item() == 0xF


@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(rows, words, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-8, 8, (rows, words * 8), generator=g, dtype=torch.int8)
    packed = pack_int4(values)
    assert packed.shape == (rows, words)
    assert torch.equal(unpack_int4(packed), values)
    assert torch.equal(unpack_int4_oracle(packed), values.to(torch.int64))


@pytest.mark.parametrize(
    "values,rule",
    [
        (torch.zeros(3, 12, dtype=torch.int8), "int4.last_dim"),
        (torch.full((8,), 8, dtype=torch.int8), "int4.range"),
        (torch.full((8,), -9, dtype=torch.int32), "int4.range"),
        (torch.zeros(8), "int4.dtype"),
    ],
)
def test_pack_int4_rejects(values, rule):
    with pytest.raises(GMMContractError) as info:
        pack_int4(values)
    assert info.value.rule == rule


def test_unpack_int4_rejects_non_int32():
    with pytest.raises(GMMContractError, match="int4.dtype"):
        unpack_int4(torch.zeros(2, dtype=torch.int64))


def test_antiquant_offset_is_added():
    q = torch.tensor([[2, -3]], dtype=torch.int8)  # [K=1, N=2]
    scale = torch.tensor([0.5, 2.0])
    offset = torch.tensor([1.0, -1.0])
    w = antiquant_dequantize(q, scale, offset)
    assert torch.equal(w, torch.tensor([[(2 + 1) * 0.5, (-3 - 1) * 2.0]]))


# ------------------------------------------------------------------------------------- dynamic quant

def dynamic_quant_oracle(x, smooth=None, group_ends=None, dmax=127):
    xs = x.to(torch.float64).reshape(-1, x.shape[-1])
    if smooth is not None:
        if group_ends is None:
            xs = xs * smooth.to(torch.float64)
        else:
            rows = []
            start = 0
            for i, end in enumerate(group_ends):
                rows.append(xs[start:end] * smooth[i].to(torch.float64))
                start = end
            xs = torch.cat(rows)
    amax = xs.abs().amax(-1)
    q = torch.round(xs / (amax / dmax).unsqueeze(-1))
    return q, amax / dmax


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("smooth", ["none", "vector", "grouped"])
def test_dynamic_quant_matches_oracle(dtype, smooth):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 5, 64, generator=g) * 3).to(dtype)
    sm, gi, ends = None, None, None
    if smooth == "vector":
        sm = (torch.rand(64, generator=g) + 0.5).to(dtype)
    elif smooth == "grouped":
        sm = (torch.rand(3, 64, generator=g) + 0.5).to(dtype)
        ends = [4, 4, 10]
        gi = torch.tensor(ends, dtype=torch.int32)
    y, scale = dynamic_quant(x, smooth_scales=sm, group_index=gi)
    assert y.dtype == torch.int8 and y.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    q_ref, s_ref = dynamic_quant_oracle(x, sm, ends)
    torch.testing.assert_close(scale.reshape(-1).double(), s_ref, rtol=1e-6, atol=0)
    # float32 vs float64 may land on the other side of a .5 boundary: at most one step apart
    assert int((y.reshape(-1, 64).to(torch.int64) - q_ref.to(torch.int64)).abs().max()) <= 1
    assert int(y.abs().max()) == 127
    # dequantized values are within half a step of the (smoothed) input
    xs = x.double().reshape(-1, 64) * (1 if sm is None or smooth == "grouped" else sm.double())
    if smooth != "grouped":
        err = (y.reshape(-1, 64).double() * scale.reshape(-1, 1).double() - xs).abs()
        assert bool((err <= scale.reshape(-1, 1).double() * 0.5 + 1e-6).all())


def test_dynamic_quant_int4_packs_and_zero_rows():
    x = torch.randn(3, 32).to(torch.bfloat16)
    x[1] = 0
    y, scale = dynamic_quant(x, dst_type=torch.quint4x2)
    assert y.dtype == torch.int32 and y.shape == (3, 4)
    q = unpack_int4(y)
    assert int(q.abs().max()) == 7
    assert scale[1].item() == 0 and bool((q[1] == 0).all())
    q_ref, _ = dynamic_quant_oracle(x[[0, 2]], dmax=7)
    assert int((q[[0, 2]].to(torch.int64) - q_ref.to(torch.int64)).abs().max()) <= 1


@pytest.mark.parametrize(
    "kwargs,rule",
    [
        (dict(x=torch.randn(4, 8)), "dynamic_quant.dtype"),
        (dict(x=torch.randn(8).half()), "dynamic_quant.rank"),
        (dict(x=torch.randn(2, 8).half(), dst_type=torch.int32), "dynamic_quant.dst_type"),
        (dict(x=torch.randn(2, 12).half(), dst_type=torch.quint4x2), "dynamic_quant.int4_last_dim"),
        (dict(x=torch.randn(2, 8).half(), smooth_scales=torch.rand(8)), "dynamic_quant.smooth_dtype"),
        (dict(x=torch.randn(2, 8).half(), smooth_scales=torch.rand(7).half()), "dynamic_quant.smooth_shape"),
        (dict(x=torch.randn(2, 8).half(), group_index=torch.tensor([2], dtype=torch.int32)), "dynamic_quant.group_index"),
        (dict(x=torch.randn(2, 8).half(), smooth_scales=torch.rand(1, 8).half(), group_index=torch.tensor([2])), "dynamic_quant.group_index"),
        (dict(x=torch.randn(2, 8).half(), smooth_scales=torch.rand(2, 8).half(), group_index=torch.tensor([2, 1], dtype=torch.int32)), "dynamic_quant.group_index"),
    ],
)
def test_dynamic_quant_rejects(kwargs, rule):
    with pytest.raises(GMMContractError) as info:
        dynamic_quant(**kwargs)
    assert info.value.rule == rule


# --------------------------------------------------------------------------------- scale encoding

def f32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def test_trans_quant_param_bits():
    enc = trans_quant_param(torch.tensor([1.0, -0.5]))
    assert enc.dtype == torch.int64
    assert enc.tolist() == [0x3F800000 | 1 << 46, 0xBF000000 | 1 << 46]


def test_trans_quant_param_truncates_and_rounds_to_fp19():
    v = struct.unpack("<f", struct.pack("<I", 0x3F801FFF))[0]  # 1.0 plus 13 low mantissa bits
    assert trans_quant_param(torch.tensor([v])).item() == 0x3F800000 | 1 << 46
    assert trans_quant_param(torch.tensor([v]), round_mode=1).item() == 0x3F802000 | 1 << 46
    tie_even = struct.unpack("<f", struct.pack("<I", 0x3F801000))[0]  # exactly half way, even: stays
    tie_odd = struct.unpack("<f", struct.pack("<I", 0x3F803000))[0]  # half way, odd: rounds up
    assert trans_quant_param(torch.tensor([tie_even]), round_mode=1).item() == 0x3F800000 | 1 << 46
    assert trans_quant_param(torch.tensor([tie_odd]), round_mode=1).item() == 0x3F804000 | 1 << 46


def test_trans_quant_param_offset_bits_and_decode():
    scale = torch.tensor([0.25, 3.0, 1e-3])
    offset = torch.tensor([-3.0, 300.0, 7.4])
    enc = trans_quant_param(scale, offset)
    assert (enc[0].item() >> 37) & 0x1FF == (-3) & 0x1FF
    assert (enc[1].item() >> 37) & 0x1FF == 255  # clamped to [-256, 255]
    s, o = decode_quant_param(enc)
    s_ref, o_ref = decode_scale_oracle(enc)
    assert torch.equal(s.double(), s_ref) and torch.equal(o.double(), o_ref)
    assert o.tolist() == [-3.0, 255.0, 7.0]
    assert s[0].item() == 0.25 and s[1].item() == 3.0
    assert abs(s[2].item() - 1e-3) / 1e-3 < 2**-10  # FP19 keeps 10 mantissa bits
    assert decode_quant_param(trans_quant_param(scale))[1] is None


@pytest.mark.parametrize(
    "kwargs,rule",
    [
        (dict(scale=torch.ones(4, dtype=torch.float64)), "trans_quant_param.dtype"),
        (dict(scale=torch.ones(2, 4)), "trans_quant_param.shape"),
        (dict(scale=torch.ones(4), round_mode=2), "trans_quant_param.round_mode"),
    ],
)
def test_trans_quant_param_rejects(kwargs, rule):
    with pytest.raises(GMMContractError) as info:
        trans_quant_param(**kwargs)
    assert info.value.rule == rule
