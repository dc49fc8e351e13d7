"""The fastest alternatives to gmmquant's experts that PyTorch offers on CPU, for bench_moe's columns.

Each is a drop-in `experts` module for a transformers MoE block (forward(hidden, top_k_index,
top_k_weights)), routing exactly as gmmquant's runtime does, then looping over the experts that got tokens:
- `Int4PackLoop`: `aten._weight_int4pack_mm_for_cpu` on weights repacked once (symmetric int4, group 128);
- `FbgemmDynamicLoop`: `torch.ao` dynamic int8 Linear (fbgemm / oneDNN int8 GEMM, per-token activations);
- `DequantBf16Loop`: int8 weights dequantized to bf16 per call, then one bf16 GEMM per expert.
Also `read_bandwidth_gbs()`, the memory floor's denominator.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn


def _route(hidden: torch.Tensor, top_k_index: torch.Tensor):
    top_k = top_k_index.shape[-1]
    ids_sorted, perm = torch.sort(top_k_index.reshape(-1), stable=True)
    counts = torch.bincount(ids_sorted, minlength=0).tolist()
    return hidden[perm // top_k], perm, counts


def _combine(h: torch.Tensor, perm: torch.Tensor, top_k_weights: torch.Tensor, num_tokens: int, hidden: int) -> torch.Tensor:
    top_k = top_k_weights.shape[-1]
    h = h * top_k_weights.reshape(-1)[perm].unsqueeze(-1).to(h.dtype)
    out = h.new_zeros(num_tokens * top_k, hidden)
    out[perm] = h
    return out.view(num_tokens, top_k, hidden).sum(dim=1)


class _Loop(nn.Module):
    def __init__(self, experts: nn.Module):
        super().__init__()
        self.act = experts.act_fn
        self.num_experts = experts.gate_up_proj.shape[0]

    def project(self, which: str, e: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        x, perm, counts = _route(hidden, top_k_index)
        outs, start = [], 0
        for e, c in enumerate(counts):
            if c:
                gu = self.project("gate_up", e, x[start:start + c])
                gate, up = gu.chunk(2, dim=-1)
                outs.append(self.project("down", e, self.act(gate) * up))
                start += c
        return _combine(torch.cat(outs), perm, top_k_weights, hidden.shape[0], hidden.shape[1])


def _int_rtn(w: torch.Tensor, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric RTN of `[N, K]`: (int values `[N, K]`, scales `[N, K/group]` or `[N, 1]`)."""
    qmax = 2 ** (bits - 1) - 1
    wg = w.float().reshape(w.shape[0], -1, group or w.shape[1])
    scale = (wg.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=1e-8)
    q = torch.round(wg / scale).clamp(-qmax - 1, qmax)
    return q.reshape(w.shape).to(torch.int8), scale.squeeze(-1)


class Int4PackLoop(_Loop):
    def __init__(self, experts: nn.Module, group: int = 128):
        super().__init__(experts)
        self.group = group
        self.packed: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for which, stack in (("gate_up", experts.gate_up_proj), ("down", experts.down_proj)):
            for e in range(self.num_experts):
                q, s = _int_rtn(stack[e].data, 4, group)  # HF stores [N, K]
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.int() + 8).contiguous(), 1)
                table = torch.stack([s.t(), torch.zeros_like(s.t())], dim=-1).to(torch.bfloat16).contiguous()  # symmetric: zero 0
                self.packed[(which, e)] = (packed, table)

    def project(self, which, e, x):
        packed, table = self.packed[(which, e)]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, self.group, table)


class FbgemmDynamicLoop(_Loop):
    def __init__(self, experts: nn.Module):
        super().__init__(experts)
        self.linears = nn.ModuleDict()
        for which, stack in (("gate_up", experts.gate_up_proj), ("down", experts.down_proj)):
            for e in range(self.num_experts):
                lin = nn.Linear(stack.shape[2], stack.shape[1], bias=False)
                lin.weight.data = stack[e].data.float()
                self.linears[f"{which}{e}"] = lin
        self.linears = torch.ao.quantization.quantize_dynamic(self.linears, {nn.Linear}, dtype=torch.qint8)

    def project(self, which, e, x):
        return self.linears[f"{which}{e}"](x.float()).to(x.dtype)


class DequantBf16Loop(_Loop):
    def __init__(self, experts: nn.Module):
        super().__init__(experts)
        self.q: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for which, stack in (("gate_up", experts.gate_up_proj), ("down", experts.down_proj)):
            for e in range(self.num_experts):
                q, s = _int_rtn(stack[e].data, 8, None)
                self.q[(which, e)] = (q, s.to(torch.bfloat16))

    def project(self, which, e, x):
        q, s = self.q[(which, e)]
        return F.linear(x, q.to(torch.bfloat16) * s)


ALTERNATIVES = {"aten int4pack loop": Int4PackLoop, "fbgemm int8 dynamic": FbgemmDynamicLoop, "dequant+bf16 mm (int8)": DequantBf16Loop}


def read_bandwidth_gbs(mib: int = 512, reps: int = 5) -> float:
    """Median GB/s of summing a `mib` MiB buffer (a read-only stream, as a decode step's weights).

    float32: its sum is vectorized and memory-bound; an int8 sum into int32 is compute-bound (~1 GB/s on
    2 cores) and would understate the bandwidth, and so the floor, by 20x.
    """
    buf = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    buf.sum()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    times.sort()
    return mib * 2**20 / times[len(times) // 2] / 1e9
