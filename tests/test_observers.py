"""Observers: the MSE clip search against plain min/max, shapes and dtypes, and what quantize_weight takes."""

from __future__ import annotations

import pytest
import torch

from gmmquant.calibrate import observers
from gmmquant.calibrate.observers import OBSERVERS, get_observer, mse_clip_range
from gmmquant.pack import choose_qparams, get_scheme, minmax, quantize_weight
from gmmquant.pack.primitives import stored_qparams, stored_scale_dtype

E, K, N = 2, 128, 32
NORM = 2.4

SCHEMES = [
    get_scheme("w8a16"),
    get_scheme("w4a16"),  # per-channel asym
    get_scheme("w4a16", symmetric=True),
    get_scheme("w4a16-g32"),  # per-group asym
    get_scheme("w4a16-g32", symmetric=True),
    get_scheme("w8a8-dynamic"),
]
IDS = ["w8a16", "w4a16", "w4a16-sym", "w4a16-g32", "w4a16-g32-sym", "w8a8-dynamic"]


pytestmark = pytest.mark.usefixtures("one_thread")

def weights(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(E, K, N, generator=g) * 0.05
    w[:, :, 3] = w[:, :, 3].abs() + 0.01  # an all-positive and an all-negative channel: the range holds 0
    w[:, :, 4] = -w[:, :, 4].abs() - 0.01
    return w


def perr(w: torch.Tensor, qw, group_size) -> torch.Tensor:
    """float64 sum |w - dequant|^NORM per channel `[E, N]` or group `[E, K/g, N]`."""
    d = (w.double() - qw.dequantize(torch.float64)).abs() ** NORM
    if group_size is None:
        return d.sum(dim=1)
    return d.reshape(E, K // group_size, group_size, N).sum(dim=2)


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_mse_never_worse_than_minmax_and_shapes(scheme, act_dtype):
    w = weights()
    lo, hi = mse_clip_range(w, scheme, act_dtype)
    shape = (E, N) if scheme.group_size is None else (E, K // scheme.group_size, N)
    assert lo.shape == shape and hi.shape == shape
    assert lo.dtype == torch.float32 and hi.dtype == torch.float32
    wmin, wmax = minmax(w, scheme.group_size)
    # the clip range is a shrunk min/max range: same signs, never wider
    assert (lo <= 0).all() and (hi >= 0).all()
    assert (lo >= wmin.clamp(max=0)).all() and (hi <= wmax.clamp(min=0)).all()

    qw_mse = quantize_weight(w, scheme, act_dtype, clip_min=lo, clip_max=hi)
    qw_mm = quantize_weight(w, scheme, act_dtype)
    stored = act_dtype if scheme.weight_only else (torch.bfloat16 if act_dtype == torch.bfloat16 else torch.float32)
    assert qw_mse.scale.dtype == stored and qw_mse.scale.shape == shape
    assert (qw_mse.offset is None) == scheme.symmetric
    e_mse, e_mm = perr(w, qw_mse, scheme.group_size), perr(w, qw_mm, scheme.group_size)
    # per channel / group; the search ran in float32, this check in float64: allow 1e-5 relative
    assert (e_mse <= e_mm * (1 + 1e-5)).all()
    assert e_mse.sum() <= e_mm.sum()


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.weight_bits == 4], ids=[i for i, s in zip(IDS, SCHEMES) if s.weight_bits == 4])
def test_mse_clips_an_outlier(scheme):
    # A moderate outlier (10 x the channel's max) in 4-bit: clipping it costs less than the rounding
    # error a full-range step causes on the other rows. (An extreme outlier, or 8-bit steps, make clipping
    # not pay off, and then the search rightly keeps min/max.)
    w = weights(1)
    w[0, 7, 5] = w[0, :, 5].abs().max() * 10
    w[1, 70, 9] = -w[1, :, 9].abs().max() * 10
    lo, hi = mse_clip_range(w, scheme, torch.bfloat16)
    wmin, wmax = minmax(w, scheme.group_size)
    if scheme.group_size is None:
        assert hi[0, 5] < wmax[0, 5]
        assert lo[1, 9] > wmin[1, 9]
    else:
        g = scheme.group_size
        assert hi[0, 7 // g, 5] < wmax[0, 7 // g, 5]
        assert lo[1, 70 // g, 9] > wmin[1, 70 // g, 9]
    e_mse = perr(w, quantize_weight(w, scheme, torch.bfloat16, clip_min=lo, clip_max=hi), scheme.group_size)
    e_mm = perr(w, quantize_weight(w, scheme, torch.bfloat16), scheme.group_size)
    assert e_mse.sum() < e_mm.sum()


def test_mse_chunks_over_experts_give_the_same_result(monkeypatch):
    scheme = get_scheme("w4a16-g32")
    w = weights(2)
    lo, hi = mse_clip_range(w, scheme, torch.bfloat16, grid=20)
    monkeypatch.setattr(observers, "_CHUNK_ELEMENTS", 1)  # one expert per chunk
    lo1, hi1 = mse_clip_range(w, scheme, torch.bfloat16, grid=20)
    assert torch.equal(lo, lo1) and torch.equal(hi, hi1)


def test_all_zero_channel_and_max_shrink_zero():
    scheme = get_scheme("w4a16")
    w = weights(3)
    w[:, :, 6] = 0
    lo, hi = mse_clip_range(w, scheme, torch.bfloat16)
    assert (lo[:, 6] == 0).all() and (hi[:, 6] == 0).all()
    qw = quantize_weight(w, scheme, torch.bfloat16, clip_min=lo, clip_max=hi)
    assert (qw.dequantize()[:, :, 6] == 0).all()
    # max_shrink=0: only the min/max candidate
    lo0, hi0 = mse_clip_range(w, scheme, torch.bfloat16, max_shrink=0.0, grid=3)
    wmin, wmax = minmax(w)
    assert torch.equal(lo0, wmin.clamp(max=0)) and torch.equal(hi0, wmax.clamp(min=0))


def test_registry_and_errors():
    assert set(OBSERVERS) == {"minmax", "mse"}
    w = weights()
    assert get_observer("minmax")(w, get_scheme("w8a16"), torch.bfloat16) == (None, None)
    lo, _ = get_observer("mse")(w, get_scheme("w8a16"), torch.bfloat16)
    assert lo.shape == (E, N)
    with pytest.raises(ValueError, match="unknown observer"):
        get_observer("percentile")
    with pytest.raises(ValueError, match=r"\[E, K, N\]"):
        mse_clip_range(w[0], get_scheme("w8a16"), torch.bfloat16)
    with pytest.raises(ValueError, match="max_shrink"):
        mse_clip_range(w, get_scheme("w8a16"), torch.bfloat16, max_shrink=1.0)


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_stored_qparams_is_what_quantize_weight_stores(scheme, act_dtype):
    # pack.primitives.stored_qparams: the shared rule (scale rounded up to the stored dtype, zero point
    # refit to it) that the MSE search and GPTQ rely on to measure the error of the stored checkpoint
    w = weights(4)
    wmin, wmax = minmax(w, scheme.group_size)
    scale, zp = stored_qparams(wmin, wmax, scheme, act_dtype)
    qw = quantize_weight(w, scheme, act_dtype)
    assert scale.dtype == stored_scale_dtype(scheme, act_dtype) == qw.scale.dtype
    assert torch.equal(scale, qw.scale)
    if scheme.symmetric:
        assert zp is None and qw.offset is None
    else:
        assert zp.dtype == torch.int32 and torch.equal((-zp).to(scale.dtype), qw.offset)
    # rounded up: the stored scale is never below the exact float32 one, so the range still fits
    exact, _ = choose_qparams(wmin, wmax, scheme.weight_bits, scheme.symmetric)
    assert (scale.float() >= exact).all()
    expected = act_dtype if scheme.weight_only else {torch.bfloat16: torch.bfloat16, torch.float16: torch.float32}[act_dtype]
    assert stored_scale_dtype(scheme, act_dtype) == expected
