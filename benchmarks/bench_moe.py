"""One Qwen3-30B-A3B-shaped MoE block, and a tiny model's generate(), HF bf16 vs gmmquant experts.

Usage: python benchmarks/bench_moe.py [--tokens 1,4,16,2048] [--reps 10] [--skip-generate] [--no-alternatives]

Block: E=128 experts, H=2048, I=768, top-8 (Qwen3-30B-A3B), bf16, transformers' own router. Baseline: HF's
default `grouped_mm` experts. Ours: `replace_experts` with float weights, W8A16, W4A16-g128, W8A8-dynamic,
all on `grouped_matmul(backend="cpu")`. Every timed call gets fresh hidden states, so routing (and the
experts whose weights are read) changes from call to call, as in decode. Prints median ms per block call,
the speedup over the baseline measured in the same run, and expert memory. Alternatives in the same run
(`moe_alternatives.py`): aten's int4 kernel looped over experts, torch.ao's fbgemm dynamic int8 Linear, and
int8 dequantized to bf16 per expert. The machine's ISA flags and measured read bandwidth head the output;
the int4 memory floor is the bytes of the experts a call touches (expected over the routing) over it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers

from gmmquant import replace_experts
from gmmquant.kernels.backends.cpu_autotune import isa_flags, machine_signature
from moe_alternatives import ALTERNATIVES, read_bandwidth_gbs
from timing import interleaved_medians

VARIANTS = [("hf bf16 grouped_mm", None), ("gmmquant float", "float"), ("W8A16", "w8a16"),
            ("W4A16-g128", "w4a16-g128"), ("W8A8-dynamic", "w8a8-dynamic")]


def build_block(seed: int = 0) -> torch.nn.Module:
    config = transformers.Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                                         norm_topk_prob=True, vocab_size=1024, num_hidden_layers=1, num_attention_heads=32,
                                         num_key_value_heads=4, head_dim=128)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(seed)
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block.to(torch.bfloat16).eval()


def variants(block: torch.nn.Module, alternatives: bool = True) -> dict[str, tuple[torch.nn.Module, int]]:
    out = {}
    for name, scheme in VARIANTS:
        if scheme is None:
            experts = block.experts
            out[name] = (block, sum(p.numel() * p.element_size() for p in experts.parameters()))
            continue
        replaced = copy.deepcopy(block)
        report = replace_experts(replaced, None if scheme == "float" else scheme, backend="cpu")
        out[name] = (replaced, report.bytes_after)
    if alternatives:
        for name, cls in ALTERNATIVES.items():
            alt = copy.deepcopy(block)
            alt.experts = cls(block.experts)
            out[name] = (alt, 0)
    return out


def int4_floor_ms(tokens: int, bandwidth_gbs: float, e: int = 128, top_k: int = 8, h: int = 2048, i: int = 768) -> float:
    """Reading the int4 weights (+ bf16 group-128 scales) of the experts a call is expected to touch."""
    touched = e * (1 - (1 - top_k / e) ** tokens)
    per_expert = 3 * h * i * (0.5 + 2 / 128)
    return touched * per_expert / (bandwidth_gbs * 1e9) * 1e3


def bench_block(tokens: list[int], reps: int, alternatives: bool = True) -> None:
    block = build_block()
    models = variants(block, alternatives)
    bandwidth = read_bandwidth_gbs()
    print(f"measured read bandwidth {bandwidth:.1f} GB/s")
    rows = []
    for t in tokens:
        g = torch.Generator().manual_seed(t)
        inputs = [torch.randn(1, t, 2048, generator=g).to(torch.bfloat16) for _ in range(reps)]
        budget = 150.0 if t >= 1024 else 30.0
        with torch.no_grad():
            for model, _ in models.values():
                model(inputs[0])  # warm-up
            fns = {name: (lambda i, m=model: m(inputs[i])) for name, (model, _) in models.items()}
            times = interleaved_medians(fns, len(inputs), budget)
        rows.append((t, times))
        print(f"  block, {t} tokens: " + ", ".join(f"{n} {ms:.2f} ms" for n, ms in times.items()), flush=True)
    base = VARIANTS[0][0]
    names = list(models)
    print()
    print("| tokens | " + " | ".join(f"{n} ms" for n in names) + " | int4 floor ms | " + " | ".join(f"{n} vs HF" for n, _ in VARIANTS[1:]) + " |")
    print("|---:|" + "---:|" * (len(names) + len(VARIANTS)))
    for t, times in rows:
        cells = [f"{times[n]:.2f}" for n in names] + [f"{int4_floor_ms(t, bandwidth):.2f}"]
        cells += [f"{times[base] / times[n]:.2f}x" for n, _ in VARIANTS[1:]]
        print(f"| {t} | " + " | ".join(cells) + " |")
    print()
    print("| experts memory | " + " | ".join(f"{n}: {b / 2**20:.0f} MiB" for n, (_, b) in models.items() if b) + " |")


def bench_generate(new_tokens: int = 32) -> None:
    config = transformers.Qwen3MoeConfig(vocab_size=2048, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                                         num_experts=32, num_experts_per_tok=4)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    prompt = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(0))
    print()
    print(f"tiny Qwen3-MoE (4 layers, 32 experts, H=512, I=256) generate {new_tokens} tokens, greedy, batch 1:")
    print("| experts | tokens/s | speedup |")
    print("|---|---:|---:|")
    first = None
    for name, scheme in VARIANTS:
        model = base if scheme is None else copy.deepcopy(base)
        if scheme is not None:
            replace_experts(model, None if scheme == "float" else scheme, backend="cpu")
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        model.generate(prompt, **kw)  # warm-up
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            model.generate(prompt, **kw)
            runs.append(new_tokens / (time.perf_counter() - start))
        tps = statistics.median(runs)
        first = first or tps
        print(f"| {name} | {tps:.1f} | {tps / first:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,4,16,2048")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--no-alternatives", action="store_true", help="only HF bf16 and gmmquant's schemes")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(f"machine: {machine_signature()}; ISA flags: {' '.join(isa_flags()) or 'unknown'}")
    bench_block([int(t) for t in args.tokens.split(",")], args.reps, not args.no_alternatives)
    if not args.skip_generate:
        bench_generate()


if __name__ == "__main__":
    main()
