"""Held-out perplexity of the built-in model: float vs every shipped recipe (RTN and GPTQ variants).

Usage: python benchmarks/bench_quality.py [--recipes w8a16 w4a16-g128 ...] [--seq-len 256]

For each recipe: `calibrate_model` on the built-in model with the recipe's own calibration settings (the
built-in corpus' train split), `load_model` of the checkpoint, perplexity on the held-out split (the same
windows for every row). Prints one table: perplexity, change vs float, the mean and max relative output error
of the MoE blocks (from the calibration report), checkpoint size and calibration time; then the issue's
targets (w8a16 and w8a8-dynamic within 1% of float, w4a16-g128-gptq within 5% and better than w4a16-g128).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gmmquant import calibrate_model, load_model
from gmmquant.builtin import builtin_model_path
from gmmquant.calibrate.data import load_texts
from gmmquant.calibrate.perplexity import perplexity
from gmmquant.recipes import recipe_names


def dir_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=recipe_names())
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    src = builtin_model_path()
    tokenizer = AutoTokenizer.from_pretrained(src)
    texts = load_texts("builtin", "heldout")
    float_model = AutoModelForCausalLM.from_pretrained(src).eval()
    base = perplexity(float_model, tokenizer, texts, seq_len=args.seq_len)
    rows = [("float (bf16)", base, None, None, dir_mib(src), 0.0)]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes:
            t0 = time.perf_counter()
            report = calibrate_model(src, Path(tmp) / name, name)
            seconds = time.perf_counter() - t0
            model = load_model(Path(tmp) / name)
            ppl = perplexity(model, tokenizer, texts, seq_len=args.seq_len)
            errors = [layer.output_error for layer in report.layers]
            rows.append((name, ppl, sum(errors) / len(errors), max(errors), dir_mib(Path(tmp) / name), seconds))
            del model
    print(f"built-in model, held-out perplexity (seq_len {args.seq_len}, torch {torch.__version__}):")
    print("| model | perplexity | vs float | MoE output error mean / max | weights MiB | calibrate s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ppl, mean_err, max_err, mib, seconds in rows:
        change = "" if mean_err is None else f"{(ppl / base - 1) * 100:+.2f}%"
        err = "" if mean_err is None else f"{mean_err:.4f} / {max_err:.4f}"
        print(f"| {name} | {ppl:.3f} | {change} | {err} | {mib:.1f} | {seconds:.0f} |")
    got = {name: ppl for name, ppl, *_ in rows}
    checks = [(f"{n} within 1% of float", got[n] <= base * 1.01) for n in ("w8a16", "w8a8-dynamic") if n in got]
    if "w4a16-g128-gptq" in got:
        checks.append(("w4a16-g128-gptq within 5% of float", got["w4a16-g128-gptq"] <= base * 1.05))
        if "w4a16-g128" in got:
            checks.append(("w4a16-g128-gptq better than w4a16-g128 (RTN)", got["w4a16-g128-gptq"] < got["w4a16-g128"]))
    for n in ("w4a8-dynamic", "w4a8-dynamic-g128"):  # issue 13's target for W4A8
        if n in got:
            checks.append((f"{n} within 1.5% of float", got[n] <= base * 1.015))
    for label, ok in checks:
        print(f"{'met' if ok else 'NOT MET'}: {label}")


if __name__ == "__main__":
    main()
