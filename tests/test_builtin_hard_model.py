"""The harder built-in benchmark model (gmmquant/assets/tiny-moe-hard, `builtin-hard`): loads, scores its
recorded perplexity, and has the activation outliers on the MoE inputs that make it hard."""

import math

import pytest
import torch

from gmmquant.builtin import HARD_MODEL_NAME, HELDOUT_PERPLEXITIES, builtin_model_path, resolve_model

# Held-out perplexity of the first 8 windows of 256 tokens (float32, `heldout_perplexity(max_windows=8)`),
# measured when the asset was built; the full held-out value is HELDOUT_PERPLEXITIES["builtin-hard"].
FIRST_WINDOWS = 8
FIRST_WINDOWS_PERPLEXITY = 32.674


@pytest.fixture(scope="module")
def hard():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_model_path(HARD_MODEL_NAME)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def test_names_and_files():
    path = builtin_model_path(HARD_MODEL_NAME)
    assert resolve_model(HARD_MODEL_NAME) == str(path) != str(builtin_model_path())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in path.iterdir()}
    assert sum(f.stat().st_size for f in path.iterdir()) <= 17 * 1024 * 1024
    with pytest.raises(ValueError, match="unknown built-in model"):
        builtin_model_path("nope")


def test_config_is_harder_than_the_tiny_model(hard):
    cfg = hard[0].config
    assert cfg.model_type == "qwen3_moe" and cfg.hidden_size >= 256
    assert cfg.num_experts >= 16 and cfg.num_experts_per_tok >= 4
    assert cfg.hidden_size % 128 == 0 and cfg.moe_intermediate_size % 128 == 0  # every group-128 scheme fits


def test_perplexity_matches_recorded(hard):
    from gmmquant.calibrate.perplexity import heldout_perplexity

    model, tokenizer = hard
    assert math.isfinite(HELDOUT_PERPLEXITIES[HARD_MODEL_NAME])
    ppl = heldout_perplexity(model, tokenizer, seq_len=256, max_windows=FIRST_WINDOWS)
    assert abs(ppl - FIRST_WINDOWS_PERPLEXITY) <= 0.01 * FIRST_WINDOWS_PERPLEXITY


@torch.no_grad()
def test_expert_inputs_have_outlier_channels(hard):
    """Per MoE layer, a few input channels' absmax dwarfs the median channel's (planted 20-50x)."""
    from gmmquant.calibrate.corpus import builtin_documents
    from gmmquant.calibrate.data import token_stream

    model, tokenizer = hard
    absmax = {}
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda _m, args, i=i: absmax.__setitem__(i, args[0].abs().amax(dim=(0, 1))))
        for i, layer in enumerate(model.model.layers)]
    try:
        model(input_ids=token_stream(tokenizer, builtin_documents("heldout"))[:512].reshape(2, 256))
    finally:
        for h in hooks:
            h.remove()
    assert len(absmax) == model.config.num_hidden_layers
    for i, a in absmax.items():
        ratio = float(a.max() / a.median())
        assert ratio >= 10, f"layer {i}: max/median channel absmax of the expert inputs {ratio:.1f}"
