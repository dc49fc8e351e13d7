"""`replace_experts`: swap every fused experts module of a transformers model for GMM experts."""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..kernels.grouped_matmul import select_backend
from ..pack import QuantizedWeight, QuantScheme, get_scheme, quantize_weight
from ..pack.primitives import activation_dtype
from ..pack.layouts import ExpertsModuleInfo, expert_bias, expert_weight, find_experts_modules
from .families import check_supported
from .adapters import gmm_experts
from .experts import GMMProjection, float_projections

logger = logging.getLogger(__name__)


class NoExpertsError(ValueError):
    """The model has no MoE experts module gmmquant can replace."""


@dataclass
class ReplaceReport:
    """What replace_experts did: modules replaced, scheme, and expert bytes before / after."""

    modules: list[str] = field(default_factory=list)
    scheme: Optional[QuantScheme] = None
    bytes_before: int = 0
    bytes_after: int = 0


def runs_on_cpu(module: nn.Module, backend: Optional[str]) -> bool:
    buffer = next(module.buffers(), None)
    if buffer is None or buffer.device.type == "meta":
        return False
    return select_backend([buffer], backend) == "cpu"


def trim_heap() -> None:
    """Give freed heap memory back to the OS. Repacking thousands of experts leaves hundreds of MiB of
    freed temporaries in glibc's arenas (measured: 1039 -> 495 MiB resident on a 4-layer, 64-expert model);
    a no-op where glibc is not the allocator."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def strip_float_experts(source: nn.Module, info: ExpertsModuleInfo) -> None:
    """Drop the float expert weights and biases of a replaced fused module (its gate function stays usable)."""
    for name in info.stack or ():
        parent, _, leaf = name.rpartition(".")
        source.get_submodule(parent).register_parameter(leaf, None)
    for proj in info.projections:
        for name in (info.param(proj), f"{proj}_bias"):
            if getattr(source, name, None) is not None:
                setattr(source, name, None)


def quantized_projections(source: nn.Module, info: ExpertsModuleInfo, scheme: QuantScheme, act_dtype: torch.dtype,
                          backend: Optional[str]) -> dict[str, GMMProjection]:
    """Round-to-nearest quantize a module's float experts into GMM projections (canonical column order)."""
    out = {}
    with torch.no_grad():
        for proj in info.projections:
            weight, bias = expert_weight(source, info, proj), expert_bias(source, info, proj)
            out[proj] = GMMProjection.from_quantized(quantize_weight(weight, scheme, act_dtype), act_dtype, bias, backend)
    return out


def replace_experts(
    model: nn.Module,
    scheme: "Optional[QuantScheme | str]" = None,
    *,
    backend: Optional[str] = None,
    act_dtype: Optional[torch.dtype] = None,
    quantized: Optional[dict[str, dict[str, QuantizedWeight]]] = None,
    prepare: bool = True,
) -> ReplaceReport:
    """Replace every fused experts module of `model`, in place, by a `GMMExperts` module.

    Args:
        model: a transformers 5 MoE model (experts modules decorated with `use_experts_implementation`).
        scheme: None runs the float weights through the GMM kernel; a scheme (or preset name) quantizes
            them on the fly with round-to-nearest.
        backend: grouped_matmul backend (default: by device).
        act_dtype: activation dtype of quantized experts (default: the model's if bf16/fp16, else bf16).
        quantized: precomputed projections per module path (e.g. from a checkpoint), used instead of RTN.
        prepare: repack quantized weights for the CPU kernels now (load time) instead of on first use.

    Returns:
        ReplaceReport.

    Raises:
        NoExpertsError: the model has no experts module.
    """
    check_supported(model)
    modules = find_experts_modules(model)
    if not modules:
        raise NoExpertsError(f"{type(model).__name__} has no MoE experts modules (a fused module with a 3-D down_proj, or an nn.ModuleList of gate/up/down MLPs); nothing to replace")
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    report = ReplaceReport(scheme=scheme)
    act = activation_dtype(next(model.parameters()).dtype, act_dtype)
    for path, info in modules.items():
        source = model.get_submodule(path)
        if quantized is not None and path in quantized:
            projections = {p: GMMProjection.from_quantized(qw, act, backend=backend) for p, qw in quantized[path].items()}
            canonical_order = True
        elif scheme is not None:
            projections = quantized_projections(source, info, scheme, act, backend)
            canonical_order = True
        else:
            projections = float_projections(source, info, backend)
            canonical_order = False
        gmm = gmm_experts(source, info, projections, canonical_order)
        report.bytes_before += sum(p.numel() * p.element_size() for p in source.parameters(recurse=True))
        if canonical_order and not info.linear_names:  # a replaced ModuleList is dropped whole
            strip_float_experts(source, info)
        model.set_submodule(path, gmm)
        if prepare and canonical_order and runs_on_cpu(gmm, backend):
            gmm.prepare()
            trim_heap()  # per module, so the repack temporaries never pile up
        report.bytes_after += gmm.nbytes()
        report.modules.append(path)
    logger.info("replaced %d experts modules (%s)", len(report.modules), scheme.name if scheme else "float")
    return report
