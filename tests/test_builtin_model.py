"""The shipped tiny Qwen3-MoE checkpoint (gmmquant/assets/tiny-moe) and gmmquant.builtin."""

import math

import pytest
import torch

from gmmquant.builtin import BUILTIN_MODEL_NAME, HELDOUT_PERPLEXITY, builtin_model_path, resolve_model


@pytest.fixture(scope="module")
def builtin():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def test_resolve_model(tmp_path):
    assert resolve_model(None) == str(builtin_model_path())
    assert resolve_model(BUILTIN_MODEL_NAME) == str(builtin_model_path())
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model(tmp_path) == str(tmp_path)
    assert resolve_model("Qwen/Qwen3-30B-A3B") == "Qwen/Qwen3-30B-A3B"


def test_asset_files_and_size():
    path = builtin_model_path()
    assert path.is_dir()
    names = {f.name for f in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 10 * 1024 * 1024


def test_config_is_moe(builtin):
    model, tokenizer = builtin
    cfg = model.config
    assert cfg.model_type == "qwen3_moe"
    assert cfg.num_experts > 1 and cfg.num_experts_per_tok >= 2
    assert cfg.mlp_only_layers == [] and cfg.decoder_sparse_step == 1 and cfg.norm_topk_prob
    # every gmmquant scheme applies: w4a16-g128 groups along K of gate_up (hidden) and down (intermediate)
    assert cfg.hidden_size % 128 == 0 and cfg.moe_intermediate_size % 128 == 0
    assert len(tokenizer) == cfg.vocab_size
    assert tokenizer.eos_token_id == cfg.eos_token_id
    assert tokenizer.pad_token is not None and tokenizer.bos_token is not None


def test_generate(builtin):
    model, tokenizer = builtin
    inputs = tokenizer("The for statement is used to", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert new.numel() > 0
    assert tokenizer.decode(new, skip_special_tokens=True).strip()


def test_heldout_perplexity_matches_recorded(builtin):
    from gmmquant.calibrate.perplexity import heldout_perplexity

    model, tokenizer = builtin
    assert math.isfinite(HELDOUT_PERPLEXITY)
    ppl = heldout_perplexity(model, tokenizer, seq_len=256)
    assert abs(ppl - HELDOUT_PERPLEXITY) <= 0.01 * HELDOUT_PERPLEXITY
