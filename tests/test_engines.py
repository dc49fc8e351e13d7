"""Engine targets: `calibrate --target` refuses, before loading the model, what the engine cannot run for MoE;
`inspect` understands AscendV1 and compressed-tensors directories."""

from __future__ import annotations


import pytest
import torch

from gmmquant.cli import main
from gmmquant.interop import export_checkpoint
from gmmquant.interop.engines import ENGINES, EngineError, get_engine
from gmmquant.pack import PRESETS, get_scheme
from gmmquant.runtime import replace_experts, save_model

transformers = pytest.importorskip("transformers")

# What each engine runs for MoE experts (docs/INTEROP.md's table); the vllm-ascend column is what
# tests/test_vllm_ascend_loader.py runs through vllm-ascend's own loader.
RUNS = {
    "vllm-ascend": {"w8a8-dynamic", "w8a8-static", "w4a16-g32-sym", "w4a16-g64-sym", "w4a16-g128-sym", "w4a16-g256-sym"},
    "vllm": {"w8a16", "w8a16-asym", "w4a16", "w4a16-sym", "w8a8-dynamic"}
            | {f"w4a16-g{g}{s}" for g in (32, 64, 128, 256) for s in ("", "-sym")},
}


def variants():
    """Every preset, symmetric and not where the kernel allows both."""
    for name, preset in PRESETS.items():
        for symmetric in (True, False):
            try:
                scheme = get_scheme(name, symmetric=symmetric)
            except ValueError:
                continue
            label = name + ("" if symmetric == preset.symmetric else ("-sym" if symmetric else "-asym"))
            yield label, scheme


@pytest.mark.parametrize("engine", ["vllm-ascend", "vllm", "hf"])
def test_engine_rules(engine):
    for label, scheme in variants():
        why = get_engine(engine).refusal(scheme)
        expected = engine == "hf" or label in RUNS[engine] or (engine == "vllm-ascend" and label.startswith("w4a8"))
        assert (why is None) == expected, (engine, label, why)
        if why is not None:  # the message names the engine, its version and what it runs
            assert engine in why and ENGINES[engine].version in why and ENGINES[engine].runs in why


def test_smoothquant_reaches_only_hf():
    scheme = get_scheme("w8a8-dynamic")
    assert get_engine("hf").refusal(scheme, smoothquant=True) is None
    for engine in ("vllm-ascend", "vllm"):
        with pytest.raises(EngineError, match="SmoothQuant"):
            get_engine(engine).check(scheme, smoothquant=True)
    with pytest.raises(EngineError, match="unknown target engine"):
        get_engine("tensorrt")


@pytest.mark.parametrize("recipe,target,extra,rule", [
    ("w8a16", "vllm-ascend", [], "W8A16 experts: vllm-ascend registers W8A16 for linear layers only"),
    ("w4a16-g128", "vllm-ascend", [], "asymmetric W4A16"),
    ("w4a16-g128", "vllm-ascend", ["--asymmetric"], "asymmetric W4A16"),
    ("w8a8-static", "vllm", [], "W8A8 static"),
    ("w8a8-dynamic-smooth", "vllm-ascend", [], "SmoothQuant"),
    ("w4a8-dynamic-awq", "vllm-ascend", [], "per-expert AWQ"),  # its smooth_scale has no place in the ascend format
])
def test_calibrate_refuses_before_loading_the_model(tmp_path, capsys, recipe, target, extra, rule):
    missing = tmp_path / "no-such-model"  # never opened: the refusal comes first
    code = main(["calibrate", str(missing), "-o", str(tmp_path / "out"), "--recipe", recipe, "--target", target, *extra])
    err = capsys.readouterr().err
    assert code == 2 and rule in err and target in err and ENGINES[target].version in err, err
    assert not (tmp_path / "out").exists()


def test_calibrate_symmetric_flag_passes_the_target_check(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    code = main(["calibrate", str(missing), "-o", str(tmp_path / "out"), "--recipe", "w4a16-g128", "--target",
                 "vllm-ascend", "--symmetric", "--num-samples", "1", "--seq-len", "8"])
    err = capsys.readouterr().err
    assert code == 2 and "vllm-ascend" not in err and "no-such-model" in err  # got as far as loading the model
    code = main(["calibrate", str(missing), "-o", str(tmp_path / "out"), "--recipe", "w8a8-dynamic", "--asymmetric"])
    assert code == 2 and "symmetric" in capsys.readouterr().err  # W8A8 weights must be symmetric: a recipe error


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    config = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
                                         num_experts=4, num_experts_per_tok=2, head_dim=16)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    replace_experts(model, get_scheme("w4a16-g32", symmetric=True))
    root = tmp_path_factory.mktemp("inspect")
    save_model(model, root / "gmmquant")
    export_checkpoint(root / "gmmquant", root / "ascend", "ascend")
    export_checkpoint(root / "gmmquant", root / "ct", "compressed-tensors")
    return root


@pytest.mark.parametrize("kind,words", [("ascend", ["AscendV1", "model_quant_type W4A16", "group_size 32", "w4a16-g32"]),
                                        ("ct", ["compressed-tensors", "pack-quantized", "w4a16-g32"])])
def test_inspect_foreign_directories(exports, capsys, kind, words):
    assert main(["inspect", str(exports / kind)]) == 0
    out = capsys.readouterr().out
    assert "validation: OK" in out and "INVALID" not in out
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in out  # per-expert tensors listed
    for word in words:
        assert word in out, word


def test_inspect_reports_an_invalid_ascend_directory(exports, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(exports / "ascend", bad)
    for file in bad.glob("*.safetensors"):
        tensors = load_file(file)
        tensors = {k: v for k, v in tensors.items() if "experts.2.up_proj" not in k}
        save_file(tensors, file, metadata={"format": "pt"})
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing for (expert, part) [(2, 1)]" in err[0]
