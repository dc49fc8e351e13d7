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
from ..runtime.adapters import ROUTER_WEIGHTED_CALLS, routed_rows, routed_weights
from ..runtime.experts import gate_function
from .gptq import accumulate_hessian


@dataclass
class InputStats:
    """Statistics of one projection's input for one expert.

    Attributes:
        rows: rows seen.
        absmax: `[K]` float32 per-channel max |x| (None before the first row).
        hessian: `[K, K]` float32 running `2 X^T X / rows` (only when collected for GPTQ); with router
            weights p, `2 sum p^2 x x^T / sum p^2`.
        samples, sample_weights: the kept rows for learned rounding and, when router weights were given,
            their `[S]` float32 router weights p.
        sample_targets: with float-stream targets, the same tokens' rows in the float model (the input this
            expert would get had no earlier layer been quantized), aligned with `samples`.
    """

    rows: int = 0
    absmax: Optional[Tensor] = None
    hessian: Optional[Tensor] = None
    want_hessian: bool = False
    max_samples: int = 0  # rows to keep for learned rounding (0: none)
    seed: int = 0
    samples: Optional[Tensor] = None  # [<= max_samples, K] in the inputs' dtype, in arrival order
    sample_weights: Optional[Tensor] = None  # [<= max_samples] float32 router weights of the samples
    sample_targets: Optional[Tensor] = None  # [<= max_samples, K] float-stream rows of the same tokens
    hessian_weight: float = 0.0  # running sum of the Hessian's row weights (rows when unweighted)
    _keys: Optional[Tensor] = None
    _gen: Optional[torch.Generator] = None

    def add(self, x: Tensor, weight: Optional[Tensor] = None, target: Optional[Tensor] = None) -> None:
        """Add rows `[M, K]` (any float dtype), optionally with their `[M]` router weights p: the Hessian then
        weighs each row by p^2 (its share of the MoE block's squared output error) and the samples keep p.
        The per-channel max stays unweighted (it bounds the activations the kernel will see). `target`
        `[M, K]`: the float model's rows of the same tokens, sampled alongside (float-stream targets)."""
        if x.shape[0] == 0:
            return
        xf = x.detach().float()
        amax = xf.abs().amax(dim=0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        if self.want_hessian:
            c = None if weight is None else weight.float().pow(2)
            self.hessian, self.hessian_weight = accumulate_hessian(self.hessian, xf, self.hessian_weight, c)
        if self.max_samples:
            self._sample(x.detach(), None if weight is None else weight.detach().float().cpu(),
                         None if target is None else target.detach().cpu())
        self.rows += x.shape[0]

    def _sample(self, x: Tensor, weight: Optional[Tensor] = None, target: Optional[Tensor] = None) -> None:
        """Keep the `max_samples` rows with the smallest seeded random keys (uniform over the stream), in
        the inputs' own dtype (bf16 models: half the memory of float32)."""
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        keys = torch.rand(x.shape[0], generator=self._gen)
        rows = x.cpu()
        weights, targets = weight, target
        if self.samples is not None and ((weight is None) != (self.sample_weights is None)
                                         or (target is None) != (self.sample_targets is None)):
            raise ValueError("InputStats: rows with and without router weights / float targets cannot be mixed")
        if self.samples is not None:
            keys, rows = torch.cat([self._keys, keys]), torch.cat([self.samples, rows])
            if weight is not None:
                weights = torch.cat([self.sample_weights, weight])
            if target is not None:
                targets = torch.cat([self.sample_targets, target])
        if keys.shape[0] > self.max_samples:
            keep = torch.topk(keys, self.max_samples, largest=False).indices.sort().values  # arrival order
            keys, rows = keys[keep], rows[keep]
            weights = None if weights is None else weights[keep]
            targets = None if targets is None else targets[keep]
        self._keys, self.samples, self.sample_weights, self.sample_targets = keys, rows, weights, targets


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
    activation statistics, and the per-expert pass costs a matmul per expert). With `router_weighted`, each
    routed row's Hessian share and learned-rounding loss count with its router weight squared: the expert's
    error on a token enters the MoE block's output multiplied by that weight."""

    def __init__(self, module: nn.Module, info: ExpertsModuleInfo, *, all_experts: bool, hessian: bool, inputs: bool = True,
                 samples: int = 0, seed: int = 0, blend: bool = False, sample_all: bool = False,
                 router_weighted: bool = False, float_rows: Optional[list[Tensor]] = None):
        if info.linear_names:
            raise ValueError(f"{info.path}: calibrating an nn.ModuleList of experts is not supported; "
                                      "load the model with transformers >= 5 so its experts are fused")
        if router_weighted and (all_experts or info.call not in ROUTER_WEIGHTED_CALLS):
            raise ValueError(f"{info.path}: calibration.router_weighted needs routed calibration (all_experts: false) "
                             f"and experts called with their router weights (forward(hidden, top_k_index, top_k_weights)); "
                             f"this module's call convention is {info.call!r}")
        self.router_weighted = router_weighted
        # float-stream targets: the module's input rows of the same calls in the float model (ExpertsInputRecorder)
        self.float_rows, self._calls = float_rows, 0
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
        router = routed_weights(self.info, args, kwargs) if self.router_weighted else None
        twin = None
        if self.float_rows is not None:
            if self._calls >= len(self.float_rows) or self.float_rows[self._calls].shape != hidden.shape:
                raise RuntimeError(f"{self.info.path}: call {self._calls} does not pair with the float model's calls "
                                   f"({len(self.float_rows)} recorded); both streams must run the same batches")
            twin = self.float_rows[self._calls].to(hidden.device)
            self._calls += 1
        for e in range(e_count):
            if self.blend and first != "down_proj" and "down_proj" in self.info.projections:
                self.stats.all_inputs["down_proj"][e].add(expert_intermediate(module, self.info, e, hidden))
            picked = index == e
            rows = picked.any(dim=-1)
            x = hidden if self.all_experts else hidden[rows]
            if x.shape[0] == 0:
                continue
            p = None if router is None else (router * picked).sum(dim=-1)[rows]
            target = None if twin is None else twin if self.all_experts else twin[rows]
            self.stats.inputs[first][e].add(x, p, target)
            if first != "down_proj" and "down_proj" in self.info.projections:
                self.stats.inputs["down_proj"][e].add(expert_intermediate(module, self.info, e, x), p)

    def remove(self) -> ExpertsStats:
        self._handle.remove()
        return self.stats


class ExpertsInputRecorder:
    """Records an experts module's input rows (`routed_rows`' `[M, H]`, on the CPU) per call while the model
    runs; `remove()` unhooks it and returns them in call order. With `routing`, each call's record is
    (rows, expert ids `[M, k]`, router weights `[M, k]` or None). Run on the float stream, it gives the
    float-stream targets an `ExpertsObserver(float_rows=...)` pairs with the quantized stream's calls."""

    def __init__(self, module: nn.Module, info: ExpertsModuleInfo, routing: bool = False):
        self.info, self.rows, self.routing = info, [], routing
        self._handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    @torch.no_grad()
    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, index = routed_rows(self.info, args, kwargs)
        if not self.routing:
            self.rows.append(hidden.detach().cpu())
            return
        weights = routed_weights(self.info, args, kwargs)  # None: the call convention has none (weight 1)
        self.rows.append((hidden.detach().cpu(), index.detach().cpu(), None if weights is None else weights.cpu()))

    def remove(self) -> list:
        """Unhook; the records in call order (rows, or (rows, expert ids, router weights) with `routing`)."""
        self._handle.remove()
        return self.rows


__all__ = ["ExpertsInputRecorder", "ExpertsObserver", "ExpertsStats", "InputStats", "expert_intermediate",
           "expert_weight_kn"]
