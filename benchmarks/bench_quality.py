"""Held-out perplexity and MoE output error of the built-in models: gmmquant recipes and peer tools, over seeds.

Usage:
    python benchmarks/bench_quality.py [--models builtin builtin-hard] [--seeds 0 1 2] [--recipes ...]
        [--peers llmc-sym llmc-asym autoround-sym autoround-asym | none]
        [--peer-python llmc=/work/venvs/llmc/bin/python --peer-python autoround=/work/venvs/autoround/bin/python]
        [--max-windows 64 | --max-windows builtin-hard=64] [--quick] [--out results/quality]

Per model and calibration seed, every row is calibrated on the SAME token ids: gmmquant's own calibration
loader (built-in corpus, train split, 64 x 256 tokens, the seed) draws them, the gmmquant recipes are run with
that size and seed, and the peers get the same ids in a file (`quality_lib.export_ids`). Every row is then
scored by `gmmquant.calibrate.perplexity.perplexity` on the same held-out windows (bf16 weights; gmmquant
rows through gmmquant's runtime (`load_model`), peer rows as the float model with the peer's dequantized
experts loaded in), while hooks on every MoE block compare its outputs with the float model's on the same
tokens (`quality_lib.MoEError`). Peers run in their own virtualenvs (tools/peer_quality.py) and are skipped
with a note when no python is given for them (`--peer-python`, or GMMQUANT_PEER_LLMC /
GMMQUANT_PEER_AUTOROUND).

Writes `<out>.md` (the table: mean and min..max over seeds) and `<out>.json` (every number of every seed),
the JSON after every row so that an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality_lib as ql  # noqa: E402
from gmmquant import calibrate_model, load_model  # noqa: E402
from gmmquant.builtin import BUILTIN_MODELS, builtin_model_path  # noqa: E402
from gmmquant.calibrate.perplexity import perplexity  # noqa: E402
from gmmquant.recipes import load_recipe, parse_recipe, recipe_names  # noqa: E402

# Default gmmquant rows, in table order; a name that is not a shipped recipe (before the calibration
# algorithms branch is merged) is skipped, except SYM_GPTQ, which the benchmark builds itself.
SYM_GPTQ = "w4a16-g128-sym-gptq"
DEFAULT_RECIPES = ["w8a16", "w8a8-dynamic", "w4a8-dynamic", "w4a8-dynamic-awq", "w4a8-dynamic-autoround", "w4a8-dynamic-g128",
                   "w4a16-g128", "w4a16-g128-gptq", "w4a16-g128-awq", "w4a16-g128-autoround", SYM_GPTQ,
                   "w4a16-g128-sym-awq", "w4a16-g128-sym-autoround"]
PEER_KEYS = {"llmc-sym": ql.PEER_VARIANTS[0], "llmc-asym": ql.PEER_VARIANTS[1],
             "autoround-sym": ql.PEER_VARIANTS[2], "autoround-asym": ql.PEER_VARIANTS[3]}
QUICK_WINDOWS = 24


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def bench_recipe(name: str, seed: int):
    """The Recipe of a gmmquant row, with the shared calibration size and this seed.

    SYM_GPTQ (unless shipped) is w4a16-g128-gptq made symmetric: the like-for-like row for the peers'
    symmetric int4 group-128 GPTQ.
    """
    sizes = {"num_samples": ql.NUM_SAMPLES, "seq_len": ql.SEQ_LEN, "seed": seed}
    if name == SYM_GPTQ and name not in recipe_names():
        data = load_recipe("w4a16-g128-gptq").to_dict()
        data.update(name=SYM_GPTQ, symmetric=True, description="w4a16-g128-gptq with symmetric int4 (benchmark row)")
        return load_recipe(parse_recipe(data), **sizes)
    return load_recipe(name, **sizes)


def selected_recipes(requested: list[str] | None) -> list[str]:
    if requested in (["none"],):
        return []
    shipped = set(recipe_names()) | {SYM_GPTQ}
    names = requested if requested else DEFAULT_RECIPES
    missing = [n for n in names if n not in shipped]
    if missing:
        log(f"note: recipes not shipped in this checkout, skipped: {', '.join(missing)}")
    return [n for n in names if n in shipped]


def parse_windows(items: list[str], models: list[str]) -> dict[str, int | None]:
    """`--max-windows 64` (every model) or `builtin-hard=64` items -> per-model window cap."""
    caps: dict[str, int | None] = {m: None for m in models}
    for item in items:
        name, sep, value = item.rpartition("=")
        for m in ([name] if sep else models):
            caps[m] = int(value)
    return caps


class Results:
    """Every measurement, saved as JSON after each row."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.data = {"header": header, "models": {}}

    def model(self, name: str) -> dict:
        return self.data["models"].setdefault(name, {"rows": {}})

    def add(self, model: str, row: str, seed: int | None, record: dict) -> None:
        rows = self.model(model)["rows"].setdefault(row, {"seeds": {}})
        rows["seeds"][str(seed)] = record
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def evaluate(model, tokenizer, texts, seq_len, max_windows, reference) -> tuple[float, list[float], list[float]]:
    """Perplexity and per-MoE-block output error (local, end to end; vs the float reference) in one pass."""
    error = ql.MoEError(reference)
    with error.measure(model):
        ppl = perplexity(model, tokenizer, texts, seq_len, max_windows)
    return ppl, error.errors(), error.end_to_end()


def float_model(src: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()


def run_model(name: str, args, recipes: list[str], peers: dict, results: Results, work: Path) -> None:
    from transformers import AutoTokenizer

    src = builtin_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(src)
    texts = ql.heldout_texts()
    max_windows = args.window_caps[name]
    wins = ql.heldout_windows(tokenizer, ql.SEQ_LEN, max_windows)
    eval_path = work / name / "heldout.pt"
    eval_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(wins, eval_path)
    entry = results.model(name)
    entry.update(windows=len(wins), tokens=sum(len(w) - 1 for w in wins), path=str(src))

    with ql.Timer() as t:
        model = float_model(src)
        with ql.record_moe_outputs(model) as reference:
            base = perplexity(model, tokenizer, texts, ql.SEQ_LEN, max_windows)
    del model
    entry["float"] = base
    results.add(name, "float (bf16)", None, {"ppl": base, "seconds": t.seconds})
    log(f"{name}: float perplexity {base:.3f} on {len(wins)} windows ({t.seconds:.0f}s)")

    for seed in args.seeds:
        ids = ql.shared_calibration_ids(tokenizer, seed)
        ids_path = ql.export_ids(ids, work / name / f"seed{seed}" / "ids.pt")
        for recipe_name in recipes:
            recipe = ql.bench_recipe_checked(bench_recipe(recipe_name, seed), ids)
            out = work / name / f"seed{seed}" / recipe_name
            try:
                with ql.Timer() as t:
                    report = calibrate_model(src, out, recipe, offload=False, overwrite=True)
                model = load_model(out)
                ppl, errors, e2e = evaluate(model, tokenizer, texts, ql.SEQ_LEN, max_windows, reference)
                del model
            except Exception as exc:  # one failing row must not lose the others
                log(f"{name} seed {seed} {recipe_name}: FAILED {type(exc).__name__}: {exc}")
                results.add(name, recipe_name, seed, {"error": f"{type(exc).__name__}: {exc}"})
                continue
            record = {"ppl": ppl, "delta": ppl / base - 1, "block_errors": errors, "block_errors_e2e": e2e, "seconds": t.seconds,
                      "report_errors": [layer.output_error for layer in report.layers]}
            results.add(name, recipe_name, seed, record)
            log(f"{name} seed {seed} {recipe_name}: ppl {ppl:.3f} ({record['delta'] * 100:+.2f}%), "
                f"MoE err {sum(errors) / len(errors):.4f}/{max(errors):.4f}, calibrate {t.seconds:.0f}s")
            if not args.keep:
                import shutil

                shutil.rmtree(out, ignore_errors=True)
        for variant in args.peer_variants:
            python = peers.get(variant.peer)
            if python is None:
                continue
            peer_dir = (args.peer_cache or work) / name / f"seed{seed}"
            peer_dir.mkdir(parents=True, exist_ok=True)
            out = peer_dir / f"{variant.tool}-{'asym' if variant.asym else 'sym'}.safetensors"
            try:
                meta = ql.cached_peer(out, ids) if args.peer_cache and variant.peer in args.reuse_peers else None
                if meta is not None:
                    meta["reused"] = True
                    log(f"{name} seed {seed} {variant.label}: reusing {out} (same ids; made {meta.get('made')})")
                else:
                    meta = ql.run_peer(python, variant, src, ids_path, out, eval_ids=eval_path, threads=args.threads)
                model = float_model(src)
                ql.load_expert_weights(model, out)
                ppl, errors, e2e = evaluate(model, tokenizer, texts, ql.SEQ_LEN, max_windows, reference)
                del model
            except Exception as exc:
                log(f"{name} seed {seed} {variant.label}: FAILED {type(exc).__name__}: {str(exc)[-800:]}")
                results.add(name, variant.label, seed, {"error": f"{type(exc).__name__}: {str(exc)[-800:]}"})
                continue
            record = {"ppl": ppl, "delta": ppl / base - 1, "block_errors": errors, "block_errors_e2e": e2e,
                      "seconds": meta.get("seconds"),
                      "peer": meta}
            results.add(name, variant.label, seed, record)
            log(f"{name} seed {seed} {variant.label}: ppl {ppl:.3f} ({record['delta'] * 100:+.2f}%; peer's own "
                f"{meta.get('own_perplexity', float('nan')):.3f}), MoE err {sum(errors) / len(errors):.4f}/{max(errors):.4f}, "
                f"{meta.get('seconds')}s, levels/group {meta.get('max_levels_per_group')}")


def summarize(results: Results) -> str:
    """Markdown: per model and row, mean (min..max) over seeds of perplexity, change and MoE error."""
    lines = []
    for name, entry in results.data["models"].items():
        base = entry.get("float")
        lines += [f"**{name}** (float bf16 perplexity {base:.3f}; {entry.get('windows')} held-out windows, "
                  f"{entry.get('tokens')} tokens)", "",
                  "| row | seeds | perplexity mean | vs float: mean (min..max) | MoE output error: mean (max) "
                  "| end to end: mean (max) | s / seed |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row, data in entry["rows"].items():
            recs = [r for r in data["seeds"].values() if "ppl" in r]
            failed = len(data["seeds"]) - len(recs)
            if row.startswith("float"):
                continue
            if not recs:
                lines.append(f"| {row} | 0 | failed | | | | |")
                continue
            d = ql.spread([r["delta"] * 100 for r in recs])
            p = ql.spread([r["ppl"] for r in recs])
            err_mean = ql.spread([sum(r["block_errors"]) / len(r["block_errors"]) for r in recs])["mean"]
            err_max = max(max(r["block_errors"]) for r in recs)
            e2e_mean = ql.spread([sum(r["block_errors_e2e"]) / len(r["block_errors_e2e"]) for r in recs])["mean"]
            e2e_max = max(max(r["block_errors_e2e"]) for r in recs)
            secs = ql.spread([r["seconds"] or 0.0 for r in recs])["mean"]
            note = f" ({failed} failed)" if failed else ""
            reused = sum(1 for r in recs if r.get("peer", {}).get("reused"))
            if reused:
                note += f" ({reused} reused†)"
            lines.append(f"| {row} | {len(recs)}{note} | {p['mean']:.3f} | {d['mean']:+.2f}% ({d['min']:+.2f}..{d['max']:+.2f}) "
                         f"| {err_mean:.4f} ({err_max:.4f}) | {e2e_mean:.4f} ({e2e_max:.4f}) | {secs:.0f} |")
        lines.append("")
    return "\n".join(lines)


def target_checks(results: Results) -> list[str]:
    """The issue's targets, on the mean over seeds: gmmquant's best W4 g128 sym / asym row and W4A8 row
    better than every peer row of the same symmetry; w8 schemes within +0.5% of float."""
    out = []
    for name, entry in results.data["models"].items():
        means = {}
        for row, data in entry["rows"].items():
            recs = [r["delta"] for r in data["seeds"].values() if "delta" in r]
            if recs:
                means[row] = sum(recs) / len(recs)
        def best(rows):
            have = [(means[r], r) for r in rows if r in means]
            return min(have) if have else None
        groups = {
            "w4a16-g128 asym": (best(["w4a16-g128", "w4a16-g128-gptq", "w4a16-g128-awq", "w4a16-g128-autoround"]),
                                ["llm-compressor GPTQ asym", "AutoRound asym (200 it)"]),
            "w4a16-g128 sym": (best([SYM_GPTQ, "w4a16-g128-sym-awq", "w4a16-g128-sym-autoround"]),
                               ["llm-compressor GPTQ sym", "AutoRound sym (200 it)"]),
            # no peer W4A8 row: compared with the peers' symmetric int4 group-128 weight-only rows (a stricter
            # bar: int8 activations on top; per-channel weights for the first group)
            "w4a8-dynamic (per-channel)": (best(["w4a8-dynamic", "w4a8-dynamic-awq", "w4a8-dynamic-autoround"]),
                                           ["llm-compressor GPTQ sym", "AutoRound sym (200 it)"]),
            "w4a8-dynamic-g128": (best(["w4a8-dynamic-g128"]), ["llm-compressor GPTQ sym", "AutoRound sym (200 it)"]),
        }
        for label, (ours, peers) in groups.items():
            peer_means = [(means[p], p) for p in peers if p in means]
            if ours is None or not peer_means:
                out.append(f"{name}: {label}: not measured (ours {ours}, peers {peer_means})")
                continue
            ok = all(ours[0] < m for m, _ in peer_means)
            peers_txt = ", ".join(f"{p} {m * 100:+.2f}%" for m, p in peer_means)
            out.append(f"{'met' if ok else 'NOT MET'}: {name}: {label}: ours {ours[1]} {ours[0] * 100:+.2f}% vs {peers_txt}")
        for row in ("w8a16", "w8a8-dynamic"):
            if row in means:
                ok = means[row] <= 0.005
                out.append(f"{'met' if ok else 'NOT MET'}: {name}: {row} within +0.5%: {means[row] * 100:+.2f}%")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(BUILTIN_MODELS), choices=list(BUILTIN_MODELS))
    p.add_argument("--recipes", nargs="*", default=None, help=f"gmmquant rows (default: {' '.join(DEFAULT_RECIPES)}, "
                   "those shipped; 'none' for peers only)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--peers", nargs="*", default=list(PEER_KEYS), help=f"peer rows: {' '.join(PEER_KEYS)}, or none")
    p.add_argument("--peer-python", action="append", default=[], metavar="NAME=PYTHON",
                   help="python of a peer's venv: llmc=... / autoround=... (or GMMQUANT_PEER_LLMC / _AUTOROUND)")
    p.add_argument("--max-windows", nargs="*", default=[], metavar="[MODEL=]N",
                   help="held-out windows to score (default all), for every model or one")
    p.add_argument("--quick", action="store_true", help=f"one seed, {QUICK_WINDOWS} windows")
    p.add_argument("--threads", type=int, default=None, help="torch threads here and in the peers")
    p.add_argument("--out", type=Path, default=Path("bench_quality"), help="writes OUT.md and OUT.json")
    p.add_argument("--workdir", type=Path, default=None, help="keep ids, checkpoints and peer weights here")
    p.add_argument("--keep", action="store_true", help="keep the gmmquant checkpoints in the workdir")
    p.add_argument("--peer-cache", type=Path, default=None,
                   help="keep peer weights here and reuse those made from the same ids (marked 'reused')")
    p.add_argument("--reuse-peers", nargs="*", default=list(ql.PEER_ENV), metavar="PEER",
                   help="with --peer-cache: the peers whose cached weights may be reused (default all)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.max_windows = args.max_windows or [str(QUICK_WINDOWS)]
    args.window_caps = parse_windows(args.max_windows, args.models)
    if args.peers in ([], ["none"]):
        args.peers = []
    unknown = [k for k in args.peers if k not in PEER_KEYS]
    if unknown:
        p.error(f"--peers: unknown {unknown}; choose from {list(PEER_KEYS)}")
    args.peer_variants = [PEER_KEYS[k] for k in args.peers]
    return args


def main(argv: list[str] | None = None) -> Results:
    import transformers

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipes = selected_recipes(args.recipes)
    peers = ql.peer_pythons(args.peer_python)
    for peer in sorted({v.peer for v in args.peer_variants} - set(peers)):
        log(f"note: peer {peer!r} skipped: no python for it (--peer-python {peer}=... or {ql.PEER_ENV[peer]})")
    header = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
              "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(), "seeds": args.seeds,
              "recipes": recipes, "peers": {v.label: peers.get(v.peer) for v in args.peer_variants},
              "calibration": [ql.NUM_SAMPLES, ql.SEQ_LEN], "windows": args.window_caps}
    results = Results(args.out.with_suffix(".json"), header)
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        work = args.workdir or Path(tmp)
        for name in args.models:
            run_model(name, args, recipes, peers, results, work)
    results.data["header"]["loadavg_end"] = os.getloadavg()
    results.data["header"]["seconds"] = (datetime.datetime.now(datetime.timezone.utc)
                                         - datetime.datetime.fromisoformat(header["date"])).total_seconds()
    results.data["targets"] = target_checks(results)
    results.save()
    text = summarize(results) + "\n" + "\n".join(results.data["targets"]) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
