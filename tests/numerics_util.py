"""Ulp arithmetic for comparing backends output by output (docs/KERNELS.md "Numerics")."""

from __future__ import annotations

import torch

# Explicit mantissa bits and smallest normal exponent per output dtype.
_FORMATS = {torch.bfloat16: (7, -126), torch.float16: (10, -14), torch.float32: (23, -126)}


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at each |value| (float64), subnormals included."""
    mantissa, min_exp = _FORMATS[dtype]
    mag = values.double().abs()
    exp = torch.floor(torch.log2(mag.clamp(min=2.0**min_exp)))
    return torch.pow(2.0, exp - mantissa)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in ulps of their dtype at the larger magnitude of the two (0 where both are equal)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if not a.is_floating_point():
        return (a.long() - b.long()).abs().double()
    a64, b64 = a.double(), b.double()
    assert torch.isfinite(a64).all() and torch.isfinite(b64).all(), "non-finite output"
    return (a64 - b64).abs() / ulp(torch.maximum(a64.abs(), b64.abs()), a.dtype)


def assert_within_ulps(a: torch.Tensor, b: torch.Tensor, ulps: float = 1.0, what: str = "") -> None:
    d = ulp_distance(a, b)
    worst = float(d.max()) if d.numel() else 0.0
    assert worst <= ulps, f"{what}: {worst:.2f} ulps apart (allowed {ulps}); {(d > ulps).float().mean().item():.1%} of outputs over"
