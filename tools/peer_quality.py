"""Quantize a model's MoE experts with a peer tool, for `benchmarks/bench_quality.py` to evaluate.

Runs inside the peer's own virtualenv (each peer pins its own transformers / compressed-tensors), never in
the project's; it imports only torch, safetensors, transformers and the peer:

    /work/venvs/llmc/bin/python tools/peer_quality.py llmc-gptq --model DIR --ids ids.pt --out w.safetensors
    /work/venvs/autoround/bin/python tools/peer_quality.py autoround --model DIR --ids ids.pt --out w.safetensors

`--ids` is a `[num_samples, seq_len]` int64 tensor (torch.save) of calibration token ids, written by the
benchmark from gmmquant's own calibration loader, so every tool sees the same tokens. Only the routed
experts are quantized (attention, routers, embeddings and lm_head stay as they are), int4 with groups of
128 along the input dimension, symmetric unless `--asym`. The peer runs with its default settings
otherwise (llm-compressor: GPTQModifier, its MoE calibration of every expert; AutoRound: 200 iterations).

Output: one safetensors file holding the *dequantized* expert weights under the float model's own names
and layout (`model.layers.N.mlp.experts.gate_up_proj` [E, 2I, H], `...down_proj` [E, H, I], float32), and
in its metadata a JSON record: tool and versions, settings, seconds, the largest number of distinct values
in any 128-group (<= 16 proves the weights really are int4 levels) and, with `--eval-ids`, the perplexity
the peer's own quantized model object gives on those windows (to check that the export loses nothing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import time
from pathlib import Path

import torch

# Per-expert Linear modules as both peers unfuse transformers 5's fused experts: `<prefix>.experts.<e>.<proj>`.
EXPERT_LINEAR = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")
GROUP = 128


def fused_expert_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The per-expert Linear weights of `model`, stacked back into transformers' fused layout.

    gate_up_proj[e] = cat(gate_proj[e].weight, up_proj[e].weight) ([2I, H]); down_proj[e] = down_proj[e].weight.
    """
    found: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, module in model.named_modules():
        m = EXPERT_LINEAR.match(name)
        if m is not None and getattr(module, "weight", None) is not None:
            found.setdefault(m["prefix"], {}).setdefault(int(m["index"]), {})[m["proj"]] = module.weight.detach().float().cpu()
    if not found:
        raise RuntimeError("no per-expert Linear modules (<prefix>.experts.<e>.gate_proj/up_proj/down_proj) in the model")
    out = {}
    for prefix, experts in sorted(found.items()):
        order = sorted(experts)
        if order != list(range(len(order))):
            raise RuntimeError(f"{prefix}: expert indices {order} are not 0..E-1")
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in order])
        out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in order])
    return out


def max_levels_per_group(weights: dict[str, torch.Tensor], group: int = GROUP) -> int:
    """Largest count of distinct values in any `group`-long run along the input (last) dimension."""
    worst = 0
    for w in weights.values():
        g = w.reshape(-1, w.shape[-1] // group, group).sort(dim=-1).values
        worst = max(worst, int(((g.diff(dim=-1) != 0).sum(-1) + 1).max()))
    return worst


@torch.no_grad()
def window_perplexity(model: torch.nn.Module, wins: list[torch.Tensor]) -> float:
    """exp(mean NLL) over every predicted token of each window scored alone (gmmquant's protocol)."""
    nll, count = 0.0, 0
    for w in wins:
        ids = w.reshape(1, -1).to(next(model.parameters()).device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / count)


# Modules that stay in float: attention, the routers (`mlp.gate`, a Linear once unfused) and the head.
ATTENTION_AND_ROUTER = ("self_attn", "mlp.gate")


def run_llmc_gptq(model_dir: Path, ids: torch.Tensor, asym: bool) -> tuple[torch.nn.Module, dict]:
    """llm-compressor's oneshot GPTQ, W4A16 group 128 (its W4A16 / W4A16_ASYM presets), experts only."""
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    scheme = "W4A16_ASYM" if asym else "W4A16"
    recipe = GPTQModifier(targets="Linear", scheme=scheme,
                          ignore=["lm_head", "re:.*self_attn.*", "re:.*mlp.gate$"])
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    import compressed_tensors
    import llmcompressor

    return model, {"tool": "llm-compressor", "version": llmcompressor.__version__,
                   "compressed_tensors": compressed_tensors.__version__, "method": "GPTQModifier",
                   "scheme": scheme}


def run_autoround(model_dir: Path, ids: torch.Tensor, asym: bool, iters: int) -> tuple[torch.nn.Module, dict]:
    """AutoRound, int4 group 128, `iters` iterations, its defaults otherwise; attention and routers ignored."""
    import auto_round
    import transformers
    from auto_round import AutoRound

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    rounder = AutoRound(model, tokenizer, bits=4, group_size=GROUP, sym=not asym, iters=iters,
                        nsamples=ids.shape[0], seqlen=ids.shape[1], dataset=[row[None] for row in ids],
                        ignore_layers=",".join(ATTENTION_AND_ROUTER), enable_torch_compile=False)
    rounder.quantize()
    return rounder.model, {"tool": "auto-round", "version": auto_round.__version__, "method": "AutoRound",
                           "iters": iters, "sym": not asym}


def ids_digest(ids: torch.Tensor) -> str:
    """sha256 of the ids' int64 values: names the calibration set in the output's metadata."""
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tool", choices=["llmc-gptq", "autoround"])
    p.add_argument("--model", type=Path, required=True, help="float HF model directory")
    p.add_argument("--ids", type=Path, required=True, help="calibration ids, int64 [num_samples, seq_len] (torch.save)")
    p.add_argument("--out", type=Path, required=True, help="safetensors file for the dequantized expert weights")
    p.add_argument("--asym", action="store_true", help="asymmetric int4 (default symmetric)")
    p.add_argument("--iters", type=int, default=200, help="AutoRound iterations")
    p.add_argument("--eval-ids", type=Path, help="held-out windows (torch.save'd list of 1-D int64) for the peer's own perplexity")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from safetensors.torch import save_file

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = torch.load(args.ids).to(torch.int64)
    if ids.ndim != 2:
        raise SystemExit(f"{args.ids}: expected [num_samples, seq_len] ids, got shape {tuple(ids.shape)}")
    t0 = time.perf_counter()
    if args.tool == "llmc-gptq":
        model, meta = run_llmc_gptq(args.model, ids, args.asym)
    else:
        model, meta = run_autoround(args.model, ids, args.asym, args.iters)
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    meta["made"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    weights = fused_expert_weights(model)
    meta.update({"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                 "asym": args.asym, "group_size": GROUP, "calibration_shape": list(ids.shape),
                 "ids_sha256": ids_digest(ids),
                 "max_levels_per_group": max_levels_per_group(weights)})
    if args.eval_ids:
        meta["own_perplexity"] = window_perplexity(model.eval(), torch.load(args.eval_ids))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(args.out), metadata={"peer": json.dumps(meta)})
    print(json.dumps(meta), flush=True)
    return meta


if __name__ == "__main__":
    main()
