"""One MoE layer's grouped matmul on this CPU: HF's bf16 F.grouped_mm vs W8A16 / W4A16-g128 via grouped_matmul.

Usage: python benchmarks/bench_gmm.py [--shapes small,qwen3] [--tokens 1,16,128,1024,4096] [--reps 20]

Prints one table: median milliseconds per call for each scheme, and its speedup over the bf16 baseline
measured in the same run, the variants timed round-robin (timing here is noisy; ratios within one run are
what to compare). Rows are routed
to experts uniformly at random, so M=1 touches one expert and M=4096 touches all of them.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from gmmquant.kernels import grouped_matmul, pack_int4
from timing import interleaved_medians

SHAPES = {"small": (64, 1024, 1024), "qwen3": (128, 2048, 1536)}  # (E, K, N); qwen3 = Qwen3-30B-A3B gate_up


def make_layer(experts: int, k: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(experts, k, n, generator=g) / k**0.5
    # HF keeps expert weights as [E, N, K] and hands grouped_mm the transposed view: the baseline does too.
    w_bf16 = w.transpose(1, 2).contiguous().to(torch.bfloat16).transpose(1, 2)
    s8 = w.abs().amax(dim=1) / 127
    q8 = torch.round(w / s8.unsqueeze(1)).clamp(-128, 127).to(torch.int8)
    groups = k // 128
    wg = w.reshape(experts, groups, 128, n)
    s4 = wg.abs().amax(dim=2) / 7
    q4 = torch.round(wg / s4.unsqueeze(2)).clamp(-8, 7).to(torch.int8).reshape(experts, k, n)
    return dict(
        bf16=w_bf16,
        w8=q8, s8=s8.to(torch.bfloat16),
        w4=pack_int4(q4), s4=s4.to(torch.bfloat16),
    )


def route(m: int, experts: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bincount(torch.randint(0, experts, (m,), generator=g), minlength=experts).to(torch.int64)


def bench_shape(name: str, experts: int, k: int, n: int, tokens: list[int], reps: int) -> list[tuple]:
    layer = make_layer(experts, k, n)
    rows = []
    for m in tokens:
        # A fresh routing per timed call, as in decode: the experts hit change from step to step, so their
        # weights stream from memory instead of sitting warm in the cache.
        routes = [route(m, experts, seed=i) for i in range(reps)]
        offs = [c.cumsum(0).to(torch.int32) for c in routes]
        x = torch.randn(m, k).to(torch.bfloat16)
        common = dict(group_list_type=1, group_type=0, split_item=2, backend="cpu")

        def bf16(i):
            return F.grouped_mm(x, layer["bf16"], offs=offs[i])

        def w8(i):
            return grouped_matmul([x], [layer["w8"]], antiquant_scale=[layer["s8"]], group_list=routes[i], **common)

        def w4(i):
            return grouped_matmul([x], [layer["w4"]], antiquant_scale=[layer["s4"]], group_list=routes[i], **common)

        # Warm-up: one call with every expert hit builds the per-expert repack caches (a load-time cost).
        all_experts = torch.full((experts,), 1, dtype=torch.int64)
        xw = torch.randn(experts, k).to(torch.bfloat16)
        grouped_matmul([xw], [layer["w8"]], antiquant_scale=[layer["s8"]], group_list=all_experts, **common)
        grouped_matmul([xw], [layer["w4"]], antiquant_scale=[layer["s4"]], group_list=all_experts, **common)
        budget = 120.0 if m >= 1024 else 30.0
        t = interleaved_medians({"bf16": bf16, "w8": w8, "w4": w4}, reps, budget)
        t_bf16, t_w8, t_w4 = t["bf16"], t["w8"], t["w4"]
        hit = statistics.median(int((c > 0).sum()) for c in routes)
        rows.append((name, experts, k, n, m, hit, t_bf16, t_w8, t_w4))
        print(f"  {name} M={m}: bf16 {t_bf16:.2f} ms, w8a16 {t_w8:.2f} ms, w4a16-g128 {t_w4:.2f} ms", flush=True)
    mib = 2**20
    print(f"  {name} expert weights: bf16 {layer['bf16'].numel() * 2 / mib:.0f} MiB, "
          f"int8 {layer['w8'].numel() / mib:.0f} MiB, int4 {layer['w4'].numel() * 4 / mib:.0f} MiB (+ scales)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="small,qwen3")
    parser.add_argument("--tokens", default="1,16,128,1024,4096")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for name in args.shapes.split(","):
        rows += bench_shape(name, *SHAPES[name], tokens, args.reps)
    print()
    print("| layer (E, K, N) | M | experts hit | bf16 grouped_mm ms | W8A16 ms | W8A16 speedup | W4A16-g128 ms | W4A16 speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, e, k, n, m, hit, tb, t8, t4 in rows:
        print(f"| {name} ({e}, {k}, {n}) | {m} | {hit} | {tb:.2f} | {t8:.2f} | {tb / t8:.2f}x | {t4:.2f} | {tb / t4:.2f}x |")


if __name__ == "__main__":
    main()
