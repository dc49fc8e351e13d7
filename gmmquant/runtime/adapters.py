"""GMM replacements for experts modules that are not called like transformers 5's fused experts.

`GMMExperts` replaces a module called as `experts(hidden, top_k_index, top_k_weights)`. Two other calls
exist in transformers (ExpertsModuleInfo.call, pack/layouts.py):

- "dense" (llama4): the MoE block repeats the tokens once per expert, scales each copy by that expert's
  router score (0 for experts not in the token's top-k) and calls `experts(routed_in [E*T, H])`, which runs
  every expert on every row. `GMMDenseExperts` runs only the rows with a non-zero score through the grouped
  matmul (a zero row's output is exactly zero: no biases) and leaves zeros elsewhere.
- "sorted" (jetmoe): each projection is its own module, called with rows already sorted by expert and the
  per-expert row counts, `proj(inputs, expert_size)`; the block applies the gate. `GMMSortedProjection`
  is that call on one GMM projection (counts are the group_list).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..pack.layouts import ExpertsModuleInfo
from .experts import GMMExpertList, GMMExperts, GMMProjection


class GMMDenseExperts(GMMExperts):
    """Replacement for llama4's `Llama4TextExperts` (see the module docstring)."""

    def forward(self, routed_in: Tensor) -> Tensor:  # type: ignore[override]
        """`[E*T, H]` rows (expert-major, router-scaled) -> `[E*T, H]`."""
        rows = routed_in.shape[0]
        routed = routed_in.reshape(self.num_experts, rows // self.num_experts, -1).ne(0).any(dim=-1)  # [E, T]
        counts = routed.sum(dim=1)
        index = routed.reshape(-1).nonzero().squeeze(-1)
        first = self.gate_up_proj if self.has_gate else self.up_proj
        h = self.down_proj(self._gate(first(routed_in[index], counts)), counts)
        out = routed_in.new_zeros(rows, h.shape[-1])
        out[index] = h.to(out.dtype)
        return out


class GMMIdentityExperts(GMMExperts):
    """Replacement for longcat_flash's experts: E routed experts on GMM, and "zero-computation" experts
    (ids >= E) whose output is the token itself times its routing weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.expert_parallel = True  # ids >= E are dropped from the grouped matmul (added back below)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = super().forward(hidden_states, top_k_index, top_k_weights)
        identity = (top_k_weights * (top_k_index >= self.num_experts)).sum(dim=-1, keepdim=True)
        return out + (hidden_states * identity.to(hidden_states.dtype))


class GMMSortedProjection(GMMExperts):
    """Replacement for one `...ParallelExperts` projection (jetmoe), see the module docstring."""

    def forward(self, inputs: Tensor, expert_size: "Sequence[int] | Tensor") -> Tensor:  # type: ignore[override]
        counts = torch.as_tensor(expert_size, dtype=torch.int64, device=inputs.device)
        (proj,) = self.projections()
        return proj(inputs, counts).to(inputs.dtype)


class GMMDictExperts(GMMExperts):
    """Replacement for an nn.ModuleDict of `expert_{i}` MLPs without a gate: switch_transformers (called
    with a one-hot selection `[T, k, E]`, all zeros for tokens over an expert's capacity) and nllb-moe
    (expert ids `[T, k]`, outputs scaled by `1 - moe_token_dropout` in eval mode, as the model does)."""

    def __init__(self, source: nn.Module, info: ExpertsModuleInfo, projections: dict[str, GMMProjection],
                 canonical_order: bool):
        super().__init__(source, info, projections, canonical_order)
        self.expert_parallel = True  # tokens dropped by capacity get the sentinel id E and contribute 0
        self.output_scale = 1.0 - float(getattr(source, "moe_token_dropout", 0.0) or 0.0)
        self.train(source.training)  # the scaling is an eval-mode one: keep the replaced module's mode

    def forward(self, hidden_states: Tensor, selection: Tensor, weights: Tensor) -> Tensor:  # type: ignore[override]
        if selection.dim() == 3:  # one-hot [T, k, E]
            ids = torch.where(selection.any(dim=-1), selection.int().argmax(dim=-1), self.num_experts)
        else:
            ids = selection
        out = super().forward(hidden_states, ids, weights.reshape(ids.shape))
        return out * self.output_scale if self.output_scale != 1.0 and not self.training else out


def gmm_experts(source: nn.Module, info: ExpertsModuleInfo, projections: dict[str, GMMProjection],
                canonical_order: bool) -> GMMExperts:
    """The GMM module replacing `source`, for its call convention (info.call) and layout."""
    if info.call == "dict":
        return GMMDictExperts(source, info, projections, canonical_order)
    if info.linear_names:
        return GMMExpertList(source, info, projections, canonical_order)
    cls = {"routed": GMMExperts, "routed+identity": GMMIdentityExperts, "dense": GMMDenseExperts,
           "sorted": GMMSortedProjection}[info.call]
    return cls(source, info, projections, canonical_order)


# Call conventions whose experts receive the router weights (transformers 5's forward(hidden_states,
# top_k_index, top_k_weights)); the others get rows already scaled, or are weighted outside the module.
ROUTER_WEIGHTED_CALLS = ("routed", "routed+identity")
_ROUTED_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


def _bind_routed(args: tuple, kwargs: dict) -> dict:
    """The routed call's arguments by name (positional or keyword)."""
    return dict(zip(_ROUTED_ARGS, args)) | {k: v for k, v in kwargs.items() if k in _ROUTED_ARGS}


def routed_rows(info: ExpertsModuleInfo, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    """From an experts module's call arguments: (rows `[M, H]`, expert ids `[M, k]`), as the observers of
    calibration see them. "dense": the rows with a non-zero router score (already scaled by it, which is
    what llama4's experts compute on), one expert each; "sorted": the sorted rows and their expert ids."""
    if info.call == "dict":
        selection = args[1] if len(args) > 1 else next(iter(v for k, v in kwargs.items() if k != "hidden_states"))
        hidden = args[0] if args else kwargs["hidden_states"]
        if selection.dim() == 3:
            return hidden, torch.where(selection.any(dim=-1), selection.int().argmax(dim=-1), info.num_experts)
        return hidden, selection
    if info.call in ROUTER_WEIGHTED_CALLS:
        bound = _bind_routed(args, kwargs)
        return bound["hidden_states"], bound["top_k_index"]
    if info.call == "dense":
        routed_in = args[0] if args else kwargs["hidden_states"]
        per_expert = routed_in.reshape(info.num_experts, -1, routed_in.shape[-1])
        mask = per_expert.ne(0).any(dim=-1)  # [E, T]
        ids = torch.arange(info.num_experts, device=routed_in.device).unsqueeze(1).expand_as(mask)
        return per_expert[mask], ids[mask].unsqueeze(-1)
    inputs = args[0] if args else kwargs["inputs"]
    expert_size = args[1] if len(args) > 1 else kwargs["expert_size"]
    counts = torch.as_tensor(expert_size, dtype=torch.int64, device=inputs.device)
    ids = torch.repeat_interleave(torch.arange(info.num_experts, device=inputs.device), counts)
    return inputs, ids.unsqueeze(-1)


def routed_weights(info: ExpertsModuleInfo, args: tuple, kwargs: dict) -> Optional[Tensor]:
    """The router weights `[M, k]` float32 of `routed_rows`' rows and expert ids, for the call conventions
    that pass them to the experts (transformers 5's `forward(hidden_states, top_k_index, top_k_weights)`);
    None for the others (their rows are already scaled, or the weights are applied outside the module)."""
    if info.call not in ROUTER_WEIGHTED_CALLS:
        return None
    weights = _bind_routed(args, kwargs).get("top_k_weights")
    return None if weights is None else weights.detach().float()


__all__ = ["GMMDenseExperts", "GMMDictExperts", "GMMIdentityExperts", "GMMSortedProjection", "ROUTER_WEIGHTED_CALLS",
           "gmm_experts", "routed_rows", "routed_weights"]
