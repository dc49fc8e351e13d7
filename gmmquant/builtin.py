"""The built-in models: tiny Qwen3-MoE checkpoints shipped as package data (gmmquant/assets/).

"builtin" (gmmquant/assets/tiny-moe) lets every gmmquant job (pack, calibrate, eval, selftest) run without
a download. "builtin-hard" (gmmquant/assets/tiny-moe-hard) is the harder quality benchmark: hidden 256, 16
finer experts (top-4) and planted activation outliers on the MoE inputs (a few post-attention RMSNorm
channels scaled 20-50x, the router's and experts' matching input columns divided by the same factor), so
that low-bit weight quantization of the experts is as sensitive to the input statistics as on real LLMs.
Both were trained by `tools/train_tiny_moe.py` (`--preset tiny`, the default, and `--preset hard`) on text
that ships with CPython; see that script for the recipe.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

__all__ = ["BUILTIN_MODELS", "BUILTIN_MODEL_NAME", "HARD_MODEL_NAME", "HELDOUT_PERPLEXITIES", "HELDOUT_PERPLEXITY",
           "builtin_model_path", "resolve_model"]

BUILTIN_MODEL_NAME = "builtin"
HARD_MODEL_NAME = "builtin-hard"
BUILTIN_MODELS: dict[str, str] = {BUILTIN_MODEL_NAME: "tiny-moe", HARD_MODEL_NAME: "tiny-moe-hard"}
"""Built-in model name -> its directory under gmmquant/assets."""

HELDOUT_PERPLEXITY: float = 32.2734  # unigram baseline (add-one, training tokens) on the same tokens: 793.95
"""Held-out perplexity per token of the shipped checkpoint.

Protocol (`gmmquant.calibrate.perplexity.heldout_perplexity(model, tokenizer, seq_len=256)`): the model
loaded with `AutoModelForCausalLM.from_pretrained(builtin_model_path(), dtype=torch.float32)` (bf16 weights
on disk, upcast exactly; computed in float32 on CPU) and its tokenizer; the documents of
`builtin_documents("heldout")`, each tokenized alone without special tokens and followed by the eos token,
concatenated; non-overlapping windows of 256 tokens (the last, shorter window included), each scored alone;
mean NLL over every predicted token (all window positions but the first), in float32; exp of it.
"""


HELDOUT_PERPLEXITIES: dict[str, float] = {
    BUILTIN_MODEL_NAME: HELDOUT_PERPLEXITY,
    # same protocol; 8.15M parameters, 16.3 MB bf16; unigram baseline on the same tokens: 793.95
    HARD_MODEL_NAME: 38.137,
}
"""Held-out perplexity of each built-in model, by the protocol of `HELDOUT_PERPLEXITY`."""


def builtin_model_path(name: str = BUILTIN_MODEL_NAME) -> Path:
    """Directory of a shipped checkpoint (config, safetensors weights, tokenizer): "builtin" or "builtin-hard"."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; the built-in models are {sorted(BUILTIN_MODELS)}")
    ref = importlib.resources.files("gmmquant") / "assets" / BUILTIN_MODELS[name]
    return Path(str(ref))


def resolve_model(name_or_path: str | os.PathLike | None) -> str:
    """Where to load a model from.

    None or "builtin" -> the shipped checkpoint's directory ("builtin-hard" -> the harder benchmark model's);
    an existing directory -> itself; anything else is returned unchanged (a hub id for transformers to resolve).
    """
    if name_or_path is None:
        return str(builtin_model_path())
    if str(name_or_path) in BUILTIN_MODELS:
        return str(builtin_model_path(str(name_or_path)))
    return str(name_or_path)
