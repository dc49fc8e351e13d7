"""The `gmmquant` command line."""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time
import traceback
from pathlib import Path
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


def _progress(iterable, description: str, total: int):
    from tqdm import tqdm

    return tqdm(iterable, desc=description, total=total, unit="tensor", leave=False)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def cmd_pack(args: argparse.Namespace) -> int:
    """Round-to-nearest quantize the experts of a HF checkpoint directory, shard by shard."""
    from .pack import get_scheme
    from .pack.stream import stream_pack

    overrides = {} if args.symmetric is None else {"symmetric": args.symmetric}
    scheme = get_scheme(args.scheme, **overrides)
    act = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.act_dtype]
    summary = stream_pack(args.model_dir, args.output, scheme, ignore=args.ignore, act_dtype=act,
                          max_shard_size=args.max_shard_size, max_memory=args.max_memory, overwrite=args.overwrite,
                          progress=_progress)
    print(f"packed {args.model_dir} -> {args.output} with {scheme.name} "
          f"({scheme.weight_bits}-bit, {'per-group ' + str(scheme.group_size) if scheme.group_size else 'per-channel'}, "
          f"{'symmetric' if scheme.symmetric else 'asymmetric'})")
    print(f"{'projection':<48}{'experts':>8}{'before':>14}{'after':>14}{'max rel err':>13}{'mean rel err':>14}")
    for p in summary.projections:
        mean = sum(p.rel_errors) / len(p.rel_errors)
        print(f"{p.name:<48}{len(p.rel_errors):>8}{_mb(p.bytes_before):>14}{_mb(p.bytes_after):>14}{max(p.rel_errors):>13.4f}{mean:>14.4f}")
    print(f"quantized {len(summary.projections)} expert projections, copied {summary.passthrough_tensors} other tensors")
    print(f"size: {_mb(summary.bytes_before)} -> {_mb(summary.bytes_after)} "
          f"({summary.bytes_after / max(summary.bytes_before, 1):.2%}); weight error: max {summary.max_rel_error:.4f}, "
          f"mean {summary.mean_rel_error:.4f} (relative Frobenius, per expert)")
    return 0


def _layer_progress(iterable, description: str, total: int):
    from tqdm import tqdm

    return tqdm(iterable, desc=description, total=total, unit="layer")


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate a HF MoE model with a recipe and write a gmmquant checkpoint."""
    from .recipes import load_recipe

    # The recipe (and the target engine's rule) is checked before anything else is imported or read.
    recipe = load_recipe(args.recipe, dataset=args.dataset, num_samples=args.num_samples, seq_len=args.seq_len,
                         seed=args.seed, all_experts=args.all_experts, min_tokens=args.min_tokens)
    if args.symmetric is not None:
        import dataclasses

        from .recipes import validate

        recipe = validate(dataclasses.replace(recipe, symmetric=args.symmetric))
    from .interop.engines import get_engine

    # SmoothQuant and per-expert AWQ both leave per-expert smooth_scale factors in the checkpoint
    get_engine(args.target).check(recipe.quant_scheme(), smoothquant=recipe.smoothquant is not None or recipe.awq_per_expert)
    from .builtin import resolve_model
    from .calibrate.pipeline import calibrate_model

    model = resolve_model(args.model)
    cal = recipe.calibration
    _check_seq_len(_local_config(model), cal.seq_len, "--seq-len (calibration.seq_len)")
    print(f"calibrating {args.model or 'the built-in model'} with recipe {recipe.name!r} ({recipe.description or recipe.scheme}); "
          f"data: {cal.dataset}, {cal.num_samples} x {cal.seq_len} tokens, seed {cal.seed}"
          f"{', all experts see all tokens' if cal.all_experts else ''}")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    report = calibrate_model(model, args.output, recipe, device=args.device, offload=not args.no_offload,
                             overwrite=args.overwrite, max_shard_size=args.max_shard_size, max_memory=args.max_memory,
                             devices=devices, progress=_layer_progress)
    print(f"{'layer':>5}{'experts':>9}{'covered':>9}{'min tok':>9}{'median tok':>12}{'fallbacks':>11}"
          f"{'weight err':>12}{'output err':>12}  smoothing")
    for r in report.layers:
        print(f"{r.index:>5}{r.num_experts:>9}{r.experts_covered:>9}{r.min_tokens:>9}{r.median_tokens:>12.1f}"
              f"{len(r.fallbacks):>11}{r.weight_error:>12.4f}{r.output_error:>12.4f}  {r.smoothing}")
    fallbacks = [f for r in report.layers for f in r.fallbacks]
    if fallbacks:
        print(f"{len(fallbacks)} expert projection(s) fell back to RTN (too few tokens): {', '.join(fallbacks[:8])}"
              f"{' ...' if len(fallbacks) > 8 else ''}")
    covered = sum(r.experts_covered for r in report.layers)
    total = sum(r.num_experts for r in report.layers)
    print(f"experts that received calibration tokens: {covered}/{total}; calibration tokens: {report.num_tokens}")
    print(f"wrote {report.save.path} ({report.save.shards} shard(s), {_mb(report.save.total_bytes)}); "
          f"run it: gmmquant eval {report.save.path}")
    return 0


def _local_config(path: str) -> Optional[dict]:
    """config.json of a local model directory (clear errors), or None for a hub id."""
    from .pack.safety import read_model_config

    local = Path(path)
    looks_local = local.exists() or local.is_absolute() or path.startswith((".", "~")) or path.count("/") > 1
    if not looks_local:
        return None
    if not local.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory")
    return read_model_config(local / "config.json")


def _check_seq_len(config: Optional[dict], seq_len: int, flag: str) -> None:
    """Refuse windows longer than the model's positions (the outputs past them are meaningless)."""
    text = (config or {}).get("text_config") if isinstance((config or {}).get("text_config"), dict) else config or {}
    limit = text.get("max_position_embeddings")
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"{flag} {seq_len} exceeds the model's max_position_embeddings {limit}")


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity of a float model or a gmmquant checkpoint on held-out text."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .builtin import resolve_model
    from .calibrate.data import load_texts
    from .calibrate.perplexity import perplexity
    from .interop.load import detect_format
    from .pack.format import QUANT_METHOD
    from .runtime import load_model

    if args.seq_len < 2:
        raise ValueError(f"--seq-len {args.seq_len}: must be >= 2 (perplexity predicts each token from the ones before)")
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows {args.max_windows}: must be >= 1")
    path = resolve_model(args.model)
    config = _local_config(path) or {}
    _check_seq_len(config, args.seq_len, "--seq-len")
    method = (config.get("quantization_config") or {}).get("quant_method") if isinstance(config.get("quantization_config"), dict) else None
    quantized = method == QUANT_METHOD
    foreign = detect_format(path)  # compressed-tensors / AscendV1 run through our runtime too
    texts = load_texts(args.dataset, "heldout")  # before the model: a bad --dataset fails fast
    try:
        model = load_model(path) if quantized or foreign else AutoModelForCausalLM.from_pretrained(path).eval()
    except ImportError as err:  # e.g. AutoRound / GPTQ checkpoints need their own packages in transformers
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: transformers cannot load its quantization_config.quant_method {method!r} here ({first}); "
                         "gmmquant itself runs gmmquant, compressed-tensors and AscendV1 checkpoints") from err
    tokenizer = AutoTokenizer.from_pretrained(path)
    ppl = perplexity(model, tokenizer, texts, seq_len=args.seq_len, max_windows=args.max_windows)
    if not math.isfinite(ppl):
        raise ValueError(f"{args.model or 'builtin'}: perplexity is {ppl}: the model produced non-finite logits "
                         "(check its weights with `gmmquant inspect --verify`)")
    schemes = sorted({m["scheme"]["name"] for m in config["quantization_config"]["modules"].values()}) if quantized else []
    kind = f"gmmquant {', '.join(schemes)}" if quantized else f"{foreign}, loaded by gmmquant" if foreign else "float"
    print(f"{args.model or 'builtin'} ({kind}): perplexity {ppl:.4f} on {args.dataset or 'builtin'} held-out text "
          f"(seq_len {args.seq_len}{', ' + str(args.max_windows) + ' windows' if args.max_windows else ''})")
    return 0


def _inspect_foreign(path: str, fmt: str, show_all: bool) -> int:
    """Describe an AscendV1 or compressed-tensors directory and validate it by converting it as load_model does."""
    from .interop import read_checkpoint
    from .interop.foreign import safetensors_files
    from .pack.checkpoint import read_header

    root = Path(path)
    if fmt == "ascend":
        desc = json.loads((root / "quant_model_description.json").read_text())
        types = sorted({v for k, v in desc.items() if isinstance(v, str) and "." in k})
        detail = (f"AscendV1 (msModelSlim layout; vllm-ascend / MindIE): model_quant_type {desc.get('model_quant_type')}, "
                  f"version {desc.get('version')}, group_size {desc.get('group_size')}, tensor types {types}")
    else:
        qc = json.loads((root / "config.json").read_text())["quantization_config"]
        detail = f"compressed-tensors (vLLM): format {qc.get('format')}, config groups {sorted(qc.get('config_groups', {}))}"
    print(f"{root}: {detail}")
    headers = {}
    for file in safetensors_files(root):  # FormatError: main prints it on one line and exits 2
        headers.update(read_header(file))
    ck = read_checkpoint(root)
    for prefix, spec in ck.specs.items():
        shapes = ", ".join(f"{p} K={k} N={n}" for p, (k, n) in spec.projections.items())
        print(f"  {prefix}: {spec.scheme.name} (E={spec.num_experts}; {shapes})")
    print(f"{'tensor':<60}{'dtype':>10}{'shape':>22}")
    expert_tensors = 0
    for name, (dtype, shape) in sorted(headers.items()):
        expert = ".experts." in name
        expert_tensors += expert
        if show_all or expert:
            print(f"{name:<60}{str(dtype).replace('torch.', ''):>10}{str(list(shape)):>22}")
    print(f"{len(headers)} tensors ({expert_tensors} expert tensors); {len(ck.specs)} quantized experts modules "
          f"convert to gmmquant's kernel layout, activations {str(ck.act_dtype).replace('torch.', '')}; validation: OK")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Describe a gmmquant, AscendV1 or compressed-tensors checkpoint and validate it (with --verify, gmmquant
    checkpoints: every byte against its checksum)."""
    from .interop.load import detect_format
    from .pack.format import FormatError
    from .pack.validate import checksum_problems, validate_checkpoint

    fmt = detect_format(args.checkpoint)
    if fmt is not None:
        return _inspect_foreign(args.checkpoint, fmt, args.all)
    ck = validate_checkpoint(args.checkpoint)  # FormatError: main prints it on one line and exits 2
    qc = ck.config["quantization_config"]
    print(f"{ck.path}: gmmquant format v{qc['format_version']}, activations {qc['act_dtype']}, "
          f"{len(ck.specs)} quantized experts modules, ignore {ck.ignore}")
    for prefix, spec in ck.specs.items():
        shapes = ", ".join(f"{p} K={k} N={n}" for p, (k, n) in spec.projections.items())
        print(f"  {prefix}: {spec.scheme.name} (E={spec.num_experts}; {shapes})")
    print(f"{'tensor':<60}{'dtype':>10}{'shape':>22}{'bytes':>14}")
    total = 0
    for name, (dtype, shape) in sorted(ck.headers.items()):
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        total += nbytes
        if args.all or any(name.startswith(p + ".") for p in ck.specs):
            print(f"{name:<60}{str(dtype).replace('torch.', ''):>10}{str(list(shape)):>22}{nbytes:>14,}")
    print(f"{len(ck.headers)} tensors in {len(set(ck.weight_map.values()))} file(s), {_mb(total)}; validation: OK")
    if args.verify:
        read, verified, problems = checksum_problems(ck)
        if problems:
            raise FormatError(f"{ck.path}: verification failed:\n  " + "\n  ".join(problems))
        print(f"verify: read all {read} tensors; {verified} SHA-256 checksum(s) match"
              + (f"; {read - verified} tensor(s) have no recorded checksum (saved without them)" if read > verified else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a gmmquant checkpoint to AscendV1 (vllm-ascend / MindIE) or compressed-tensors (vLLM)."""
    from .interop import export_checkpoint
    from .pack.checkpoint import load_quantized

    ck = load_quantized(args.checkpoint)
    out = export_checkpoint(args.checkpoint, args.output, args.to, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    files = sorted(p for p in out.iterdir() if p.suffix == ".safetensors")
    size = sum(p.stat().st_size for p in files)
    if args.to == "ascend":
        detail = json.loads((out / "quant_model_description.json").read_text())["model_quant_type"]
    else:
        detail = json.loads((out / "config.json").read_text())["quantization_config"]["format"]
    print(f"exported {args.checkpoint} -> {out} ({args.to}, {detail})")
    print(f"{'experts module':<48}{'scheme':<18}{'experts':>8}")
    for prefix, spec in ck.specs.items():
        print(f"{prefix:<48}{spec.scheme.name:<18}{spec.num_experts:>8}")
    print(f"{len(files)} safetensors file(s), {_mb(size)}")
    return 0


def _tune_shapes(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(K, N) of each expert projection: --shapes KxN,... or a model's config (gate_up: H x 2I, down: I x H)."""
    if args.shapes:
        try:
            return [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]  # type: ignore[misc]
        except ValueError:
            raise ValueError(f"--shapes must look like 2048x1536,768x2048 (K x N per projection), got {args.shapes!r}") from None
    from .builtin import resolve_model

    config = json.loads((Path(resolve_model(args.model)) / "config.json").read_text())
    config = config.get("text_config", config)
    hidden = config.get("hidden_size")
    inter = config.get("moe_intermediate_size") or config.get("intermediate_size")
    if not hidden or not inter:
        raise ValueError(f"{args.model}: config.json has no hidden_size / moe_intermediate_size; pass --shapes KxN,...")
    return [(hidden, 2 * inter), (inter, hidden)]


def cmd_tune(args: argparse.Namespace) -> int:
    """Measure the cpu backend's weight-only kernels per shape and cache the winners (docs/KERNELS.md)."""
    from .kernels.backends import cpu_autotune as at
    from .pack import get_scheme

    print(f"machine: {at.machine_signature()}")
    print(f"cache: {at.cache_path()} (${at.AUTOTUNE_ENV}={at.mode()})")
    if args.show:
        section = at.load_table().get(at.machine_signature(), {})
        print(f"{len(section)} measured shape(s) for this machine")
        for key, entry in sorted(section.items()):
            ms = " ".join(f"{c} {v:.3f}" for c, v in entry["ms"].items())
            print(f"  {key:<44} -> {entry['choice']:<13} ({ms} ms)")
        return 0
    keys = []
    for name in args.scheme.split(","):
        scheme = get_scheme(name)
        if not scheme.weight_only:
            raise ValueError(f"scheme {name!r}: only weight-only schemes have a kernel choice on CPU (int8 x int8 runs torch._int_mm)")
        for k, n in _tune_shapes(args):
            groups = 1 if scheme.group_size is None else k // scheme.group_size
            for rows in (int(r) for r in args.rows.split(",")):
                keys.append(at.KernelKey(f"w{scheme.weight_bits}a16", args.dtype, at.rows_bucket(rows), k, n, groups))
    print(f"{'shape':<44}{'fused ms':>10}{'dequant ms':>12}  choice")
    for row in at.tune(keys, reps=args.reps):
        key = at.KernelKey(**row["key"])
        print(f"{key.text():<44}{row['ms'][at.FUSED]:>10.3f}{row['ms'][at.DEQUANT]:>12.3f}  {row['choice']}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line (the usage itself is one `-h` away)."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def _size(text: str) -> str:
    from .pack.shards import parse_size

    try:
        parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gmmquant", description="Quantized MoE experts on grouped-matmul kernels.")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("selftest", help="check every grouped-matmul mode of a backend against the reference formulas")
    p.add_argument("--backend", choices=["reference", "cpu", "cuda", "npu"], default=None)
    p.add_argument("-k", type=int, default=256, help="reduction size K (multiple of 128)")
    p.add_argument("-n", type=int, default=256, help="output size N (multiple of 8)")
    p.set_defaults(func=cmd_selftest)

    p = sub.add_parser("pack", help="round-to-nearest quantize a HF checkpoint directory's experts, shard by shard")
    p.add_argument("model_dir", help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to create")
    p.add_argument("--scheme", default="w4a16-g128", help="scheme preset (w8a16, w4a16, w4a16-g32/64/128/256, w8a8-dynamic, w8a8-static)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None, help="no zero points")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="store antiquant_offset = -zero_point")
    p.add_argument("--ignore", action="append", default=[], metavar="PATTERN", help="experts module paths to keep in float (fnmatch), repeatable")
    p.add_argument("--act-dtype", choices=["bf16", "fp16"], default=None, help="activation dtype (default: the config's)")
    p.add_argument("--max-shard-size", default="2GB", type=_size, help="output shard bound")
    p.add_argument("--max-memory", default="2GiB", type=_size,
                   help="budget for the experts in flight: fused tensors are read and quantized in chunks that fit it")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("calibrate", help="calibrate a HF MoE model with a recipe and write a quantized checkpoint")
    p.add_argument("model", nargs="?", default=None, help="Hugging Face model directory (default: the built-in model)")
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to create")
    p.add_argument("--recipe", default=None, help="shipped recipe name or YAML path (default: w8a16; see recipes/)")
    p.add_argument("--dataset", default=None, help="'builtin', a .txt/.jsonl file, or a cached `datasets` name")
    p.add_argument("--num-samples", type=int, default=None, help="calibration samples (overrides the recipe)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sample (overrides the recipe)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--all-experts", dest="all_experts", action="store_true", default=None,
                   help="every expert's statistics see every token (outputs still use the real routing)")
    p.add_argument("--min-tokens", type=int, default=None, help="experts with fewer tokens fall back to RTN")
    p.add_argument("--target", choices=["hf", "vllm", "vllm-ascend"], default="hf",
                   help="engine that will serve the result: refuse, before loading the model, a recipe it cannot run "
                        "for MoE experts (docs/INTEROP.md)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None, help="no zero points (overrides the recipe)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="zero points (overrides the recipe)")
    p.add_argument("--device", default="cpu", help="compute device of the current layer or chunk (cpu, cuda:N, npu:N)")
    p.add_argument("--max-memory", default=None, type=_size,
                   help="stream the experts from the files in chunks that fit this budget (e.g. 4GiB); the default "
                        "for FP8 / MXFP4 / compressed-tensors sources is 2GiB (docs/SOURCES.md)")
    p.add_argument("--devices", default=None,
                   help="comma-separated devices to spread each layer's expert chunks over (streamed calibration)")
    p.add_argument("--no-offload", action="store_true", help="load the whole model in memory instead of layer by layer")
    p.add_argument("--max-shard-size", default="2GB", type=_size)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("eval", help="perplexity of a float model or a gmmquant checkpoint on held-out text")
    p.add_argument("model", nargs="?", default=None, help="model or checkpoint directory (default: the built-in model)")
    p.add_argument("--dataset", default=None, help="'builtin' (its held-out split), a .txt/.jsonl file, or a cached `datasets` name")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="describe and validate a gmmquant, AscendV1 or compressed-tensors checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--all", action="store_true", help="list every tensor, not only the quantized experts")
    p.add_argument("--verify", action="store_true", help="read every tensor back and check the SHA-256 recorded at save")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="export a gmmquant checkpoint for vllm-ascend / MindIE (ascend) or vLLM (compressed-tensors)")
    p.add_argument("checkpoint")
    p.add_argument("--to", required=True, choices=["ascend", "compressed-tensors"], help="target format (docs/INTEROP.md)")
    p.add_argument("-o", "--output", required=True, help="directory to create")
    p.add_argument("--max-shard-size", default="4GB", type=_size, help="output shard bound")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("tune", help="measure and cache the fastest CPU kernel per expert shape (weight-only schemes)")
    p.add_argument("model", nargs="?", default=None, help="model directory whose expert shapes to tune (default: the built-in model)")
    p.add_argument("--shapes", default=None, help="K x N per projection instead of a model, e.g. 2048x1536,768x2048")
    p.add_argument("--scheme", default="w4a16-g128,w8a16", help="comma-separated weight-only schemes")
    p.add_argument("--rows", default="1,2,4,8,16,32,64,128,256,512", help="rows per expert to measure (bucketed to powers of two)")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--show", action="store_true", help="print this machine's cached choices and exit")
    p.set_defaults(func=cmd_tune)
    return parser


def _one_line(err: BaseException) -> str:
    """An error as one line: its message (problem lists joined with '; '), OSErrors as 'reason: path'."""
    if isinstance(err, OSError) and err.strerror:  # from the system (FileExistsError("message") has no strerror)
        text = f"{err.strerror}: {err.filename}" + (f" -> {err.filename2}" if err.filename2 else "") if err.filename else err.strerror
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM):
            text += " (nothing was written: outputs appear only when complete)"
    elif isinstance(err, ImportError):
        text = f"a required package is missing: {err}"
    else:
        text = str(err) or type(err).__name__
        if not isinstance(err, (ValueError, OSError, KeyError)):
            text = f"{type(err).__name__}: {text} (unexpected; rerun with --debug for the traceback)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "") if lines else type(err).__name__


def main(argv: Optional[list[str]] = None) -> int:
    """Run the CLI; every error is one line on stderr and a non-zero exit (a traceback only with --debug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args([a for a in argv if a != "--debug"])
    except SystemExit as done:  # usage errors (one line, see _Parser) and -h: a return code, also in-process
        return done.code if isinstance(done.code, int) else 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"gmmquant {args.command}: interrupted (nothing was written: outputs appear only when complete)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's promise: one line, never a raw traceback
        if debug:
            traceback.print_exc()
        print(f"gmmquant {args.command}: error: {_one_line(err)}", file=sys.stderr)
        # 2: bad input (checkpoint, arguments, data); 1: the system refused (disk, permissions) or a bug
        return 2 if isinstance(err, (ValueError, FileExistsError, FileNotFoundError, KeyError)) else 1


if __name__ == "__main__":
    sys.exit(main())
