"""How many experts fit a memory budget (`--max-memory`), for packing and for streamed calibration.

The budget covers the expert data in flight, not the interpreter, torch, or the non-expert weights of the
current layer. Estimates are per expert and deliberately generous (float32 copies made while quantizing),
so a chunk never exceeds the budget by much; at least one expert is always processed.
"""

from __future__ import annotations

DEFAULT_MAX_MEMORY = "2GiB"


def pack_bytes_per_expert(k: int, n: int) -> int:
    """Round-to-nearest of one `[K, N]` expert: the read float weight, its float32 copy, the rounding
    temporaries and the dequantized check, about four float32 copies."""
    return 4 * 4 * k * n


def calibrate_bytes_per_expert(projections: dict[str, tuple[int, int]], hessian: bool) -> int:
    """Streamed calibration of one expert: its float weights (float32, plus the quantizer's copies) and,
    for GPTQ, one float32 `[K, K]` Hessian per projection (plus GPTQ's inverse)."""
    total = 0
    for k, n in projections.values():
        total += 4 * 4 * k * n
        if hessian:
            total += 2 * 4 * k * k
    return total


def experts_per_chunk(budget_bytes: int, bytes_per_expert: int, num_experts: int) -> int:
    """Experts per chunk: as many as the budget holds, at least 1, at most `num_experts`."""
    return max(1, min(num_experts, budget_bytes // max(1, bytes_per_expert)))


def chunk_bounds(num_experts: int, step: int) -> list[tuple[int, int]]:
    """`(first, count)` of each chunk of `step` experts. No chunk holds a single expert unless the module has
    one: a grouped matmul over one group is a form the kernel's spec rejects (group_list of length 1 with
    counts), so a lone last expert joins the chunk before it."""
    step = max(step, min(2, num_experts))
    bounds = [(first, min(step, num_experts - first)) for first in range(0, num_experts, step)]
    if len(bounds) > 1 and bounds[-1][1] == 1:
        first, count = bounds[-2]
        bounds[-2:] = [(first, count + 1)]
    return bounds


__all__ = ["DEFAULT_MAX_MEMORY", "calibrate_bytes_per_expert", "chunk_bounds", "experts_per_chunk", "pack_bytes_per_expert"]
