"""Make the llm-compressor test fixture: a tiny Qwen3-MoE quantized W4A16 (group 32) by llm-compressor's oneshot.

Run in its own virtualenv (llm-compressor pins its own transformers and compressed-tensors), e.g.:

    python -m venv /tmp/venv-llmc
    /tmp/venv-llmc/bin/pip install torch==2.13.0          # the CPU build first, so pip never fetches CUDA wheels
    /tmp/venv-llmc/bin/pip install llmcompressor==0.14.0.1
    /tmp/venv-llmc/bin/python tools/make_llmcompressor_fixture.py tests/fixtures

The model is built from a config with random weights (seed 0), saved as bf16, loaded back through
transformers and linearized with llm-compressor's `linearize_moe` (fused experts -> per-expert nn.Linear),
quantized data-free with round-to-nearest (QuantizationModifier, symmetric int4, group 32) and saved compressed
(`pack-quantized`): once with the experts only (attention, routers and lm_head stay bf16) and once with every
Linear but lm_head and the routers. Each output is ~120 KB.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from llmcompressor import oneshot
from llmcompressor.modeling.moe.linearize import linearize_moe
from llmcompressor.modifiers.quantization import QuantizationModifier


def tiny_config() -> transformers.Qwen3MoeConfig:
    return transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                                       num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)


# Two recipes: experts only, and llm-compressor's usual W4A16 recipe shape (every Linear but lm_head and routers,
# so attention is quantized too; gmmquant dequantizes those at load time).
IGNORE = {
    "llmc_qwen3_moe_w4a16": ["lm_head", "re:.*self_attn.*", "re:.*mlp.gate$"],
    "llmc_qwen3_moe_w4a16_all": ["lm_head", "re:.*mlp.gate$"],
}


def make(out: Path, ignore: list[str]) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "float"
        transformers.AutoModelForCausalLM.from_config(tiny_config()).to(torch.bfloat16).save_pretrained(src)
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        linearize_moe(model)  # fused [E, N, K] experts -> per-expert nn.Linear, as llm-compressor quantizes them
        recipe = QuantizationModifier(
            config_groups={"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}},
            ignore=ignore,
        )
        oneshot(model=model, recipe=recipe)
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out, save_compressed=True)
    for extra in ("recipe.yaml",):  # llm-compressor's own bookkeeping; not needed to load the model
        (out / extra).unlink(missing_ok=True)
    meta = {"llmcompressor": __import__("llmcompressor").__version__,
            "compressed_tensors": __import__("compressed_tensors").__version__,
            "transformers": transformers.__version__, "torch": torch.__version__, "ignore": ignore}
    (out / "FIXTURE_VERSIONS.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out}: " + ", ".join(f"{p.name} {p.stat().st_size}" for p in sorted(out.iterdir())))


def main(fixtures_dir: str) -> None:
    for name, ignore in IGNORE.items():
        make(Path(fixtures_dir) / name, ignore)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
