"""Tiny saved HF MoE models with a real (byte-level BPE) tokenizer, built in-process for calibration tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gmmquant.calibrate.corpus import builtin_documents


def byte_level_tokenizer(vocab_size: int = 384) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the built-in corpus (a second or so)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(builtin_documents("train")[:20], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def qwen3_moe_config(**overrides) -> transformers.PretrainedConfig:
    """2 layers, hidden 128, 8 experts of 128 (so group 128 fits both projections), top-2."""
    kw = dict(vocab_size=384, hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
              max_position_embeddings=512)
    kw.update(overrides)
    return transformers.Qwen3MoeConfig(**kw)


def save_tiny_model(path: Path, config: transformers.PretrainedConfig, *, dtype=torch.bfloat16, seed: int = 0,
                    outlier_channels: int = 0) -> Path:
    """Save a random model + tokenizer. `outlier_channels` > 0 scales that many hidden channels of the
    post-attention norms by 20, the activation outliers SmoothQuant exists for."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
                if outlier_channels and "post_attention" in name:
                    p[:outlier_channels] *= 20
    model.to(dtype).save_pretrained(path)
    byte_level_tokenizer(config.vocab_size).save_pretrained(path)
    return path
