"""Peak memory of `gmmquant calibrate` (layer by layer, layers offloaded to disk) vs the whole model in memory.

Usage: python benchmarks/bench_calibrate.py [--layers 8] [--experts 64] [--hidden 1024] [--intermediate 512]
       [--recipe w4a16-g128-gptq] [--num-samples 16] [--seq-len 256]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--recipe", default="w4a16-g128-gptq")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
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
