"""Helpers of benchmarks/bench_quality.py and tools/peer_quality.py: shared calibration ids, peer weights,
MoE output error. Fast; the end-to-end peer runs need the peers' venvs and run only when
GMMQUANT_PEER_LLMC / GMMQUANT_PEER_AUTOROUND name their pythons."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from tiny_models import qwen3_moe_config, save_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ql = _load("quality_lib", ROOT / "benchmarks" / "quality_lib.py")
peer = _load("peer_quality", ROOT / "tools" / "peer_quality.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("tiny") / "m", qwen3_moe_config())
    return path


def _model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def test_exported_ids_are_what_gmmquant_calibrates_on(tiny, tmp_path, monkeypatch):
    """The ids file the peers get equals the tensor calibrate_model draws for the same recipe and seed."""
    import gmmquant.calibrate.pipeline as pipeline
    from gmmquant import calibrate_model
    from gmmquant.recipes import load_recipe

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
    ids = ql.shared_calibration_ids(tokenizer, seed=3, num_samples=4, seq_len=32)
    path = ql.export_ids(ids, tmp_path / "ids.pt")
    loaded = torch.load(path)
    assert loaded.dtype == torch.int64 and loaded.shape == (4, 32) and torch.equal(loaded, ids)
    assert not torch.equal(ids, ql.shared_calibration_ids(tokenizer, seed=4, num_samples=4, seq_len=32))

    drawn = []
    real = pipeline.calibration_ids
    monkeypatch.setattr(pipeline, "calibration_ids", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    recipe = ql.bench_recipe_checked(load_recipe("w8a16", num_samples=4, seq_len=32, seed=3), ids)
    calibrate_model(tiny, tmp_path / "q", recipe, offload=False)
    assert len(drawn) == 1 and torch.equal(drawn[0], ids)
    with pytest.raises(ValueError, match="not the shared"):
        ql.bench_recipe_checked(load_recipe("w8a16", num_samples=8, seq_len=32, seed=3), ids)
    with pytest.raises(ValueError, match="int64"):
        ql.export_ids(ids.int(), tmp_path / "bad.pt")


class _Expert(torch.nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.gate_proj = torch.nn.Linear(h, i, bias=False)
        self.up_proj = torch.nn.Linear(h, i, bias=False)
        self.down_proj = torch.nn.Linear(i, h, bias=False)


def _linearized(model) -> torch.nn.Module:
    """A module tree named as both peers unfuse experts: model.layers.N.mlp.experts.E.{gate,up,down}_proj."""
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.layers = torch.nn.ModuleList()
    for layer in model.model.layers:
        fused = layer.mlp.experts
        e_count, two_i, h = fused.gate_up_proj.shape
        experts = torch.nn.ModuleList()
        for e in range(e_count):
            ex = _Expert(h, two_i // 2)
            with torch.no_grad():
                ex.gate_proj.weight.copy_(fused.gate_up_proj[e, : two_i // 2])
                ex.up_proj.weight.copy_(fused.gate_up_proj[e, two_i // 2 :])
                ex.down_proj.weight.copy_(fused.down_proj[e])
            experts.append(ex)
        block = torch.nn.Module()
        block.mlp = torch.nn.Module()
        block.mlp.experts = experts
        root.model.layers.append(block)
    return root


def test_peer_weights_round_trip_into_the_float_model(tiny, tmp_path):
    model = _model(tiny)
    fused = peer.fused_expert_weights(_linearized(model))
    params = dict(model.named_parameters())
    assert set(fused) == {n for n in params if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    for name, tensor in fused.items():
        assert torch.equal(tensor, params[name].float())

    # a perturbed copy written as a peer would, loaded back by the benchmark
    changed = {k: v * 0.5 for k, v in fused.items()}
    path = tmp_path / "peer.safetensors"
    save_file(changed, str(path), metadata={"peer": json.dumps({"tool": "x", "seconds": 1.0})})
    meta = ql.load_expert_weights(model, path)
    assert meta["tool"] == "x" and meta["replaced"] == len(changed)
    for name, tensor in changed.items():
        assert torch.equal(params[name], tensor.to(torch.bfloat16))

    save_file({"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(1, 2, 3)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        ql.load_expert_weights(model, tmp_path / "shape.safetensors")
    save_file({"model.layers.9.mlp.experts.down_proj": torch.zeros(1)}, str(tmp_path / "name.safetensors"))
    with pytest.raises(ValueError, match="not a parameter"):
        ql.load_expert_weights(model, tmp_path / "name.safetensors")
    save_file({"lm_head.weight": torch.zeros(1)}, str(tmp_path / "none.safetensors"))
    with pytest.raises(ValueError, match="no expert weights"):
        ql.load_expert_weights(model, tmp_path / "none.safetensors")


def test_levels_per_group():
    w = torch.arange(16.0).repeat(4, 2)  # 4 rows x 32: each 16-run has 16 levels
    assert peer.max_levels_per_group({"w": w}, group=16) == 16
    assert peer.max_levels_per_group({"w": torch.randn(4, 32)}, group=16) == 16
    assert peer.max_levels_per_group({"w": torch.zeros(4, 32)}, group=16) == 1


def test_moe_error_hooks(tiny):
    from gmmquant.calibrate.perplexity import perplexity

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
    texts = ql.heldout_texts()
    model = _model(tiny)
    with ql.record_moe_outputs(model) as reference:
        base = perplexity(model, tokenizer, texts, 32, max_windows=3)
    assert len(reference) == 2 and all(len(v) == 1 for v in reference.values())  # 3 windows: one batch

    same = ql.MoEError(reference)
    with same.measure(model):
        assert perplexity(model, tokenizer, texts, 32, max_windows=3) == base
    assert same.errors() == [0.0, 0.0] and same.end_to_end() == [0.0, 0.0]

    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj.mul_(1.1)  # only the last block changes
    changed = ql.MoEError(reference)
    with changed.measure(model):
        perplexity(model, tokenizer, texts, 32, max_windows=3)
    first, last = changed.errors()
    assert first == 0.0 and 0.09 < last < 0.11
    assert changed.end_to_end() == changed.errors()  # nothing before the last block changed

    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj.mul_(1.1)  # now the first block's error reaches the last's input
    both = ql.MoEError(reference)
    with both.measure(model):
        perplexity(model, tokenizer, texts, 32, max_windows=3)
    assert both.errors()[1] == pytest.approx(last, rel=0.05) and both.end_to_end()[1] != both.errors()[1]
    assert 0.09 < both.errors()[0] < 0.11

    short = ql.MoEError(reference)
    with short.measure(model):
        pass
    with pytest.raises(RuntimeError, match="calls measured"):
        short.errors()


def test_heldout_windows_match_the_perplexity_protocol(tiny):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
    wins = ql.heldout_windows(tokenizer, 32, 5)
    assert len(wins) == 5 and all(w.dtype == torch.int64 and w.numel() == 32 for w in wins)
    model = _model(tiny)
    from gmmquant.calibrate.perplexity import perplexity

    ours = peer.window_perplexity(model, wins)
    assert ours == pytest.approx(perplexity(model, tokenizer, ql.heldout_texts(), 32, max_windows=5), rel=1e-3)


def test_peer_pythons(tmp_path):
    python = tmp_path / "python"
    python.write_text("")
    assert ql.peer_pythons([], {}) == {}
    assert ql.peer_pythons([], {"GMMQUANT_PEER_LLMC": str(python)}) == {"llmc": str(python)}
    assert ql.peer_pythons([f"autoround={python}"], {}) == {"autoround": str(python)}
    assert ql.peer_pythons(["llmc=/no/such/python"], {}) == {}  # absent: skipped, not an error
    with pytest.raises(ValueError, match="NAME=PYTHON"):
        ql.peer_pythons(["gptqmodel=/x"], {})


def test_spread():
    s = ql.spread([1.0, 2.0, 3.0])
    assert (s["mean"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3) and s["std"] == pytest.approx(1.0)
    assert ql.spread([5.0])["std"] == 0.0


@pytest.mark.parametrize("variant", ql.PEER_VARIANTS[::2], ids=lambda v: v.peer)
def test_peer_runner_end_to_end(variant, tiny, tmp_path):
    """Opt-in (needs the peer's venv): the runner quantizes the experts to int4 levels with our ids."""
    python = ql.peer_pythons([]).get(variant.peer)
    if python is None:
        pytest.skip(f"{ql.PEER_ENV[variant.peer]} does not name the peer's python")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny)
    ids_path = ql.export_ids(ql.shared_calibration_ids(tokenizer, 0, 8, 64), tmp_path / "ids.pt")
    out = tmp_path / "w.safetensors"
    meta = ql.run_peer(python, variant, tiny, ids_path, out)
    assert meta["max_levels_per_group"] <= 16
    model = _model(tiny)
    assert ql.load_expert_weights(model, out)["replaced"] == 2 * model.config.num_hidden_layers
