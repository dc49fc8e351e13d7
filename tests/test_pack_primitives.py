"""Quantization primitives and schemes: error bounds, the offset sign, and GMM on the packed tensors."""

from __future__ import annotations

import pytest
import torch

from gmm_oracle import TOLERANCES, dequant_stacked, unpack_int4_oracle
from gmmquant.kernels import dynamic_quant, grouped_matmul
from gmmquant.pack import (
    PRESETS,
    QuantScheme,
    SchemeError,
    antiquant_offset,
    choose_qparams,
    error_bound,
    get_scheme,
    quant_range,
    quantize,
    quantize_weight,
)

E, K, N = 3, 256, 48
COUNTS = [4, 0, 5]


def weights(kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(E, K, N, generator=g) * 0.05
    if kind == "outlier-columns":
        w[:, :, [3, 17]] *= 40
    elif kind == "constant-rows":  # an output channel with the same value along K
        w[:, :, 5] = 0.3
        w[:, :, 6] = -0.2
    elif kind == "all-negative":
        w[:, :, 7:20] = -w[:, :, 7:20].abs() - 0.01
    elif kind == "zero-channel":
        w[:, :, 9] = 0
    return w




@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["random", "outlier-columns", "constant-rows", "all-negative", "zero-channel"])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dequantized_within_half_a_step(name, kind, act_dtype):
    w = weights(kind)
    qw = quantize_weight(w, get_scheme(name), act_dtype)
    err = (dequant_stacked(qw) - w.double()).abs()
    bound = error_bound(qw).double()
    assert bool((err <= bound * (1 + 1e-6) + 1e-12).all()), f"max excess {float((err - bound).max()):.3e}"
    assert torch.equal(qw.dequantize().double(), dequant_stacked(qw).float().double())
    if kind == "constant-rows" and not get_scheme(name).symmetric:
        # an asymmetric grid with 0 and the constant inside it represents the constant to half a step
        assert float((dequant_stacked(qw)[:, :, 5] - 0.3).abs().max()) <= float(bound[:, :, 5].max())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_packed_tensors_have_the_gmm_layout(name):
    s = get_scheme(name)
    qw = quantize_weight(weights("random"), s, torch.bfloat16)
    if s.weight_bits == 4:
        assert qw.qweight.dtype == torch.int32 and qw.qweight.shape == (E, K, N // 8)
    else:
        assert qw.qweight.dtype == torch.int8 and qw.qweight.shape == (E, K, N)
    want = (E, K // s.group_size, N) if s.group_size else (E, N)
    assert qw.scale.shape == want
    assert qw.scale.dtype == (torch.float32 if s.a8w4 else torch.bfloat16)  # W4A8: float32, int64-encoded per call
    assert (qw.offset is None) == s.symmetric
    if qw.offset is not None:
        assert qw.offset.shape == want and qw.offset.dtype == torch.bfloat16


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_grouped_matmul_on_packed_equals_x_times_dequantized(name, act_dtype, backend):
    """The proof that packing and the kernel agree: GMM(packed) == x @ dequantized weight (float64)."""
    s = get_scheme(name)
    qw = quantize_weight(weights("outlier-columns", seed=1), s, act_dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(sum(COUNTS), K, generator=g).to(act_dtype)
    common = dict(group_list=torch.tensor(COUNTS), group_list_type=1, group_type=0, split_item=2, backend=backend)
    w64 = dequant_stacked(qw)
    if s.weight_only:
        (y,) = grouped_matmul([x], [qw.qweight], **qw.gmm_kwargs(), **common)
        x64 = x.double()
    else:
        xq, pts = dynamic_quant(x)
        out = torch.bfloat16 if act_dtype == torch.bfloat16 else torch.float16
        (y,) = grouped_matmul([xq], [qw.qweight], per_token_scale=[pts], output_dtype=out, **qw.gmm_kwargs(), **common)
        x64 = xq.double() * pts.double().unsqueeze(-1)
    ref = torch.cat([x64[a:b] @ w64[e] for e, (a, b) in enumerate(zip([0, 4, 4], [4, 4, 9]))])
    rtol, atol = TOLERANCES[act_dtype]
    scale = float(ref.abs().max())
    assert bool(((y.double() - ref).abs() <= rtol * ref.abs() + atol * scale).all())


def test_offset_sign_is_minus_zero_point():
    zp = torch.tensor([3, -2], dtype=torch.int32)
    assert antiquant_offset(zp, torch.float32).tolist() == [-3.0, 2.0]
    w = torch.randn(1, 256, 8, generator=torch.Generator().manual_seed(4)) + 0.5  # skewed: zero points != 0
    qw = quantize_weight(w, get_scheme("w4a16"), torch.float16)
    assert bool((qw.offset != 0).any())
    # with an asymmetric grid, w = (q + offset) * scale = (q - zp) * scale
    q = unpack_int4_oracle(qw.qweight).double()
    assert torch.allclose((q + qw.offset.double().unsqueeze(1)) * qw.scale.double().unsqueeze(1), qw.dequantize().double())


def test_choose_qparams_and_ranges():
    assert quant_range(8, True) == (-127, 127) and quant_range(8, False) == (-128, 127)
    assert quant_range(4, True) == (-7, 7) and quant_range(4, False) == (-8, 7)
    scale, zp = choose_qparams(torch.tensor([-1.0, 0.0, 0.5]), torch.tensor([3.0, 0.0, 2.0]), 4, False)
    assert torch.allclose(scale, torch.tensor([4 / 15, 1.0, 2 / 15]))
    assert zp.tolist() == [-8 + 4, -8, -8]  # 0 maps to an integer code; an empty range gets scale 1
    scale, zp = choose_qparams(torch.tensor([-2.0]), torch.tensor([1.0]), 8, True)
    assert zp is None and torch.allclose(scale, torch.tensor([2 / 127]))


def test_clip_range_is_respected():
    w = weights("outlier-columns")
    full = quantize_weight(w, get_scheme("w8a16"), torch.bfloat16)
    lo, hi = w.amin(dim=1) * 0.5, w.amax(dim=1) * 0.5
    clipped = quantize_weight(w, get_scheme("w8a16"), torch.bfloat16, clip_min=lo, clip_max=hi)
    assert bool((clipped.scale.float() < full.scale.float()).all())
    dq = clipped.dequantize()
    inside = (w >= lo.unsqueeze(1)) & (w <= hi.unsqueeze(1))
    assert bool(((dq - w).abs()[inside] <= error_bound(clipped)[inside] * (1 + 1e-6)).all())


def test_quantize_saturates():
    q = quantize(torch.full((1, 4, 2), 1000.0), torch.ones(1, 2), None, 8)
    assert q.dtype == torch.int8 and int(q.max()) == 127


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="x", weight_bits=8, group_size=128), "int8 weight-only supports per-channel only"),
        (dict(name="x", weight_bits=3), "weight_bits must be 4 or 8"),
        (dict(name="x", weight_bits=4, group_size=48), "group_size must be None"),
        (dict(name="x", weight_bits=4, activation="static"), "A8W4\\) take per-token dynamic activations only"),
        (dict(name="x", weight_bits=4, activation="dynamic", symmetric=False), "must be symmetric"),
        (dict(name="x", weight_bits=8, activation="dynamic", symmetric=False), "must be symmetric"),
        (dict(name="x", weight_bits=8, activation="static", group_size=32), "per-channel only"),
        (dict(name="x", weight_bits=8, activation="sometimes"), "activation must be one of"),
    ],
)
def test_invalid_schemes_are_refused(kwargs, match):
    with pytest.raises(SchemeError, match=match):
        QuantScheme(**kwargs)


def test_shape_rules_refused_at_quantization_time():
    with pytest.raises(SchemeError, match="group_size 128 does not divide K=192"):
        quantize_weight(torch.randn(2, 192, 16), get_scheme("w4a16-g128"), torch.bfloat16)
    with pytest.raises(SchemeError, match="N=12 must be a multiple of 8"):
        quantize_weight(torch.randn(2, 64, 12), get_scheme("w4a16"), torch.bfloat16)
    with pytest.raises(ValueError, match="act_dtype must be bfloat16 or float16"):
        quantize_weight(torch.randn(2, 64, 16), get_scheme("w8a16"), torch.float32)
    with pytest.raises(ValueError, match=r"stacked \[E, K, N\]"):
        quantize_weight(torch.randn(64, 16), get_scheme("w8a16"), torch.bfloat16)


def test_scheme_presets_and_dict_round_trip():
    assert get_scheme("w4a16-g128").group_size == 128
    assert get_scheme("w4a16-g128", symmetric=True).symmetric
    for s in PRESETS.values():
        assert QuantScheme.from_dict(s.to_dict()) == s
    with pytest.raises(SchemeError, match="unknown scheme 'w3a16'"):
        get_scheme("w3a16")
    with pytest.raises(SchemeError, match=r"unknown scheme keys \['bits'\]"):
        QuantScheme.from_dict({"name": "x", "weight_bits": 8, "bits": 8})
