"""GMM experts: a drop-in replacement for a transformers 5 fused experts module.

`GMMExperts.forward(hidden_states, top_k_index, top_k_weights)` has the signature of the module it
replaces (the MoE block's router stays the model's own). It sorts the token-expert pairs by expert, runs
gate_up and down as grouped matmuls over per-expert row counts (`group_list_type=1`, `group_type=0`,
`split_item=2`, as vllm-ascend does on NPU), applies the model's own gate / activation in between, and
scatters the rows back weighted by the routing weights. In expert-parallel modules, sentinel ids (>= E)
contribute 0; elsewhere an id >= E is an error.

Each projection is a `GMMProjection` submodule whose buffers carry the checkpoint names of docs/FORMAT.md
(`<path>.gate_up_proj.qweight`, `.antiquant_scale`, ...), so `state_dict()` is the checkpoint.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..kernels import dynamic_quant, grouped_matmul
from ..kernels.backends import cpu as cpu_backend
from ..pack import QuantizedWeight, QuantScheme
from ..pack.primitives import a8w4_kwargs, bias_dtype
from ..pack.format import ExpertsSpec
from ..pack.layouts import ExpertsModuleInfo, expert_bias, expert_weight, experts_of

_BUFFERS = ("qweight", "antiquant_scale", "antiquant_offset", "weight_scale", "input_scale", "smooth_scale", "bias")


def gate_function(source: nn.Module):
    """The experts module's own gate on a gate_up output: its `_apply_gate` (transformers 5 decorated
    modules, GPT-OSS's clamped SwiGLU), else `act_fn(gate) * up` on the two halves (llama4), else None (a
    lone projection, whose block applies the gate itself)."""
    apply_gate = getattr(source, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate
    act = getattr(source, "act_fn", None) or getattr(getattr(source, "mlp", None), "activation_fn", None)  # dbrx
    if act is None:
        return None
    return lambda h: act(h[..., : h.shape[-1] // 2]) * h[..., h.shape[-1] // 2 :]


class GMMProjection(nn.Module):
    """One projection of all experts, as grouped_matmul tensors.

    Float: `weight` is `[E, K, N]` (often a transposed view of HF's `[E, N, K]` parameter, which is what
    the CPU kernels want). Quantized: the buffers of a `QuantizedWeight` (+ optional bias / input_scale /
    smooth_scale), named as in the checkpoint format.
    """

    def __init__(self, scheme: Optional[QuantScheme], act_dtype: torch.dtype, backend: Optional[str] = None):
        super().__init__()
        self.scheme = scheme
        self.act_dtype = act_dtype
        self.backend = backend
        for name in _BUFFERS:
            self.register_buffer(name, None)
        self.weight: Optional[nn.Parameter] = None

    @classmethod
    def from_float(cls, weight_kn: Tensor, bias: Optional[Tensor], backend: Optional[str]) -> "GMMProjection":
        proj = cls(None, weight_kn.dtype, backend)
        proj.weight = nn.Parameter(weight_kn, requires_grad=False)  # shares the model's storage
        proj.register_buffer("bias", None if bias is None else bias.detach().to(bias_dtype(weight_kn.dtype)), persistent=False)
        return proj

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, act_dtype: torch.dtype, bias: Optional[Tensor] = None,
                       backend: Optional[str] = None, **extra: Optional[Tensor]) -> "GMMProjection":
        proj = cls(qw.scheme, act_dtype, backend)
        proj.register_buffer("qweight", qw.qweight)
        if qw.scheme.weight_only:
            proj.register_buffer("antiquant_scale", qw.scale)
            proj.register_buffer("antiquant_offset", qw.offset)
        else:
            proj.register_buffer("weight_scale", qw.scale)
        proj.register_buffer("bias", None if bias is None else bias.to(bias_dtype(act_dtype)))
        for name, t in extra.items():
            proj.register_buffer(name, t)
        return proj

    @classmethod
    def empty(cls, spec: "ExpertsSpec", proj: str, device: "str | torch.device" = "meta",
              backend: Optional[str] = None) -> "GMMProjection":
        """A projection with uninitialised buffers of the checkpoint's names, dtypes and shapes (to be loaded)."""
        out = cls(spec.scheme, spec.act_dtype, backend)
        prefix = f"{spec.prefix}.{proj}."
        for name, (dtype, shape) in spec.expected_tensors().items():
            if name.startswith(prefix):
                out.register_buffer(name[len(prefix):], torch.empty(shape, dtype=dtype, device=device))
        return out

    def forward(self, x: Tensor, counts: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        """`[S, K]` rows sorted by expert, `counts` int64 `[E]` -> `[S, N]`.

        With `rows` (int64 `[S]`), x is `[T, K]` and the input rows are `x[rows]`: a per-token dynamic
        quantization then runs on the T distinct tokens before the gather instead of on their S = T * top_k
        copies (row-wise, so the result is the same bit for bit).
        """
        common = dict(group_list=counts, group_list_type=1, group_type=0, split_item=2, backend=self.backend)
        bias = None if self.bias is None else [self.bias]
        if rows is not None and self._quantizes_per_token():
            xq, pts = dynamic_quant(x.to(self.act_dtype))
            return self._full_quant(xq[rows], pts[rows], bias, common)
        if rows is not None:
            x = x[rows]
        if self.scheme is None:
            return grouped_matmul([x.to(self.weight.dtype)], [self.weight], bias=bias, **common)[0]
        x = x.to(self.act_dtype)
        if self.scheme.weight_only:
            offset = None if self.antiquant_offset is None else [self.antiquant_offset]
            return grouped_matmul([x], [self.qweight], antiquant_scale=[self.antiquant_scale],
                                  antiquant_offset=offset, bias=bias, **common)[0]
        if self.scheme.activation == "static":
            row_scale = torch.repeat_interleave(self.input_scale, counts, output_size=x.shape[0])
            xq = torch.round(x.float() / row_scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
            pts = row_scale
        elif self.smooth_scale is not None:
            ends = counts.cumsum(0).to(torch.int32)
            xq, pts = dynamic_quant(x, smooth_scales=self.smooth_scale, group_index=ends)
        else:
            xq, pts = dynamic_quant(x)
        return self._full_quant(xq, pts, bias, common)

    def _quantizes_per_token(self) -> bool:
        """True when the input is quantized token by token with nothing expert-specific (no smooth scales)."""
        return self.scheme is not None and self.scheme.activation == "dynamic" and self.smooth_scale is None

    def _full_quant(self, xq: Tensor, pts: Tensor, bias: Optional[list[Tensor]], common: dict) -> Tensor:
        if self.scheme.a8w4:  # int64 scale + the mode's scale_bias, derived from the stored tensors once
            return grouped_matmul([xq], [self.qweight], per_token_scale=[pts], output_dtype=self.act_dtype,
                                  **self._a8w4_kwargs(), **common)[0]
        return grouped_matmul([xq], [self.qweight], scale=[self.weight_scale], per_token_scale=[pts], bias=bias,
                              output_dtype=self.act_dtype, **common)[0]

    def _a8w4_kwargs(self) -> dict[str, list[Tensor]]:
        """`scale` (int64) and `bias` (float32 scale_bias) of the A8W4 call, cached while the stored tensors stay."""
        key = (self.qweight, self.weight_scale)
        cached = getattr(self, "_a8w4_cache", None)
        if cached is None or cached[0][0] is not key[0] or cached[0][1] is not key[1]:
            cached = (key, a8w4_kwargs(self.qweight, self.weight_scale))
            self._a8w4_cache = cached
        return cached[1]

    def prepare(self) -> None:
        """Load-time work for the cpu backend: int8 weights move to `[E, N, K]` storage (still an `[E, K, N]`
        view, the layout its int8 kernels read without a copy); weight-only experts are prepacked for the
        fused decode kernels (`kernels.prepack_for_cpu`) now rather than on their first routed tokens."""
        if self.qweight is not None and self.qweight.dtype == torch.int8 and self.qweight.stride(-1) == 1:
            self.qweight = self.qweight.transpose(1, 2).contiguous().transpose(1, 2)
        if self.scheme is not None and self.scheme.weight_only:  # callers run this on the cpu backend only
            cpu_backend.prepack(self.qweight, self.antiquant_scale, self.antiquant_offset)
            return
        e = (self.weight if self.scheme is None else self.qweight).shape[0]
        k = (self.weight if self.scheme is None else self.qweight).shape[1]
        device = (self.weight if self.scheme is None else self.qweight).device
        dtype = self.weight.dtype if self.scheme is None else self.act_dtype
        with torch.no_grad():
            self(torch.zeros(e, k, dtype=dtype, device=device), torch.ones(e, dtype=torch.int64, device=device))

    def nbytes(self) -> int:
        tensors = [self.weight] + [getattr(self, n) for n in _BUFFERS]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class GMMExperts(nn.Module):
    """Replacement for a fused experts module; see the module docstring."""

    def __init__(self, source: nn.Module, info: ExpertsModuleInfo, projections: dict[str, GMMProjection],
                 canonical_order: bool):
        super().__init__()
        self.num_experts = info.num_experts
        self.info = info
        self.has_gate = "gate_up_proj" in info.projections
        for name, proj in projections.items():
            self.add_module(name, proj)
        # The model's own gate / activation (GPT-OSS clamps, custom _apply_gate, ...), without its weights.
        if info.linear_names:  # per-expert MLPs: act(gate) * up (or act(up)) with the experts' own activation
            first_expert = experts_of(source)[0]
            act = getattr(first_expert, "act_fn", None) or first_expert.act
            self._gate_fn = (lambda h: act(h[..., : h.shape[-1] // 2]) * h[..., h.shape[-1] // 2 :]) if self.has_gate else act
        else:
            self._gate_fn = gate_function(source) if self.has_gate else getattr(source, "act_fn", None)
        # Quantized gate_up columns are gate-then-up; a model whose _apply_gate expects them interleaved
        # gets them re-interleaved (a gather on the [S, 2I] intermediate, not on weights).
        self._reinterleave = canonical_order and self.has_gate and not info.is_concatenated
        # transformers marks modules it shards across ranks; sentinel ids then appear (see forward).
        self.expert_parallel = bool(getattr(source, "_is_expert_parallel", False))
        norm = getattr(source, "post_expert_norm", None) if getattr(source, "has_post_expert_norm", False) else None
        self.post_expert_norm = norm

    def _gate(self, h: Tensor) -> Tensor:
        if self._reinterleave:
            half = h.shape[-1] // 2
            h = torch.stack([h[..., :half], h[..., half:]], dim=-1).reshape(h.shape)
        return self._gate_fn(h)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """`[T, H]`, `[T, k]` expert ids, `[T, k]` weights -> `[T, H]` (any leading dims instead of T: dbrx
        passes `[B, S, H]` and gets that shape back)."""
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])
        num_tokens, hidden = hidden_states.shape
        top_k = top_k_index.shape[-1]
        top_k_index, top_k_weights = top_k_index.reshape(num_tokens, top_k), top_k_weights.reshape(num_tokens, top_k)
        ids = top_k_index.reshape(-1)
        ids_sorted, perm = torch.sort(ids, stable=True)
        if self.expert_parallel:
            # Ids >= E (experts of other ranks) sort to the tail and must not reach the kernel. Counting them
            # is the one host sync of the forward, so only expert-parallel modules pay for it.
            valid = int((ids_sorted < self.num_experts).sum())
            perm, ids_sorted = perm[:valid], ids_sorted[:valid]
        counts = torch.bincount(ids_sorted, minlength=self.num_experts)
        first = self.gate_up_proj if self.has_gate else self.up_proj
        h = self._gate(first(hidden_states, counts, rows=perm // top_k))
        h = self.down_proj(h, counts)
        if self.post_expert_norm is not None:
            h = self.post_expert_norm(h)
        h = h * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(h.dtype)
        out = h.new_zeros(num_tokens * top_k, hidden)
        out[perm] = h
        return out.view(num_tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype).view(shape)

    def projections(self) -> list[GMMProjection]:
        return [m for m in self.children() if isinstance(m, GMMProjection)]

    def prepare(self) -> None:
        """Load-time work of the backend (repacking) for every expert; see GMMProjection.prepare."""
        for proj in self.projections():
            proj.prepare()

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.projections())


class _ExpertView:
    """`experts[e]` of a GMMExpertList: expert e's MLP as one grouped matmul group."""

    def __init__(self, experts: "GMMExpertList", index: int):
        self.experts, self.index = experts, index

    def __call__(self, x: Tensor) -> Tensor:
        counts = torch.zeros(self.experts.num_experts, dtype=torch.int64, device=x.device)
        counts[self.index] = x.shape[0]
        h = self.experts._gate(self.experts.gate_up_proj(x, counts))
        return self.experts.down_proj(h, counts).to(x.dtype)


class GMMExpertList(GMMExperts):
    """Replacement for an `nn.ModuleList` of per-expert MLPs (remote-code / transformers 4 layout).

    The model's own MoE loop keeps working (`experts[e](x)`, `len(experts)`, iteration), each expert call
    being one grouped matmul group on the quantized weights; the fused `forward(hidden, top_k_index,
    top_k_weights)` is also available for blocks that can use it.
    """

    def __getitem__(self, index: int) -> _ExpertView:
        if not -self.num_experts <= index < self.num_experts:
            raise IndexError(f"expert {index} out of range (E={self.num_experts})")
        return _ExpertView(self, index % self.num_experts)

    def __len__(self) -> int:
        return self.num_experts

    def __iter__(self):
        return (self[e] for e in range(self.num_experts))


def float_projections(source: nn.Module, info: ExpertsModuleInfo, backend: Optional[str]) -> dict[str, GMMProjection]:
    """Projections that run the module's float weights through grouped_matmul (original column order;
    views of fused parameters, a stacked copy for a ModuleList)."""
    out = {}
    for proj in info.projections:
        if info.linear_names or info.stack:  # a stacked copy
            weight, bias = expert_weight(source, info, proj).detach().contiguous(), expert_bias(source, info, proj)
        else:
            param = getattr(source, info.param(proj))[: info.num_experts]
            weight = param if info.is_transposed else param.transpose(-1, -2)
            bias = getattr(source, f"{proj}_bias", None) if info.has_bias else None
        out[proj] = GMMProjection.from_float(weight, bias, backend)
    return out


__all__ = ["GMMExpertList", "GMMExperts", "GMMProjection", "float_projections", "gate_function"]
