"""The `gmmquant` command line."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Optional

import torch

from .kernels import grouped_matmul, pack_int4, select_backend, trans_quant_param


def _selftest_calls(experts: int, k: int, n: int, counts: list[int]) -> dict[str, Callable[[], dict]]:
    """One representative MoE call per kernel mode (random data, empty experts included)."""
    m = sum(counts)
    g = torch.Generator().manual_seed(0)
    gl = torch.tensor(counts, dtype=torch.int64)
    common = dict(group_list=gl, group_list_type=1, group_type=0, split_item=2)
    bf16 = torch.bfloat16

    def x_bf16():
        return [torch.randn(m, k, generator=g).to(bf16)]

    def int8(*shape):
        return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)

    return {
        "bf16": lambda: dict(x=x_bf16(), weight=[(torch.randn(experts, k, n, generator=g) / k**0.5).to(bf16)], **common),
        "w8a16": lambda: dict(x=x_bf16(), weight=[int8(experts, k, n)],
                              antiquant_scale=[(torch.rand(experts, n, generator=g) * 1e-3).to(bf16)], **common),
        "w4a16-g128": lambda: dict(x=x_bf16(), weight=[pack_int4(torch.randint(-8, 8, (experts, k, n), generator=g, dtype=torch.int8))],
                                   antiquant_scale=[(torch.rand(experts, k // 128, n, generator=g) * 1e-2).to(bf16)],
                                   antiquant_offset=[torch.randn(experts, k // 128, n, generator=g).to(bf16)], **common),
        "w8a8-dynamic": lambda: dict(x=[int8(m, k)], weight=[int8(experts, k, n)],
                                     scale=[(torch.rand(experts, n, generator=g) * 1e-4).to(bf16)],
                                     per_token_scale=[torch.rand(m, generator=g) * 1e-2], output_dtype=bf16, act_type=5, **common),
        "w8a8-int8-out": lambda: dict(x=[int8(m, k)], weight=[int8(experts, k, n)],
                                      scale=[trans_quant_param(torch.full((experts * n,), 1e-3)).reshape(experts, n)], **common),
    }


def cmd_selftest(args: argparse.Namespace) -> int:
    """Run each kernel mode on the chosen backend and the reference backend; print agreement and time."""
    counts = [3, 0, 7, 1, 0, 5, 16, 0]
    calls = _selftest_calls(len(counts), args.k, args.n, counts)
    backend = args.backend or select_backend([torch.empty(0)])
    print(f"gmmquant selftest: backend {backend!r} vs 'reference', E={len(counts)} K={args.k} N={args.n} M={sum(counts)}")
    print(f"{'mode':<16}{'out dtype':<12}{'max |diff|':>12}{'max |ref|':>12}{'ms':>9}")
    failures = 0
    for name, build in calls.items():
        kwargs = build()
        ref = grouped_matmul(backend="reference", **kwargs)[0]
        start = time.perf_counter()
        out = grouped_matmul(backend=backend, **kwargs)[0]
        ms = (time.perf_counter() - start) * 1e3
        diff = float((out.double() - ref.double()).abs().max()) if out.numel() else 0.0
        top = float(ref.double().abs().max()) if ref.numel() else 0.0
        ok = diff <= 1.0 if out.dtype == torch.int8 else diff <= 2e-2 * max(top, 1.0)
        failures += not ok
        print(f"{name:<16}{str(out.dtype).replace('torch.', ''):<12}{diff:>12.3e}{top:>12.3e}{ms:>9.2f}{'' if ok else '  MISMATCH'}")
    print("all modes agree" if not failures else f"{failures} mode(s) disagree")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmmquant", description="Quantized MoE experts on grouped-matmul kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("selftest", help="check every grouped-matmul mode of a backend against the reference formulas")
    p.add_argument("--backend", choices=["reference", "cpu", "cuda", "npu"], default=None)
    p.add_argument("-k", type=int, default=256, help="reduction size K (multiple of 128)")
    p.add_argument("-n", type=int, default=256, help="output size N (multiple of 8)")
    p.set_defaults(func=cmd_selftest)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
