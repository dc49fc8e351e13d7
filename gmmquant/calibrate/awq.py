"""Activation-aware per-channel scale search (the idea of AWQ, Lin et al., 2023) for one expert projection.

`x @ w == (x / s) @ (s[:, None] * w)` for any positive `s` `[K]`. Scaling up the rows of w that meet large
activations (`s = mean|x|^a`) gives those rows a finer share of each channel's quantization range; the
activations pay `x / s`. That product must be something the kernel runs: for dynamic
per-token activations (W8A8 / W4A8 dynamic) it is the per-expert `smooth_scale` that dynamic_quant multiplies
into the rows before rounding them (smoothquant.py stores it the same way); weight-only kernels have no
per-expert activation scale, so the recipe validator refuses `awq` there.

The exponent `a` is searched on a grid per expert and projection: for each candidate the weight is
rounded to nearest (the recipe's observer) with the scale exactly as stored, the activations are
fake-quantized per token, and the output error on the expert's sampled rows decides. `a = 0` (t = 1, plain
RTN) is always a candidate, so the search never does worse on those rows than no scaling.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..pack.primitives import quantize_weight
from ..pack.schemes import QuantScheme
from .autoround import fake_quant_tokens
from .observers import Observer
from .smoothquant import smooth_scale_for


def awq_smooth_factor(x: Tensor, w: Tensor, scheme: QuantScheme, act_dtype: torch.dtype, observer: Observer, *,
                      grid: int = 20, max_ratio: float = 1e4) -> tuple[Tensor, float, float]:
    """The per-channel factor s `[K]` float32 (the weight rows are multiplied by s, the activations by 1/s)
    with the lowest output error on x.

    Args:
        x: `[M, K]` float inputs of this expert's projection (M >= 1).
        w: `[K, N]` float32 weight (y = x @ w).
        scheme, act_dtype: weight scheme (activations fake-quantized per token when it is dynamic).
        observer: clip-range observer for the rounding of each candidate.
        grid: exponents a = i / grid, i = 0..grid-1.
        max_ratio: s is normalised to geometric mean 1 and clamped to [1/sqrt(max_ratio), sqrt(max_ratio)].

    Returns:
        (s `[K]` float32, passed through `smooth_scale_for` by the caller; error of a = 0; best error), the
        errors as mean squared output differences.
    """
    xf, wf = x.float(), w.float()
    ref = xf @ wf
    mean_abs = xf.abs().mean(dim=0).clamp_min(1e-8)
    quant_act = scheme.activation == "dynamic"
    best_s, best_err, err0 = torch.ones_like(mean_abs), float("inf"), float("inf")
    bound = max_ratio**0.5
    for i in range(grid):
        a = i / grid
        s = mean_abs.pow(a)
        s = (s / s.log().mean().exp()).clamp(1 / bound, bound)
        stored, factor = smooth_scale_for(s, act_dtype)  # the exact pair the checkpoint will hold
        ws = wf * factor.unsqueeze(-1)
        clip_min, clip_max = observer(ws.unsqueeze(0), scheme, act_dtype)
        dq = quantize_weight(ws.unsqueeze(0), scheme, act_dtype, clip_min=clip_min, clip_max=clip_max).dequantize()[0]
        xs = xf * stored.float()
        if quant_act:
            xs = fake_quant_tokens(xs)
        err = float((xs @ dq - ref).pow(2).mean())
        if i == 0:
            err0 = err
        if err < best_err:
            best_err, best_s = err, s
    return best_s, err0, best_err


def awq_shared_factor(calls: list[tuple[Tensor, Tensor, Optional[Tensor]]], weights: Tensor, down: Tensor,
                      act: Callable[[Tensor], Tensor], scheme: QuantScheme, act_dtype: torch.dtype,
                      observer: Observer, *, grid: int = 20, max_rows: int = 1024, seed: int = 0,
                      max_ratio: float = 1e4) -> tuple[Tensor, float, float]:
    """One factor s `[K]` for the first projection of EVERY expert of a module (weight-only schemes): the
    activations' 1/s is folded into the norm before the experts (and s into the router's columns), which the
    weight-only kernel never sees; the experts' gate_up rows are multiplied by s before rounding.

    Candidates `s = mean|x|^a`, a = i / grid (a = 0: no scaling), rounded to powers of two (the fold must be
    exact: the router must not flip). Each candidate rounds every expert's scaled first projection to nearest
    (the recipe's observer) and is scored by the MoE output error it causes (down_proj kept float), each
    routed token weighted by its router weight squared, as it enters the block output.

    Args:
        calls: the module's calls on the calibration set: (rows `[M, K]`, expert ids `[M, k]`, router weights
            `[M, k]` or None (weight 1)).
        weights: `[E, K, N]` float first projection (canonical gate|up columns); down: `[E, N', H]` float.
        act: the expert's activation on the canonical `[M, N]` intermediate.
        max_rows: token rows scored (sampled deterministically from every call by `seed`).

    Returns:
        (s `[K]` float32 powers of two, error of a = 0, best error): mean squared errors.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = torch.cat([c[0] for c in calls]).float()
    ids = torch.cat([c[1] for c in calls])
    p = torch.cat([c[2].float() if c[2] is not None else torch.ones(c[1].shape) for c in calls])
    mean_abs = rows.abs().mean(dim=0).clamp_min(1e-8)
    if rows.shape[0] > max_rows:
        keep = torch.randperm(rows.shape[0], generator=gen)[:max_rows].sort().values
        rows, ids, p = rows[keep], ids[keep], p[keep]
    per_expert = []
    with torch.no_grad():
        for e in range(weights.shape[0]):
            picked = ids == e
            mask = picked.any(dim=-1)
            if not bool(mask.any()):
                continue
            x = rows[mask].to(weights.device)
            c = (p * picked).sum(dim=-1)[mask].pow(2).to(weights.device)
            w1, w2 = weights[e].float(), down[e].float()
            per_expert.append((e, x, c, w1, w2, act(x @ w1) @ w2))
        total = sum(float(c.sum()) for _, _, c, *_ in per_expert) or 1.0
        bound = max_ratio**0.5
        best_s, best_err, err0 = torch.ones_like(mean_abs), float("inf"), float("inf")
        for i in range(grid):
            s = mean_abs.pow(i / grid)
            s = (s / s.log().mean().exp()).clamp(1 / bound, bound)
            s = torch.exp2(torch.round(torch.log2(s))).to(weights.device)
            err = 0.0
            for _, x, c, w1, w2, ref in per_expert:
                ws = (w1 * s.unsqueeze(-1)).unsqueeze(0)
                clip_min, clip_max = observer(ws, scheme, act_dtype)
                dq = quantize_weight(ws, scheme, act_dtype, clip_min=clip_min, clip_max=clip_max).dequantize()[0]
                y = act((x / s) @ dq) @ w2
                err += float(((y - ref).pow(2).mean(dim=-1) * c).sum())
            err /= total
            if i == 0:
                err0 = err
            if err < best_err:
                best_err, best_s = err, s
    return best_s.float().cpu(), err0, best_err


__all__ = ["awq_shared_factor", "awq_smooth_factor"]
