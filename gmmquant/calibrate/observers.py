"""Observers: how the clip range of a channel / group is chosen before round-to-nearest or GPTQ.

An observer is a function `(w, scheme, act_dtype) -> (clip_min | None, clip_max | None)` for a stacked
`[E, K, N]` float weight; it returns per-channel `[E, N]` or per-group `[E, K/g, N]` float32 ranges that
`quantize_weight(w, scheme, act_dtype, clip_min=..., clip_max=...)` takes, or None for "the weight's min/max".

All the quantization math (scale, zero point, stored-dtype rounding, rounding and clamping of codes) comes
from `gmmquant.pack.primitives`, so an error measured here is the error of the checkpoint that is written.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..pack.primitives import group_view, minmax, quantize, stored_qparams
from ..pack.schemes import QuantScheme

Observer = Callable[[Tensor, QuantScheme, torch.dtype], tuple[Optional[Tensor], Optional[Tensor]]]

# Elements of w processed at once by the MSE search (a few float32 temporaries of this size live at a time):
# 2^22 elements = 16 MiB each, so one 2048 x 1536 expert (3.1 M) per chunk, several small experts per chunk.
_CHUNK_ELEMENTS = 1 << 22


def minmax_observer(w: Tensor, scheme: QuantScheme, act_dtype: torch.dtype) -> tuple[None, None]:
    """Plain min/max: `(None, None)`, which `quantize_weight` reads as the weight's own min and max."""
    return None, None


def mse_clip_range(
    w: Tensor,
    scheme: QuantScheme,
    act_dtype: torch.dtype,
    *,
    grid: int = 20,
    max_shrink: float = 0.2,
    norm: float = 2.4,
) -> tuple[Tensor, Tensor]:
    """Clip range per channel / group that minimises the p-norm quantization error (a shrinking grid search).

    Candidate ranges are `p * [wmin, wmax]` for `p = 1 - max_shrink * i / grid`, `i = 0..grid` (so p = 1,
    the plain min/max range, is always a candidate and the result is never worse than min/max). For each
    candidate the error `sum |w - dq(q(w))|^norm` over the channel's K rows (or the group's g rows) is measured
    with the scale and zero point exactly as they would be stored (`stored_qparams`: scale rounded up to the
    stored dtype, zero point refit); per channel / group the first candidate with the lowest error wins.

    Args:
        w: `[E, K, N]` float weight (canonical layout, y = x @ w[e]).
        scheme: scheme (bits, symmetric, group_size); checked against K and N.
        act_dtype: activation dtype (bfloat16 / float16): decides the stored scale dtype.
        grid: number of shrink steps between p = 1 and p = 1 - max_shrink (default: 1% steps down to 80%
            of the range, where the optimum of 4- and 8-bit groups lies; 5x cheaper than a full sweep).
        max_shrink: largest fraction of the range that may be cut off, in [0, 1).
        norm: exponent of the error (2.4 as in GPTQ's MSE observer: between MSE and max error).

    Returns:
        (clip_min, clip_max), float32, `[E, N]` per-channel or `[E, K/g, N]` per-group; clip_min <= 0 <=
        clip_max (the min/max range widened to hold 0, as choose_qparams does, then shrunk).
    """
    if w.dim() != 3:
        raise ValueError(f"mse_clip_range expects a stacked [E, K, N] weight, got shape {list(w.shape)}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"max_shrink must be in [0, 1) (the range cannot shrink to nothing), got {max_shrink}")
    e, k, n = w.shape
    scheme.check_shape(k, n)
    per = max(1, _CHUNK_ELEMENTS // max(1, k * n))
    mins, maxs = [], []
    for start in range(0, e, per):  # a few experts at a time bounds the temporaries for big MoE layers
        lo, hi = _mse_search(w[start : start + per].float(), scheme, act_dtype, grid, max_shrink, norm)
        mins.append(lo)
        maxs.append(hi)
    return torch.cat(mins), torch.cat(maxs)


def _mse_search(
    w: Tensor, scheme: QuantScheme, act_dtype: torch.dtype, grid: int, max_shrink: float, norm: float
) -> tuple[Tensor, Tensor]:
    """mse_clip_range on a chunk of experts `[e, K, N]` float32; vectorised over channels / groups."""
    gs = scheme.group_size
    wmin, wmax = minmax(w, gs)
    # The range quantize_weight really uses always holds 0 (choose_qparams); shrink that one, so the
    # returned clip range is the effective one (clip_min <= 0 <= clip_max).
    wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
    best_err = torch.full_like(wmin, float("inf"))
    best_p = torch.ones_like(wmin)
    wg = group_view(w, gs)  # [e, 1, K, N] or [e, K/g, g, N]: the error is summed over dim -2
    for i in range(grid + 1):
        p = 1.0 - max_shrink * i / grid
        lo, hi = wmin * p, wmax * p
        scale, zp = stored_qparams(lo, hi, scheme, act_dtype)
        scale = scale.float()
        q = quantize(w, scale, zp, scheme.weight_bits, gs)
        dq = group_view(q.float(), gs)
        if zp is not None:
            dq.sub_(_param_view(zp.float(), gs))
        dq.mul_(_param_view(scale, gs))  # (q - zero_point) * scale, as antiquant_dequantize computes it
        err = dq.sub_(wg).abs_().pow_(norm).sum(dim=-2)  # in place: one [e, K, N] temporary per step
        if gs is None:
            err = err.squeeze(-2)
        better = err < best_err  # strict: ties keep the larger range (p = 1 first)
        best_err = torch.where(better, err, best_err)
        best_p = torch.where(better, torch.full_like(best_p, p), best_p)
    return wmin * best_p, wmax * best_p


def _param_view(param: Tensor, group_size: Optional[int]) -> Tensor:
    """`[e, N]` -> `[e, 1, 1, N]`, `[e, K/g, N]` -> `[e, K/g, 1, N]`: broadcast against group_view(w)."""
    return param.unsqueeze(-2) if group_size is not None else param.unsqueeze(-2).unsqueeze(-3)


OBSERVERS: dict[str, Observer] = {
    "minmax": minmax_observer,
    "mse": mse_clip_range,
}


def get_observer(name: str) -> Observer:
    """An observer from OBSERVERS by name; a ValueError listing the known names otherwise."""
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; known: {sorted(OBSERVERS)}")
    return OBSERVERS[name]


__all__ = ["OBSERVERS", "Observer", "get_observer", "minmax_observer", "mse_clip_range"]
