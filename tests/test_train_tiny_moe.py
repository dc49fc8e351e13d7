"""tools/train_tiny_moe.py runs end to end in-process with tiny sizes (the shipped asset uses its defaults)."""

import importlib.util
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_tiny_moe", TOOLS / "train_tiny_moe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_tiny_moe_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    script = _load_script()
    threads = torch.get_num_threads()
    out = tmp_path / "tiny"
    try:
        result = script.main([
            "--out", str(out), "--steps", "40", "--seed", "1", "--seq-len", "64", "--batch-size", "4",
            "--lr", "5e-3", "--warmup", "5", "--vocab-size", "400", "--hidden-size", "32",
            "--moe-intermediate-size", "32", "--num-layers", "1", "--num-heads", "2", "--num-kv-heads", "1",
            "--head-dim", "16", "--num-experts", "4", "--docstring-chars", "20000", "--topic-repeat", "1",
            "--eval-max-windows", "4", "--monitor-every", "0", "--log-every", "100",
        ])
    finally:
        torch.set_num_threads(threads)
    losses = result["losses"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "qwen3_moe" and model.config.num_experts == 4
    assert tokenizer.eos_token is not None and tokenizer.pad_token is not None
    ids = tokenizer("The if statement", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    assert result["heldout_perplexity"] > 1.0 and result["unigram_perplexity"] > 1.0
