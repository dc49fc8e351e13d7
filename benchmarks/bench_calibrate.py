"""Peak memory of `gmmquant calibrate` (layer by layer, layers offloaded to disk) vs the whole model in memory.

Usage: python benchmarks/bench_calibrate.py [--layers 8] [--experts 64] [--hidden 1024] [--intermediate 512]
       [--recipe w4a16-g128-gptq] [--num-samples 16] [--seq-len 256]
       python benchmarks/bench_calibrate.py --source fp8 --shape deepseek-v3 --layers 1 [--experts 16]
       [--recipes w4a16-g128-gptq,w4a8-dynamic] [--pack-scheme w4a8-dynamic] [--max-memory 2GiB] [--keep DIR]

With --source (fp8 | mxfp4 | bf16) and --shape (deepseek-v3 | qwen3-30b-a3b | gpt-oss-20b): a synthetic
checkpoint of that model's real per-layer shapes in its shipped format (benchmarks/synthetic_sources.py;
vocabulary 4096), then `gmmquant pack --scheme PACK_SCHEME` and `gmmquant calibrate --recipe R` for each
recipe, streamed with `--max-memory`, each in a fresh subprocess sampled from /proc (peak RSS includes
mapped file pages). `--experts N` keeps N experts per layer with the real K and N (for GPTQ timings).

Builds a Qwen3-MoE checkpoint of the given shape on disk (bf16, sharded, with the built-in model's
tokenizer), then runs, each in a fresh subprocess whose memory is sampled from /proc (see bench_pack.py):
(1) `from_pretrained` of the bf16 model, the floor of any in-memory calibrator; (2) `gmmquant calibrate
--no-offload` (whole model in memory); (3) `gmmquant calibrate` (default: one decoder layer at a time).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_pack import BUILD, LOAD, dir_size, run_measured

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main_sources(args: argparse.Namespace) -> None:
    """The --source benchmark (see the module docstring)."""
    from synthetic_sources import SHAPES

    here = Path(__file__).parent
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-sources-"))
    src = tmp / f"{args.shape}-{args.source}-{args.layers}x{args.experts or 'all'}"
    try:
        if not src.exists():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(here / "synthetic_sources.py"), args.shape, args.source, str(args.layers),
                            str(args.experts or 0), str(src)], check=True)
            print(f"built {src} in {time.perf_counter() - t0:.0f} s: {dir_size(src) / 2**30:.2f} GiB on disk")
        runs = {}
        if args.pack_scheme:
            out = tmp / "packed"
            runs[f"pack {args.pack_scheme} (RTN)"] = run_measured(
                [sys.executable, "-m", "gmmquant.cli", "pack", str(src), "-o", str(out), "--scheme", args.pack_scheme,
                 "--max-memory", args.max_memory, "--overwrite"])
            print(f"packed: {dir_size(out) / 2**30:.2f} GiB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        for recipe in [r for r in args.recipes.split(",") if r]:
            out = tmp / f"cal-{Path(recipe).stem}"
            runs[f"calibrate {Path(recipe).stem}"] = run_measured(
                [sys.executable, "-m", "gmmquant.cli", "calibrate", str(src), "-o", str(out), "--recipe", recipe,
                 "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len), "--max-memory", args.max_memory,
                 "--overwrite"])
            shutil.rmtree(out, ignore_errors=True)
        model_type, full_layers, kw = SHAPES[args.shape]
        experts = args.experts or next(kw[k] for k in ("n_routed_experts", "num_experts", "num_local_experts") if k in kw)
        print()
        print(f"{args.shape} ({model_type}) {args.source}: {args.layers} layer(s) x {experts} experts, real per-layer shapes, "
              f"vocabulary 4096; --max-memory {args.max_memory}; calibration {args.num_samples} x {args.seq_len} tokens; "
              f"full model: {full_layers} layers")
        print("| job | rc | peak RSS GiB | peak anonymous GiB | wall s |")
        print("|---|---:|---:|---:|---:|")
        for name, r in runs.items():
            print(f"| {name} | {r['rc']} | {r['rss_mib'] / 1024:.2f} | {r['anon_mib'] / 1024:.2f} | {r['seconds']:.1f} |")
        for name, r in runs.items():
            if r["rc"] != 0:
                print(f"{name} failed: {r['stderr']}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=["fp8", "mxfp4", "bf16"], default=None)
    parser.add_argument("--shape", choices=["deepseek-v3", "qwen3-30b-a3b", "gpt-oss-20b"], default="deepseek-v3")
    parser.add_argument("--recipes", default="w4a16-g128-gptq,w4a8-dynamic")
    parser.add_argument("--pack-scheme", default="w4a8-dynamic")
    parser.add_argument("--max-memory", default="2GiB")
    parser.add_argument("--keep", default=None, help="build / reuse the synthetic checkpoint in this directory (not removed)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--recipe", default="w4a16-g128-gptq")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    if args.source:
        return main_sources(args)
    args.experts = args.experts or 64
    from gmmquant.builtin import builtin_model_path

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", BUILD, str(args.layers), str(args.experts), str(args.hidden),
                        str(args.intermediate), str(src), "4096"], check=True, capture_output=True)
        for name in TOKENIZER_FILES:  # the built-in model's tokenizer (vocabulary 4096, as built above)
            if (builtin_model_path() / name).is_file():
                shutil.copy(builtin_model_path() / name, src / name)
        print(f"built {src} in {time.perf_counter() - t0:.0f} s: {dir_size(src) / 2**20:.0f} MiB on disk")
        common = ["--recipe", args.recipe, "--num-samples", str(args.num_samples), "--seq-len", str(args.seq_len)]
        runs = {"transformers from_pretrained (bf16)": run_measured([sys.executable, "-c", LOAD, str(src)])}
        for label, extra in (("gmmquant calibrate --no-offload (whole model)", ["--no-offload"]),
                             ("gmmquant calibrate (layer by layer, offloaded)", [])):
            out = Path(tmp) / f"out{len(runs)}"
            runs[label] = run_measured([sys.executable, "-m", "gmmquant.cli", "calibrate", str(src), "-o", str(out), *common, *extra])
        for name, r in runs.items():
            assert r["rc"] == 0, (name, r["stderr"])
        print()
        print(f"Qwen3-MoE shape: {args.layers} layers x {args.experts} experts (top-8), H={args.hidden}, I={args.intermediate}; "
              f"checkpoint {dir_size(src) / 2**20:.0f} MiB; recipe {args.recipe}, {args.num_samples} x {args.seq_len} tokens")
        print("| job | peak RSS MiB | peak anonymous MiB | wall s |")
        print("|---|---:|---:|---:|")
        for name, r in runs.items():
            print(f"| {name} | {r['rss_mib']:.0f} | {r['anon_mib']:.0f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
