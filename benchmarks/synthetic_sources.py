"""Write a synthetic checkpoint with the real per-layer shapes of a big MoE model in its shipped source format.

Usage: python benchmarks/synthetic_sources.py SHAPE SOURCE LAYERS EXPERTS OUT_DIR
  SHAPE: deepseek-v3 | qwen3-30b-a3b | gpt-oss-20b;  SOURCE: fp8 | mxfp4 | bf16;  EXPERTS: 0 = the model's own count.

Random data, written tensor by tensor with gmmquant's streaming ShardWriter (never a layer in memory):
block FP8 (`weight` float8_e4m3fn + `weight_scale_inv` [ceil(out/128), ceil(in/128)]) for every linear
projection as DeepSeek-V3 / Qwen3-FP8 ship them (router, norms and embeddings bf16), or MXFP4 experts
(`*_blocks` / `*_scales`) as gpt-oss ships them. The vocabulary is 4096 (the built-in model's tokenizer),
not the model's, so embeddings and head are small; everything inside a decoder layer has its real shape.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

SHAPES = {
    "deepseek-v3": ("deepseek_v3", 61, dict(
        hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, n_group=8, topk_group=4, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, num_attention_heads=128, num_key_value_heads=128, first_k_dense_replace=0,
        routed_scaling_factor=2.5, norm_topk_prob=True, num_nextn_predict_layers=0)),
    "qwen3-30b-a3b": ("qwen3_moe", 48, dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, norm_topk_prob=True)),
    "gpt-oss-20b": ("gpt_oss", 24, dict(
        hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, sliding_window=128)),
}
EXPERT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")
VOCAB = 4096
BLOCK = 128


def fp8_parts(shape: tuple[int, ...], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random float8_e4m3fn `[out, in]` weight and its float32 `weight_scale_inv` `[ceil(out/128), ceil(in/128)]`."""
    w = (torch.randn(shape, generator=gen) * 64).to(torch.float8_e4m3fn)
    scale = torch.rand((-(-shape[0] // BLOCK), -(-shape[1] // BLOCK)), generator=gen) * 2e-4 + 1e-4
    return w, scale


def build(shape: str, source: str, layers: int, experts: int, out: Path) -> None:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from gmmquant.builtin import builtin_model_path
    from gmmquant.pack.shards import ShardWriter

    model_type, _, kw = SHAPES[shape]
    kw = dict(kw, num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=4096, dtype="bfloat16",
              tie_word_embeddings=False)
    if experts:
        kw.update({k: experts for k in EXPERT_KEYS if k in kw})
    config = AutoConfig.for_model(model_type, **kw)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    state = {n: t for n, t in model.state_dict().items()}
    out.mkdir(parents=True)
    writer = ShardWriter(out, 4 * 10**9, metadata={})
    gen = torch.Generator().manual_seed(0)
    for name, t in state.items():
        shape_ = tuple(t.shape)
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e = shape_[0]
            if source == "mxfp4":  # [E, in, out] parameter -> blocks [E, out, in/32, 16], scales [E, out, in/32]
                k, n = shape_[1], shape_[2]
                writer.add(name + "_blocks", torch.randint(0, 256, (e, n, k // 32, 16), dtype=torch.uint8, generator=gen))
                writer.add(name + "_scales", torch.randint(117, 122, (e, n, k // 32), dtype=torch.uint8, generator=gen))
                continue
            base = name.rsplit(".", 1)[0]
            pieces = (("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",))
            rows = shape_[1] // len(pieces)
            for i in range(e):
                for piece in pieces:
                    if source == "fp8":
                        w, s = fp8_parts((rows, shape_[2]), gen)
                        writer.add(f"{base}.{i}.{piece}.weight", w)
                        writer.add(f"{base}.{i}.{piece}.weight_scale_inv", s)
                    else:
                        writer.add(f"{base}.{i}.{piece}.weight", (torch.randn(rows, shape_[2], generator=gen) * 0.02).bfloat16())
        elif source == "fp8" and name.endswith("proj.weight") and len(shape_) == 2:
            w, s = fp8_parts(shape_, gen)
            writer.add(name, w)
            writer.add(name + "_scale_inv", s)
        elif name.endswith("norm.weight"):
            writer.add(name, torch.ones(shape_, dtype=torch.bfloat16))
        elif "e_score_correction_bias" in name:
            writer.add(name, torch.zeros(shape_, dtype=torch.float32))
        else:
            writer.add(name, (torch.randn(shape_, generator=gen) * 0.02).to(t.dtype if t.is_floating_point() else torch.bfloat16))
    writer.close()
    config_dict = config.to_dict()
    if source == "fp8":
        config_dict["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                              "weight_block_size": [BLOCK, BLOCK]}
    elif source == "mxfp4":
        config_dict["quantization_config"] = {"quant_method": "mxfp4"}
    (out / "config.json").write_text(json.dumps(config_dict, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (builtin_model_path() / name).is_file():
            shutil.copy(builtin_model_path() / name, out / name)


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
