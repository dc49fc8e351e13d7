"""Helpers of `bench_quality.py`: shared calibration ids, peer runs, peer weights, MoE-block output error.

Everything that decides what a quality number means lives here, so that the tests can check it without
running the benchmark: every tool gets the same calibration token ids (gmmquant's own loader, exported to a
file for the peers), every model is scored by `gmmquant.calibrate.perplexity.perplexity` on the same
held-out windows, and the MoE output error is measured by hooks on the float and the quantized model alike.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from gmmquant.calibrate.data import calibration_ids, load_texts, token_stream
from gmmquant.calibrate.perplexity import windows

REPO = Path(__file__).resolve().parent.parent
PEER_SCRIPT = REPO / "tools" / "peer_quality.py"

# Calibration set of every row and every peer: the recipes' usual size, forced equal for all tools.
NUM_SAMPLES = 64
SEQ_LEN = 256


# ---------------------------------------------------------------- calibration and held-out tokens


def shared_calibration_ids(tokenizer, seed: int, num_samples: int = NUM_SAMPLES, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """The calibration ids gmmquant's `calibrate_model` draws for a recipe with this seed and size.

    The same call as in calibrate/pipeline.py (built-in corpus, train split), so the file the peers get
    holds exactly the tokens the gmmquant rows were calibrated on: int64 `[num_samples, seq_len]`.
    """
    return calibration_ids(tokenizer, load_texts("builtin", "train"), num_samples, seq_len, seed)


def bench_recipe_checked(recipe, ids: torch.Tensor):
    """`recipe`, after checking that `calibrate_model` will draw exactly `ids` with it (built-in corpus,
    same size; the seed was set from the same value)."""
    cal = recipe.calibration
    if cal.dataset != "builtin" or (cal.num_samples, cal.seq_len) != tuple(ids.shape):
        raise ValueError(f"recipe {recipe.name}: calibration {cal.dataset} {cal.num_samples}x{cal.seq_len} is not "
                         f"the shared builtin {tuple(ids.shape)}")
    return recipe


def export_ids(ids: torch.Tensor, path: Path) -> Path:
    """Write calibration ids for a peer: a plain int64 tensor, `torch.save` format."""
    if ids.dtype != torch.int64 or ids.ndim != 2:
        raise ValueError(f"calibration ids must be int64 [num_samples, seq_len], got {ids.dtype} {tuple(ids.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ids.contiguous().clone(), path)
    return path


def heldout_texts() -> list[str]:
    return load_texts("builtin", "heldout")


def heldout_windows(tokenizer, seq_len: int, max_windows: Optional[int]) -> list[torch.Tensor]:
    """The windows `perplexity(model, tokenizer, heldout_texts(), seq_len, max_windows)` scores, as tensors."""
    ids = token_stream(tokenizer, heldout_texts()).tolist()
    return [torch.tensor(w, dtype=torch.int64) for w in windows(ids, seq_len, max_windows)]


# ---------------------------------------------------------------- peer weights


def load_expert_weights(model: torch.nn.Module, path: Path) -> dict:
    """Copy the dequantized expert weights a peer wrote (tools/peer_quality.py) into `model`, in place.

    Every tensor in the file must name a parameter of `model` with the same shape (the fused experts'
    `...mlp.experts.gate_up_proj` / `down_proj`); it is cast to the parameter's dtype. Returns the peer's
    metadata record (tool, versions, settings, seconds, its own perplexity).

    Raises:
        ValueError: a name the model lacks, a shape that differs, or a file without expert tensors.
    """
    from safetensors import safe_open

    params = dict(model.named_parameters())
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        meta = json.loads((f.metadata() or {}).get("peer", "{}"))
        if not any(n.endswith((".gate_up_proj", ".down_proj")) for n in names):
            raise ValueError(f"{path}: no expert weights (…gate_up_proj / …down_proj) in the file")
        for name in names:
            if name not in params:
                raise ValueError(f"{path}: {name!r} is not a parameter of the model")
            tensor = f.get_tensor(name)
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model's is {tuple(params[name].shape)}")
            with torch.no_grad():
                params[name].copy_(tensor.to(params[name].dtype))
    meta["replaced"] = len(names)
    return meta


@dataclass(frozen=True)
class PeerVariant:
    """One peer row: which venv (`peer`: llmc / autoround), the runner's tool name and its flags."""

    label: str
    peer: str
    tool: str
    asym: bool


PEER_VARIANTS = (
    PeerVariant("llm-compressor GPTQ sym", "llmc", "llmc-gptq", False),
    PeerVariant("llm-compressor GPTQ asym", "llmc", "llmc-gptq", True),
    PeerVariant("AutoRound sym (200 it)", "autoround", "autoround", False),
    PeerVariant("AutoRound asym (200 it)", "autoround", "autoround", True),
)
PEER_ENV = {"llmc": "GMMQUANT_PEER_LLMC", "autoround": "GMMQUANT_PEER_AUTOROUND"}


def peer_pythons(options: list[str], environ: Optional[dict] = None) -> dict[str, str]:
    """Peer name -> python executable, from `--peer-python llmc=/path/bin/python` options and the env
    variables GMMQUANT_PEER_LLMC / GMMQUANT_PEER_AUTOROUND (options win). Missing executables are dropped."""
    environ = os.environ if environ is None else environ
    found = {peer: environ[var] for peer, var in PEER_ENV.items() if environ.get(var)}
    for option in options:
        peer, sep, python = option.partition("=")
        if not sep or peer not in PEER_ENV:
            raise ValueError(f"--peer-python {option!r}: expected NAME=PYTHON with NAME one of {sorted(PEER_ENV)}")
        found[peer] = python
    return {peer: python for peer, python in found.items() if Path(python).is_file()}


def ids_digest(ids: torch.Tensor) -> str:
    """sha256 of int64 ids, as tools/peer_quality.py records it."""
    import hashlib

    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def cached_peer(out: Path, ids: torch.Tensor, iters: Optional[int] = None) -> Optional[dict]:
    """The metadata of a peer output at `out` made from exactly these ids (and AutoRound iterations), else None.

    Lets a long peer (AutoRound: minutes per layer on 2 cores) be computed once, by this same benchmark in
    an earlier run, and evaluated again later; the table says which rows were reused.
    """
    from safetensors import safe_open

    if not out.is_file():
        return None
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("peer", "{}"))
    if meta.get("ids_sha256") != ids_digest(ids):
        return None
    if iters is not None and meta.get("iters") not in (None, iters):
        return None
    return meta


def run_peer(python: str, variant: PeerVariant, model_dir: Path, ids_path: Path, out: Path,
             eval_ids: Optional[Path] = None, threads: Optional[int] = None, log: Optional[Path] = None) -> dict:
    """Run tools/peer_quality.py in the peer's venv; returns its metadata record (the last stdout line).

    The child's output goes to `log` (a full pipe would block a long run). Raises RuntimeError with the
    log's tail when the peer fails.
    """
    cmd = [python, str(PEER_SCRIPT), variant.tool, "--model", str(model_dir), "--ids", str(ids_path), "--out", str(out)]
    if variant.asym:
        cmd.append("--asym")
    if eval_ids is not None:
        cmd += ["--eval-ids", str(eval_ids)]
    if threads:
        cmd += ["--threads", str(threads)]
    log = log or out.with_suffix(".log")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the peer's venv, not the project's
    env.setdefault("HF_HUB_OFFLINE", "1")
    with open(log, "w") as sink:
        proc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{variant.label} failed (exit {proc.returncode}); log {log}:\n" + text[-3000:])
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{variant.label}: no result record in {log}")


# ---------------------------------------------------------------- MoE-block output error by hooks


def moe_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The sparse MoE blocks (a module with `experts` and a router `gate`), in model order."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "experts") and hasattr(m, "gate")]


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def block_norm(model: torch.nn.Module, name: str) -> Optional[torch.nn.Module]:
    """The norm whose output is MoE block `name`'s input (the decoder layer's `post_attention_layernorm`), or
    None. The local error re-runs norm + block: a recipe may fold a factor into that norm (SmoothQuant,
    weight-only AWQ), so the quantized block expects the quantized model's norm output, not the float one's."""
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    norm = getattr(parent, "post_attention_layernorm", None)
    return norm if isinstance(norm, torch.nn.Module) else None


@contextlib.contextmanager
def record_moe_outputs(model: torch.nn.Module) -> Iterator[dict[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Within the block, every MoE block's (input, output) pairs are appended (detached) to `calls[name]`; the
    input is that of the block's norm (`block_norm`) where it has one, else the block's own."""
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    handles = []
    for name, block in moe_blocks(model):
        calls[name] = []
        norm = block_norm(model, name)
        if norm is None:
            handles.append(block.register_forward_hook(
                lambda _m, args, out, name=name: calls[name].append((args[0].detach(), _output(out).detach()))))
            continue
        pending: list[torch.Tensor] = []
        handles.append(norm.register_forward_hook(lambda _m, args, _out, pending=pending: pending.append(args[0].detach())))
        handles.append(block.register_forward_hook(
            lambda _m, args, out, name=name, pending=pending: calls[name].append((pending.pop(), _output(out).detach()))))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


class MoEError:
    """Relative output error per MoE block against the float model: ||q - f|| / ||f|| over all tokens.

    `reference` holds the float model's (input, output) of every call of every block (`record_moe_outputs`),
    on the same held-out windows in the same order as the quantized model is then run, so the k-th call of
    a block pairs with the k-th recorded one. Two numbers per block:
      - `errors()` (local): the quantized block re-run on the float model's input to it (through the block's
        own norm, which a recipe may have folded a factor into), against the float output: the error of that
        block's quantization alone (what the calibration report measures, on held-out tokens);
      - `end_to_end()`: the quantized block's output in the quantized model's own forward (its input carries
        the error of every earlier layer), against the float output.
    """

    def __init__(self, reference: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]):
        self.reference = reference
        self.local = {name: 0.0 for name in reference}
        self.e2e = {name: 0.0 for name in reference}
        self.norm = {name: 0.0 for name in reference}
        self.calls = {name: 0 for name in reference}
        self._busy = False

    @contextlib.contextmanager
    def measure(self, model: torch.nn.Module) -> Iterator["MoEError"]:
        blocks = dict(moe_blocks(model))
        if set(blocks) != set(self.reference):
            raise ValueError(f"MoE blocks differ from the reference: {sorted(set(blocks) ^ set(self.reference))}")
        self.norms = {name: block_norm(model, name) for name in blocks}
        handles = [block.register_forward_hook(lambda m, _a, out, name=name: self._add(name, m, _output(out)))
                   for name, block in blocks.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _add(self, name: str, block: torch.nn.Module, out: torch.Tensor) -> None:
        if self._busy:  # the hook's own re-run of the block
            return
        k = self.calls[name]
        ref_in, ref_out = self.reference[name][k]
        self.calls[name] = k + 1
        self._busy = True
        try:
            with torch.no_grad():
                norm = self.norms.get(name)
                x = ref_in.to(out.device)
                local = _output(block(norm(x) if norm is not None else x))
        finally:
            self._busy = False
        ref = ref_out.float()
        self.local[name] += float((local.detach().float().cpu() - ref.cpu()).pow(2).sum())
        self.e2e[name] += float((out.detach().float().cpu() - ref.cpu()).pow(2).sum())
        self.norm[name] += float(ref.pow(2).sum())

    def _check(self) -> None:
        for name, n in self.calls.items():
            if n != len(self.reference[name]):
                raise RuntimeError(f"{name}: {n} calls measured, {len(self.reference[name])} recorded")

    def errors(self) -> list[float]:
        """Local error per block, in model order."""
        self._check()
        return [math.sqrt(self.local[n] / self.norm[n]) for n in self.reference]

    def end_to_end(self) -> list[float]:
        """End-to-end error per block, in model order."""
        self._check()
        return [math.sqrt(self.e2e[n] / self.norm[n]) for n in self.reference]


# ---------------------------------------------------------------- statistics


def spread(values: list[float]) -> dict:
    """mean, min, max, sample std (0 for one value), n."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
