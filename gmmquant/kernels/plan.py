"""The validated, normalised form of one grouped-matmul call.

`contract.check_grouped_matmul` turns the npu_grouped_matmul arguments into a `GMMPlan`; every backend
consumes a plan and never looks at the raw arguments again. A plan describes the call as a list of
independent matmuls ("groups"): group g multiplies some rows of one x tensor by one 2-D weight slice.
Views are built lazily, only for the groups a backend actually computes, because a decode step touches
a handful of the 64-1024 groups.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor


class Mode(enum.Enum):
    """Which of the spec's formulas a call uses (DESIGN.md section 3)."""

    FLOAT = "float"  # y = x @ w + b
    QUANT_PER_CHANNEL = "per-channel full quant"  # y = (x @ w + b) * scale
    QUANT_PER_TOKEN = "per-token full quant"  # y = (x @ w + b) * scale * per_token_scale
    QUANT_INT32 = "int8 matmul, int32 output"  # y = x @ w (+ b), no scale
    ANTIQUANT = "weight-only quant"  # y = x @ ((w + antiquant_offset) * antiquant_scale) + b
    # int8 x, int4 w: y = ((x - 8) @ (w * scale) + b) * per_token_scale; b carries 8 * sum_k(w * scale)
    QUANT_A8W4 = "A8W4 full quant"


class Group(NamedTuple):
    """One matmul of the call (a NamedTuple: plans for 1024-expert layers build thousands per second).

    For M-axis grouping `start:stop` are rows of `x[x_index]`; for K-axis grouping (group_type 2) they
    are columns of x and rows of the weight. `expert` indexes dim 0 of a 3-D single weight (None for a
    list of 2-D weights).
    """

    x_index: int
    start: int
    stop: int
    w_index: int
    expert: Optional[int]

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Operands:
    """Tensors of one group, all views of the caller's tensors.

    x: [m, k]; weight: [k, n] (int4: int32 [k, n/8]); bias / scale: [n] (A8W4 scale: [n] or [G, n]); antiquant_scale /
    antiquant_offset: [n] (per-channel) or [G, n] (per-group); per_token_scale: [m] float32.
    """

    x: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    scale: Optional[Tensor]
    antiquant_scale: Optional[Tensor]
    antiquant_offset: Optional[Tensor]
    per_token_scale: Optional[Tensor]


@dataclass
class GMMPlan:
    """A grouped-matmul call that passed the contract.

    Attributes:
        mode: the formula.
        groups: the matmuls, in output order.
        out_dtype: dtype of every output tensor.
        act_type: activation applied to the output (0 none, 1 relu, 2 gelu_tanh, 4 fast_gelu, 5 silu).
        weight_bits: 4 (int32-packed int4), 8 (int8) or 16/32 (float).
        n: output width of each weight (logical N, also for packed int4), indexed by w_index.
        k: reduction depth of each weight, indexed by w_index.
        output: "multi" (one tensor per weight), "single" (rows concatenated) or "stacked" ([E, M, N],
            K-axis grouping).
        output_shapes: for "multi", the shape of each output tensor.
        x, weight: the lone x tensor / weight tensor of single-tensor calls (None otherwise), for
            backends with fused paths.
        experts_in_order: True when the listed groups are experts 0..E-1 of a single weight tiling x's rows
            in order, i.e. the call is exactly `grouped_mm(x, weight, offs)`; `group_sizes` then holds the
            rows of every expert (`groups` holds only the non-empty ones: empty groups of a single output
            are not planned).
        k_split: True for group_type 2.
    """

    mode: Mode
    groups: list[Group]
    out_dtype: torch.dtype
    act_type: int
    weight_bits: int
    n: list[int]
    k: list[int]
    output: str
    output_shapes: list[tuple[int, ...]]
    xs: list[Tensor]
    weights: list[Tensor]
    bias: Optional[list[Tensor]]
    scale: Optional[list[Tensor]]
    antiquant_scale: Optional[list[Tensor]]
    antiquant_offset: Optional[list[Tensor]]
    per_token_scale: Optional[list[Tensor]]
    x: Optional[Tensor] = None
    weight: Optional[Tensor] = None
    experts_in_order: bool = False
    group_sizes: Optional[list[int]] = None
    k_split: bool = False

    def operands(self, g: Group) -> Operands:
        """The tensors group `g` multiplies (views, no copies)."""
        x = self.xs[g.x_index]
        if self.k_split:
            x = x[:, g.start : g.stop]
        elif x.dim() != 2:
            x = x.reshape(-1, x.shape[-1])
        else:
            x = x[g.start : g.stop]
        w = self.weights[g.w_index]
        if g.expert is not None:
            w = w[g.expert]
        if self.k_split:
            w = w[g.start : g.stop]
        pts = None
        if self.per_token_scale is not None:
            pts = self.per_token_scale[g.x_index]
            pts = pts[g.start : g.stop] if self.x is not None else pts
        return Operands(
            x=x,
            weight=w,
            bias=self._param(self.bias, g),
            scale=self._param(self.scale, g),
            antiquant_scale=self._param(self.antiquant_scale, g),
            antiquant_offset=self._param(self.antiquant_offset, g),
            per_token_scale=pts,
        )

    @staticmethod
    def _param(values: Optional[Sequence[Tensor]], g: Group) -> Optional[Tensor]:
        if values is None:
            return None
        t = values[g.w_index]
        return t[g.expert] if g.expert is not None else t

    def _empty_result(self, g: Group) -> Tensor:
        x = self.xs[g.x_index]
        n = self.n[g.w_index]
        if self.k_split:  # a group with no K contributes x[:, :0] @ w[:0] = 0
            return torch.zeros(x.shape[0], n, dtype=self.out_dtype, device=x.device)
        return torch.empty(0, n, dtype=self.out_dtype, device=x.device)

    def assemble(self, results: list[Optional[Tensor]]) -> list[Tensor]:
        """Turn one 2-D result per group (None for an empty group) into the call's outputs."""
        if self.output == "multi":
            return [(r if r is not None else self._empty_result(g)).reshape(shape)
                    for r, g, shape in zip(results, self.groups, self.output_shapes)]
        if self.output == "stacked":
            return [torch.stack([r if r is not None else self._empty_result(g) for r, g in zip(results, self.groups)])]
        blocks = [r for r in results if r is not None]
        if not blocks:
            x = self.xs[0]
            return [torch.empty(0, self.n[0], dtype=self.out_dtype, device=x.device)]
        return [blocks[0] if len(blocks) == 1 else torch.cat(blocks)]
