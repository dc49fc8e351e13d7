"""SmoothQuant for W8A8 experts: move activation outliers into the weights with a per-channel factor s.

`x @ W == (x / s) @ (s[:, None] * W)`. With `s_j = max|x_j|^alpha / max|W_j|^(1-alpha)` the activations
that dynamic_quant rounds per token lose their outlier channels. Where the division is free:
- gate_up: the RMSNorm before the MoE block produces x, so `norm.weight /= s` (and every other reader of
  that normed x: the router, shared experts, the shared-expert gate, gets `weight[:, j] *= s_j`). One s for
  all experts of the layer. `fold_into_norm` finds the norm and the readers by watching one forward, and
  `LayerFold` checks the folded block against the original before keeping it.
- down_proj (or gate_up when no fold is possible): per-expert `smooth_scale = 1/s` `[E, K]`, which
  npu_dynamic_quant multiplies into the rows of each expert (`smooth_scales` + `group_index`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def smoothing_factors(act_absmax: Tensor, weight_absmax: Tensor, alpha: float) -> Tensor:
    """Per input channel `s = act^alpha / weight^(1-alpha)` rounded to a power of two, float32 `[K]`; 1 where
    either side is 0.

    Powers of two make every fold exact in any float dtype: dividing a bf16 norm weight by s and
    multiplying a bf16 router column by s round nothing, so routing cannot flip. SmoothQuant loses nothing
    measurable by moving each factor by at most a factor of sqrt(2).
    """
    a, w = act_absmax.float(), weight_absmax.float()
    s = a.pow(alpha) / w.pow(1 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s) & (s > 0)
    s = torch.where(ok, s, torch.ones_like(s)).clamp(2.0**-16, 2.0**16)
    return torch.exp2(torch.round(torch.log2(s)))


def smooth_scale_for(s: Tensor, act_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The stored per-expert `smooth_scale` (= 1/s, in the activation dtype) and the exact factor the
    weights must then be multiplied by (1 / stored, float32), so the pair stays an exact identity."""
    stored = (1.0 / s).to(act_dtype)
    return stored, 1.0 / stored.float()


@dataclass
class NormFold:
    """The modules a gate_up smoothing factor is folded into: the norm and the other readers of its output."""

    norm: nn.Module
    readers: list[nn.Module] = field(default_factory=list)


def find_norm_fold(layer: nn.Module, block: nn.Module, experts: nn.Module, run: Callable[[], None]) -> Optional[NormFold]:
    """Watch one forward of `layer` (`run()`) to find the norm whose output is the MoE block's input and the
    modules of the block other than the experts that read that input directly. None if there is no such
    norm, or a reader has no `[*, H]` weight."""
    outputs: dict[int, nn.Module] = {}
    block_input: list[Tensor] = []
    readers: dict[int, nn.Module] = {}
    inside_block = set(map(id, block.modules()))
    inside_experts = set(map(id, experts.modules()))
    handles = []

    producer: list[Optional[nn.Module]] = []

    def on_output(module, args, out):
        if isinstance(out, Tensor):  # the latest producer: freed buffers' addresses are reused
            outputs[out.data_ptr()] = module

    def on_block_input(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        if not block_input:
            block_input.append(x)
            producer.append(outputs.get(x.data_ptr()))

    def on_reader_input(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()), None)
        if block_input and isinstance(x, Tensor) and x.data_ptr() == block_input[0].data_ptr():
            readers.setdefault(id(module), module)

    for module in layer.modules():
        if id(module) not in inside_block:
            handles.append(module.register_forward_hook(on_output))
        elif module is block:
            handles.append(module.register_forward_pre_hook(on_block_input, with_kwargs=True))
        elif id(module) not in inside_experts and not list(module.children()):
            handles.append(module.register_forward_pre_hook(on_reader_input, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    if not block_input:
        return None
    norm = producer[0]
    hidden = block_input[0].shape[-1]
    weight = getattr(norm, "weight", None)
    if norm is None or not isinstance(weight, Tensor) or tuple(weight.shape) != (hidden,):
        return None
    found = list(readers.values())
    if any(not isinstance(getattr(m, "weight", None), Tensor) or m.weight.dim() != 2 or m.weight.shape[-1] != hidden for m in found):
        return None
    return NormFold(norm, found)


def apply_norm_fold(fold: NormFold, s: Tensor) -> list[Tensor]:
    """Divide the norm's weight by s `[H]` (powers of two: exact) and multiply the readers' input columns
    by s. Returns the original weights, for `undo_norm_fold`."""
    params = [fold.norm.weight] + [r.weight for r in fold.readers]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        fold.norm.weight.copy_((fold.norm.weight.float() / s).to(fold.norm.weight.dtype))
        for reader in fold.readers:
            reader.weight.copy_((reader.weight.float() * s).to(reader.weight.dtype))
    return saved


def undo_norm_fold(fold: NormFold, saved: list[Tensor]) -> None:
    """Restore the weights `apply_norm_fold` changed (used when the folded block fails its check)."""
    with torch.no_grad():
        for p, old in zip([fold.norm.weight] + [r.weight for r in fold.readers], saved):
            p.copy_(old)


__all__ = ["NormFold", "apply_norm_fold", "find_norm_fold", "smooth_scale_for", "smoothing_factors", "undo_norm_fold"]
