"""Per-expert input statistics, collected from the tokens routed to each expert during calibration.

An `ExpertsObserver` hooks one fused experts module (transformers 5: `forward(hidden, top_k_index,
top_k_weights)`). The module itself runs untouched, so the layer's output is the model's own; the hook sees
the same inputs and, per expert, feeds the rows routed to it (or every row, in `all_experts` mode) through
that expert's float gate_up to get the down_proj input too. For each projection and expert it keeps the
row count, the per-channel absolute maximum (SmoothQuant, static activation scales) and, for GPTQ, the
running Hessian `2 X^T X / n`. For learned rounding (autoround) it keeps a deterministic uniform sample of at
most `samples` input rows per expert (random keys from a seeded generator, the lowest kept: a reservoir that
does not depend on batch boundaries' order of arrival beyond the stream itself). With `blend`, every expert's
Hessians over ALL tokens are kept too (`ExpertsStats.all_inputs`), for GPTQ's blended Hessian of rarely
routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from ..pack.layouts import ExpertsModuleInfo, expert_weight
from ..runtime.adapters import routed_rows
from ..runtime.experts import gate_function
from .gptq import accumulate_hessian


@dataclass
class InputStats:
    """Statistics of one projection's input for one expert.

    Attributes:
        rows: rows seen.
        absmax: `[K]` float32 per-channel max |x| (None before the first row).
        hessian: `[K, K]` float32 running `2 X^T X / rows` (only when collected for GPTQ).
    """

    rows: int = 0
    absmax: Optional[Tensor] = None
    hessian: Optional[Tensor] = None
    want_hessian: bool = False
    max_samples: int = 0  # rows to keep for learned rounding (0: none)
    seed: int = 0
    samples: Optional[Tensor] = None  # [<= max_samples, K] in the inputs' dtype, in arrival order
    _keys: Optional[Tensor] = None
    _gen: Optional[torch.Generator] = None

    def add(self, x: Tensor) -> None:
        """Add rows `[M, K]` (any float dtype)."""
        if x.shape[0] == 0:
            return
        xf = x.detach().float()
        amax = xf.abs().amax(dim=0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        if self.want_hessian:
            self.hessian, _ = accumulate_hessian(self.hessian, xf, self.rows)
        if self.max_samples:
            self._sample(x.detach())
        self.rows += x.shape[0]

    def _sample(self, x: Tensor) -> None:
        """Keep the `max_samples` rows with the smallest seeded random keys (uniform over the stream), in
        the inputs' own dtype (bf16 models: half the memory of float32)."""
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        keys = torch.rand(x.shape[0], generator=self._gen)
        rows = x.cpu()
        if self.samples is not None:
            keys, rows = torch.cat([self._keys, keys]), torch.cat([self.samples, rows])
        if keys.shape[0] > self.max_samples:
            keep = torch.topk(keys, self.max_samples, largest=False).indices.sort().values  # arrival order
            keys, rows = keys[keep], rows[keep]
        self._keys, self.samples = keys, rows


@dataclass
class ExpertsStats:
    """Statistics of one experts module: routed token counts and per-projection, per-expert input stats."""

    num_experts: int
    routed: Tensor  # int64 [E]: tokens the router sent to each expert
    inputs: dict[str, list[InputStats]] = field(default_factory=dict)
    all_inputs: dict[str, list[InputStats]] = field(default_factory=dict)  # blend: every token, per expert

    def seen(self, proj: str) -> list[int]:
        """Rows each expert's statistics of `proj` are based on (the routed tokens when no input
        statistics were collected)."""
        rows = [s.rows for s in self.inputs[proj]]
        return rows if any(rows) else self.routed.tolist()


def expert_weight_kn(module: nn.Module, info: ExpertsModuleInfo, proj: str, e: int) -> Tensor:
    """Expert e's `[K, N]` weight in the module's own column order (interleaved stays interleaved)."""
    if info.stack:  # dbrx: canonical order is its own
        return expert_weight(module, info, proj)[e]
    param = getattr(module, info.param(proj))[e]
    return param if info.is_transposed else param.t()


def expert_intermediate(module: nn.Module, info: ExpertsModuleInfo, e: int, x: Tensor) -> Tensor:
    """Expert e's down_proj input for rows `x` `[M, H]`: the model's own gate / activation of gate_up(x)."""
    first = "gate_up_proj" if "gate_up_proj" in info.projections else "up_proj"
    h = x @ expert_weight_kn(module, info, first, e).to(x.dtype)
    if info.has_bias:
        h = h + getattr(module, f"{first}_bias")[e].to(h.dtype)
    return gate_function(module)(h) if first == "gate_up_proj" else module.act_fn(h)


class ExpertsObserver:
    """Collects `ExpertsStats` for one fused experts module while the model runs; `remove()` unhooks it.

    With `inputs=False` only the routed token counts are kept (round-to-nearest of weights needs no
    activation statistics, and the per-expert pass costs a matmul per expert)."""

    def __init__(self, module: nn.Module, info: ExpertsModuleInfo, *, all_experts: bool, hessian: bool, inputs: bool = True,
                 samples: int = 0, seed: int = 0, blend: bool = False, sample_all: bool = False):
        if info.linear_names:
            raise ValueError(f"{info.path}: calibrating an nn.ModuleList of experts is not supported; "
                                      "load the model with transformers >= 5 so its experts are fused")
        self.info, self.all_experts, self.inputs = info, all_experts, inputs
        self.blend = blend and hessian and not all_experts  # with all_experts the own Hessian is already H_all
        e = info.num_experts
        first = next(iter(info.projections))
        self.stats = ExpertsStats(e, torch.zeros(e, dtype=torch.int64),
                                  {p: [InputStats(want_hessian=hessian, max_samples=samples if p == first or sample_all else 0,
                                                  seed=seed + i) for i in range(e)] for p in info.projections})
        if self.blend:
            # the first projection sees the same rows in every expert: one shared all-token Hessian
            shared = InputStats(want_hessian=True)
            self.stats.all_inputs = {p: [shared] * e if p == first else [InputStats(want_hessian=True) for _ in range(e)]
                                     for p in info.projections}
        self._handle = module.register_forward_pre_hook(self._observe, with_kwargs=True)

    @torch.no_grad()
    def _observe(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, index = routed_rows(self.info, args, kwargs)  # any call convention (runtime/adapters.py)
        e_count = self.info.num_experts
        valid = index[(index >= 0) & (index < e_count)]
        self.stats.routed += torch.bincount(valid.reshape(-1).cpu(), minlength=e_count)[:e_count]
        if not self.inputs:
            return
        first = next(iter(self.info.projections))  # gate_up / up (or a lone projection's own)
        if self.blend:
            self.stats.all_inputs[first][0].add(hidden)
        for e in range(e_count):
            if self.blend and first != "down_proj" and "down_proj" in self.info.projections:
                self.stats.all_inputs["down_proj"][e].add(expert_intermediate(module, self.info, e, hidden))
            x = hidden if self.all_experts else hidden[(index == e).any(dim=-1)]
            if x.shape[0] == 0:
                continue
            self.stats.inputs[first][e].add(x)
            if first != "down_proj" and "down_proj" in self.info.projections:
                self.stats.inputs["down_proj"][e].add(expert_intermediate(module, self.info, e, x))

    def remove(self) -> ExpertsStats:
        self._handle.remove()
        return self.stats


__all__ = ["ExpertsObserver", "ExpertsStats", "InputStats", "expert_intermediate", "expert_weight_kn"]
