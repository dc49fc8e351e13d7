"""Quantize one experts module from its calibration statistics, expert by expert.

Each expert of each projection is quantized with the recipe's algorithm (GPTQ from that expert's own
Hessian, optionally blended with the all-token Hessian for rarely routed experts; learned rounding and
clipping of all the expert's projections together, autoround.py; or round-to-nearest with the recipe's
observer). An expert whose statistics saw fewer than
`min_tokens` rows, where the algorithm needs data, falls back to RTN and is reported by name. SmoothQuant
factors (per expert, or one per layer after a norm fold) are multiplied into the weights first; W8A8
static gets one activation scale per expert. Hessians are freed as soon as their expert is done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from ..pack.layouts import ExpertsModuleInfo, expert_bias, expert_weight
from ..pack.primitives import QuantizedWeight, quantize_weight
from ..pack.schemes import QuantScheme
from ..recipes import Recipe
from ..runtime.experts import GMMProjection
from .autoround import autoround_module
from .awq import awq_smooth_factor
from .gptq import gptq_quantize
from .observers import OBSERVERS
from .smoothquant import smooth_scale_for, smoothing_factors
from .stats import ExpertsStats

logger = logging.getLogger(__name__)


@dataclass
class ModuleResult:
    """What quantizing one experts module produced and how it went."""

    path: str
    projections: dict[str, GMMProjection]
    routed: list[int]
    seen: dict[str, list[int]] = field(default_factory=dict)  # rows each expert's statistics saw, per projection
    fallbacks: list[str] = field(default_factory=list)
    weight_errors: list[float] = field(default_factory=list)  # relative Frobenius error per expert & projection
    smoothing: str = "none"  # "none" | "norm-fold" | "per-expert"


def _stack(parts: list[QuantizedWeight], scheme: QuantScheme) -> QuantizedWeight:
    offset = None if parts[0].offset is None else torch.cat([p.offset for p in parts])
    return QuantizedWeight(torch.cat([p.qweight for p in parts]), torch.cat([p.scale for p in parts]), offset, scheme)


def _input_scales(stats: ExpertsStats, proj: str, fallback: list[bool]) -> Tensor:
    """W8A8 static: per-expert `input_scale = max|x| / 127` (float32 `[E]`); experts without enough data
    take the largest scale of the module, so none of their activations clip worse than the others'."""
    amax = torch.tensor([float(s.absmax.max()) if s.absmax is not None else 0.0 for s in stats.inputs[proj]])
    scale = amax / 127.0
    ok = torch.tensor([not f for f in fallback]) & (scale > 0)
    top = scale[ok].max() if bool(ok.any()) else scale.max()
    top = top if float(top) > 0 else torch.tensor(1.0)
    return torch.where(ok, scale, top).to(torch.float32)


def blend_hessian(own: Optional[Tensor], rows: int, every: Optional[Tensor], weight_rows: float) -> Optional[Tensor]:
    """GPTQ Hessian of a possibly rarely routed expert: `(n_e H_e + w H_all) / (n_e + w)`.

    Args:
        own: `[K, K]` float32 Hessian of the expert's routed rows (None if it saw none); rows: n_e.
        every: `[K, K]` float32 Hessian of every calibration token through this expert (None: no blend).
        weight_rows: w = blend_all_tokens x blend_rows, the all-token share in rows: an expert routed far
            more than w tokens keeps its own statistics, one routed far fewer gets the all-token Hessian.

    Returns:
        `[K, K]` float32 blended Hessian (own unchanged when every is None or weight_rows is 0).
    """
    if every is None or weight_rows <= 0:
        return own
    if own is None or rows == 0:
        return every.clone()
    return (own * rows + every * weight_rows) / (rows + weight_rows)


def quantize_experts(
    module: nn.Module,
    info: ExpertsModuleInfo,
    stats: ExpertsStats,
    recipe: Recipe,
    act_dtype: torch.dtype,
    *,
    path: str,
    gate_up_folded: bool = False,
    backend: Optional[str] = None,
) -> ModuleResult:
    """Quantize every expert of a fused experts module into GMM projections.

    Args:
        module: the float experts module (its weights are read, not changed).
        info: its layout.
        stats: calibration statistics collected by `ExpertsObserver`.
        recipe: algorithm, observer, GPTQ and SmoothQuant settings, min_tokens.
        act_dtype: the model's activation dtype (bf16 / fp16).
        path: the module's full model path (for names in reports and warnings).
        gate_up_folded: SmoothQuant's gate_up factor is already folded into the norm and into `module`'s
            weights and `stats` (so gate_up gets no per-expert smooth scale).
        backend: grouped_matmul backend of the projections.

    Returns:
        ModuleResult with one GMMProjection per projection (canonical column order).
    """
    scheme = recipe.quant_scheme()
    smooth = recipe.smoothquant
    data_needed = recipe.needs_activation_statistics
    result = ModuleResult(path, {}, stats.routed.tolist())
    first = "gate_up_proj" if "gate_up_proj" in info.projections else "up_proj"
    g = recipe.gptq
    blend = bool(stats.all_inputs) and g.blend_all_tokens > 0
    min_tokens = recipe.calibration.min_tokens

    def fallbacks_of(proj: str) -> list[bool]:
        own = stats.seen(proj)
        if blend:  # the blended Hessian has every token's share: only an expert without any data falls back
            return [data_needed and own[e] + stats.all_inputs[proj][e].rows < min_tokens for e in range(len(own))]
        return [data_needed and n < min_tokens for n in own]

    if blend:
        for proj in info.projections:
            for e, st in enumerate(stats.inputs[proj]):
                st.hessian = blend_hessian(st.hessian, st.rows, stats.all_inputs[proj][e].hessian,
                                           g.blend_all_tokens * g.blend_rows)
    learned = None
    if recipe.algorithm == "autoround":
        learned = autoround_module(module, info, stats, recipe, act_dtype, fallbacks_of(first), path=path)
    for proj in info.projections:
        weights = expert_weight(module, info, proj)
        seen = stats.seen(proj)
        fallback = fallbacks_of(proj)
        if learned is not None:  # learned rounding needs the first projection's rows for the whole expert
            fallback = [f or learned[proj][e] is None for e, f in enumerate(fallbacks_of(first))]
        result.seen[proj] = seen
        per_expert_smooth = (smooth is not None and not (proj == first and gate_up_folded)) or recipe.awq_per_expert
        smooth_rows: list[Tensor] = []
        parts = []
        for e in range(info.num_experts):
            w = weights[e].detach().float()
            input_stats = stats.inputs[proj][e]
            if per_expert_smooth:
                if fallback[e] or (recipe.awq_per_expert and input_stats.samples is None):
                    s = torch.ones(w.shape[0], device=w.device)
                elif recipe.awq_per_expert:
                    s, err0, err = awq_smooth_factor(input_stats.samples.to(w.device), w, scheme, act_dtype,
                                                     OBSERVERS[recipe.observer], grid=recipe.awq.grid)
                    input_stats.samples = None
                    logger.info("%s[%d].%s: awq output error %.4g -> %.4g", path, e, proj, err0, err)
                else:
                    s = smoothing_factors(input_stats.absmax, w.abs().amax(dim=-1), smooth.alpha)
                stored, factor = smooth_scale_for(s, act_dtype)
                smooth_rows.append(stored)
                w = w * factor.unsqueeze(-1)
                if input_stats.hessian is not None:  # x' = x * stored: H' = diag(stored) H diag(stored)
                    f = stored.float()
                    input_stats.hessian = input_stats.hessian * f.unsqueeze(0) * f.unsqueeze(1)
            if learned is not None and learned[proj][e] is not None:
                qw = learned[proj][e]
            elif recipe.algorithm == "gptq" and not fallback[e]:
                qw = gptq_quantize(w, input_stats.hessian, scheme, act_dtype, block_size=g.block_size, damp=g.damp,
                                   act_order=g.act_order, observer=recipe.observer)
            else:
                clip_min, clip_max = OBSERVERS[recipe.observer](w.unsqueeze(0), scheme, act_dtype)
                qw = quantize_weight(w.unsqueeze(0), scheme, act_dtype, clip_min=clip_min, clip_max=clip_max)
            input_stats.hessian = None  # the largest object of the expert; free it now
            err = (qw.dequantize()[0] - w).norm() / w.norm().clamp_min(1e-30)
            if not torch.isfinite(qw.scale.float()).all():
                raise ValueError(f"{path}.{proj} expert {e}: quantization produced a NaN/inf scale")
            result.weight_errors.append(float(err))
            parts.append(qw)
            if fallback[e]:
                name = f"{path}[{e}].{proj}"
                result.fallbacks.append(name)
                logger.warning("%s saw %d calibration tokens (min_tokens=%d): falls back to RTN", name, seen[e],
                               recipe.calibration.min_tokens)
        extra = {}
        if smooth_rows:
            extra["smooth_scale"] = torch.stack(smooth_rows)
        if scheme.activation == "static":
            extra["input_scale"] = _input_scales(stats, proj, fallback).to(weights.device)
        bias = expert_bias(module, info, proj)
        result.projections[proj] = GMMProjection.from_quantized(_stack(parts, scheme), act_dtype, bias, backend, **extra)
    kinds = ["norm-fold"] * gate_up_folded + ["per-expert"] * any(p.smooth_scale is not None for p in result.projections.values())
    result.smoothing = "+".join(kinds) or "none"
    return result


__all__ = ["ModuleResult", "blend_hessian", "quantize_experts"]
