"""Peak memory of `gmmquant pack` (stream-pack) vs loading the same model with transformers.

Usage: python benchmarks/bench_pack.py [--layers 4] [--experts 64] [--hidden 1024] [--intermediate 512]

Builds a Qwen3-MoE checkpoint of the given shape on disk (bf16, sharded), then runs, each in a fresh
subprocess whose memory is sampled from /proc: (1) `AutoModelForCausalLM.from_pretrained` of the bf16 model,
the baseline any in-memory quantizer starts from; (2) `gmmquant pack --scheme w4a16-g128`; (3)
`gmmquant.load_model` of the packed checkpoint (the CPU runtime, with its load-time int4 repack). Prints peak RSS
(which includes the pages of memory-mapped safetensors files), peak anonymous memory, and wall time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD = r"""
import sys, torch
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
"""

LOAD_QUANTIZED = r"""
import sys, gmmquant
model = gmmquant.load_model(sys.argv[1])
assert not [n for n, p in model.named_parameters() if "experts" in n]
"""

BUILD = r"""
import sys, torch, json
from transformers import AutoModelForCausalLM, Qwen3MoeConfig
layers, experts, hidden, inter, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
vocab = int(sys.argv[6]) if len(sys.argv) > 6 else 1024
config = Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=inter,
                        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8,
                        num_experts=experts, num_experts_per_tok=8, dtype="bfloat16")
torch.set_default_dtype(torch.bfloat16)
model = AutoModelForCausalLM.from_config(config)
model.save_pretrained(out, max_shard_size="200MB")
"""


def run_measured(cmd: list[str]) -> dict:
    """Run cmd, sampling /proc/PID/status every 20 ms: peak VmRSS (all resident pages, including
    mmap'd safetensors files) and peak RssAnon (memory the process allocated itself)."""
    start = time.perf_counter()
    # stderr goes to a file, not a pipe: progress bars of a long job would fill a pipe nobody reads until
    # the end, and the job would block on its next write
    err_file = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file)
    peak = {"VmRSS": 0, "RssAnon": 0}
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peak:
                    peak[key] = max(peak[key], int(value.split()[0]))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    rc = proc.wait()
    err_file.seek(0)
    stderr = err_file.read().decode(errors="replace")
    err_file.close()
    return {"rc": rc, "seconds": time.perf_counter() - start, "rss_mib": peak["VmRSS"] / 1024,
            "anon_mib": peak["RssAnon"] / 1024, "stderr": stderr[-2000:]}


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "model", Path(tmp) / "packed"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", BUILD, str(args.layers), str(args.experts), str(args.hidden),
                        str(args.intermediate), str(src)], check=True, capture_output=True)
        print(f"built {src} in {time.perf_counter() - t0:.0f} s: {dir_size(src) / 2**20:.0f} MiB on disk")
        load = run_measured([sys.executable, "-c", LOAD, str(src)])
        pack = run_measured([sys.executable, "-m", "gmmquant.cli", "pack", str(src), "-o", str(out), "--scheme", "w4a16-g128"])
        loadq = run_measured([sys.executable, "-c", LOAD_QUANTIZED, str(out)])
        assert load["rc"] == 0 and pack["rc"] == 0 and loadq["rc"] == 0, (load["stderr"], pack["stderr"], loadq["stderr"])
        expert_bytes = args.layers * args.experts * 3 * args.hidden * args.intermediate * 2
        one_projection_q = args.experts * args.hidden * 2 * args.intermediate // 2
        print()
        print(f"Qwen3-MoE shape: {args.layers} layers x {args.experts} experts, H={args.hidden}, I={args.intermediate}; "
              f"bf16 experts {expert_bytes / 2**20:.0f} MiB, checkpoint {dir_size(src) / 2**20:.0f} MiB -> "
              f"{dir_size(out) / 2**20:.0f} MiB packed (largest quantized projection {one_projection_q / 2**20:.0f} MiB)")
        print("| job | peak RSS MiB | peak anonymous MiB | wall s |")
        print("|---|---:|---:|---:|")
        jobs = (("transformers from_pretrained (bf16)", load), ("gmmquant pack w4a16-g128 (stream)", pack),
                ("gmmquant load_model of the packed checkpoint", loadq))
        for name, r in jobs:
            print(f"| {name} | {r['rss_mib']:.0f} | {r['anon_mib']:.0f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
