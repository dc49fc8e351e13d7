"""The built-in model: a tiny Qwen3-MoE checkpoint shipped as package data (gmmquant/assets/tiny-moe).

It lets every gmmquant job (pack, calibrate, eval, selftest) run without a download. It was trained by
`tools/train_tiny_moe.py` (defaults) on text that ships with CPython; see that script for the recipe.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

__all__ = ["BUILTIN_MODEL_NAME", "HELDOUT_PERPLEXITY", "builtin_model_path", "resolve_model"]

BUILTIN_MODEL_NAME = "builtin"

HELDOUT_PERPLEXITY: float = 32.2734  # unigram baseline (add-one, training tokens) on the same tokens: 793.95
"""Held-out perplexity per token of the shipped checkpoint.

Protocol (`gmmquant.calibrate.perplexity.heldout_perplexity(model, tokenizer, seq_len=256)`): the model
loaded with `AutoModelForCausalLM.from_pretrained(builtin_model_path(), dtype=torch.float32)` (bf16 weights
on disk, upcast exactly; computed in float32 on CPU) and its tokenizer; the documents of
`builtin_documents("heldout")`, each tokenized alone without special tokens and followed by the eos token,
concatenated; non-overlapping windows of 256 tokens (the last, shorter window included), each scored alone;
mean NLL over every predicted token (all window positions but the first), in float32; exp of it.
"""


def builtin_model_path() -> Path:
    """Directory of the shipped checkpoint (config, safetensors weights, tokenizer)."""
    ref = importlib.resources.files("gmmquant") / "assets" / "tiny-moe"
    return Path(str(ref))


def resolve_model(name_or_path: str | os.PathLike | None) -> str:
    """Where to load a model from.

    None or "builtin" -> the shipped checkpoint's directory; an existing directory -> itself; anything else
    is returned unchanged (a hub id for transformers to resolve).
    """
    if name_or_path is None or str(name_or_path) == BUILTIN_MODEL_NAME:
        return str(builtin_model_path())
    return str(name_or_path)
