"""`calibrate`: every shipped recipe end to end on tiny saved models, per-expert coverage and fallbacks,
GPTQ vs RTN, SmoothQuant's exact fold, errors that leave nothing behind."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from gmmquant import load_model
from gmmquant.calibrate.pipeline import calibrate_model
from gmmquant.calibrate.data import DatasetError
from gmmquant.pack.checkpoint import load_quantized
from gmmquant.recipes import load_recipe
from gmmquant.runtime import NoExpertsError
from gmmquant.runtime.experts import GMMExperts

from tiny_models import qwen3_moe_config, save_tiny_model

FAST = dict(num_samples=8, seq_len=64, batch_size=4)
# Bound on each MoE block's relative output error (||q - f|| / ||f|| on the calibration tokens) on the tiny
# random model: half a step of int8 is ~0.4% of a channel's range, of int4-g128 ~7%.
OUTPUT_ERROR_BOUND = {"w8a16": 0.03, "w8a8-dynamic": 0.05, "w8a8-dynamic-smooth": 0.05, "w8a8-static": 0.08,
                      "w4a16-g128": 0.25, "w4a16-g128-gptq": 0.25}


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("qwen3") / "model", qwen3_moe_config(), outlier_channels=4)


def gpt_oss_dir(path, dead_expert=None):
    config = transformers.GptOssConfig(vocab_size=384, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=8,
                                       num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                                       sliding_window=32, max_position_embeddings=512)
    save_tiny_model(path, config)
    if dead_expert is not None:  # the router can never pick it: its bias is -1e4
        file = path / "model.safetensors"
        with safe_open(str(file), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for name, t in tensors.items():
            if name.endswith("mlp.router.bias"):
                t[dead_expert] = -1e4
        from safetensors.torch import save_file
        save_file(tensors, str(file), metadata={"format": "pt"})
    return path


def generate(path):
    model = load_model(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("The for statement", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    return model


@pytest.mark.parametrize("name", sorted(OUTPUT_ERROR_BOUND))
def test_recipe_end_to_end(qwen3_dir, tmp_path, name):
    report = calibrate_model(qwen3_dir, tmp_path / "out", load_recipe(name, **FAST))
    assert len(report.layers) == 2
    for layer in report.layers:
        assert layer.experts_covered == layer.num_experts == 8
        assert sum(layer.routed) == 8 * 64 * 2  # every token goes to top-2 experts
        assert 0 < layer.output_error < OUTPUT_ERROR_BOUND[name], (layer.index, layer.output_error)
        assert 0 < layer.weight_error < 0.3  # GPTQ trades weight error for output error
    ck = load_quantized(tmp_path / "out")
    assert set(ck.specs) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    saved = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert saved["recipe"]["name"] == name and len(saved["layers"]) == 2
    assert saved["layers"][0]["routed_tokens_per_expert"] == report.layers[0].routed
    for name_, (dtype, shape) in ck.headers.items():
        if name_.endswith("scale"):
            assert torch.isfinite(ck.tensor(name_).float()).all()
    model = generate(tmp_path / "out")
    assert all(isinstance(model.get_submodule(p), GMMExperts) for p in ck.specs)


def test_quantized_model_reproduces_the_recorded_output_error(qwen3_dir, tmp_path):
    """The checkpoint on disk is what was measured: the loaded model's MoE outputs differ from float's
    by about the error the calibration summary reported."""
    recipe = load_recipe("w4a16-g128", **FAST)
    report = calibrate_model(qwen3_dir, tmp_path / "out", recipe)
    float_model = transformers.AutoModelForCausalLM.from_pretrained(qwen3_dir)
    quant_model = load_model(tmp_path / "out")
    ids = torch.randint(0, 384, (2, 64), generator=torch.Generator().manual_seed(5))
    outs = {}
    for tag, model in (("f", float_model), ("q", quant_model)):
        block = model.model.layers[0].mlp
        h = block.register_forward_hook(lambda m, a, o, tag=tag: outs.__setitem__(tag, o.detach().float()))
        with torch.no_grad():
            model(ids)
        h.remove()
    err = float((outs["q"] - outs["f"]).norm() / outs["f"].norm())
    assert 0.3 * report.layers[0].output_error < err < 3 * report.layers[0].output_error


def test_gptq_beats_rtn_on_the_same_weights_and_data(qwen3_dir, tmp_path):
    common = dict(FAST, all_experts=True, min_tokens=0)
    gptq = calibrate_model(qwen3_dir, tmp_path / "gptq", load_recipe("w4a16-g128-gptq", **common))
    rtn_recipe = load_recipe("w4a16-g128-gptq", **common)
    rtn_recipe = type(rtn_recipe)(**{**rtn_recipe.__dict__, "algorithm": "rtn"})
    rtn = calibrate_model(qwen3_dir, tmp_path / "rtn", rtn_recipe)
    for g, r in zip(gptq.layers, rtn.layers):
        assert not g.fallbacks
        assert g.output_error < 0.9 * r.output_error, (g.index, g.output_error, r.output_error)
    a, b = load_quantized(tmp_path / "gptq"), load_quantized(tmp_path / "rtn")
    name = "model.layers.0.mlp.experts.down_proj.qweight"
    assert not torch.equal(a.tensor(name), b.tensor(name))  # GPTQ really ran


def test_smoothquant_fold_is_exact_in_float(tmp_path):
    """Folding SmoothQuant into the norm (and the router and shared experts that read it) is an exact
    transform: the float model with folded weights gives bit-identical logits."""
    from gmmquant.calibrate.smoothquant import apply_norm_fold, find_norm_fold, smoothing_factors

    config = transformers.Qwen2MoeConfig(vocab_size=384, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                                         shared_expert_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, num_experts=8, num_experts_per_tok=2)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
        ids = torch.randint(0, 384, (2, 48), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            before = model(ids).logits
        for layer in model.model.layers:
            captured = {}
            h = layer.register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
            with torch.no_grad():
                model(ids)
            h.remove()
            block, experts = layer.mlp, layer.mlp.experts
            fold = find_norm_fold(layer, block, experts, lambda: layer(*captured["args"], **captured["kwargs"]))
            assert fold is not None and fold.norm is layer.post_attention_layernorm
            assert {id(m) for m in fold.readers} == {id(layer.mlp.gate), id(layer.mlp.shared_expert.gate_proj),
                                                     id(layer.mlp.shared_expert.up_proj), id(layer.mlp.shared_expert_gate)}
            s = smoothing_factors(torch.rand(128) * 10 + 0.1, torch.rand(128) + 0.01, 0.5)
            assert not torch.all(s == 1)
            apply_norm_fold(fold, s)
            with torch.no_grad():  # experts' gate_up: [E, 2I, H], input channels on the last axis
                experts.gate_up_proj.mul_(s.to(dtype))
        with torch.no_grad():
            after = model(ids).logits
        assert torch.equal(before, after), (dtype, float((before - after).abs().max()))


def test_smoothquant_checkpoint_folds_gate_up_and_smooths_down(qwen3_dir, tmp_path):
    report = calibrate_model(qwen3_dir, tmp_path / "out", load_recipe("w8a8-dynamic-smooth", **FAST))
    assert all(layer.smoothing == "norm-fold+per-expert" for layer in report.layers)
    ck = load_quantized(tmp_path / "out")
    prefix = "model.layers.0.mlp.experts"
    assert f"{prefix}.down_proj.smooth_scale" in ck.weight_map
    assert f"{prefix}.gate_up_proj.smooth_scale" not in ck.weight_map
    smooth = ck.tensor(f"{prefix}.down_proj.smooth_scale").float()
    assert torch.equal(torch.exp2(torch.round(torch.log2(smooth))), smooth)  # powers of two
    with safe_open(str(qwen3_dir / "model.safetensors"), "pt") as f:
        original_norm = f.get_tensor("model.layers.0.post_attention_layernorm.weight")
    folded_norm = ck.tensor("model.layers.0.post_attention_layernorm.weight")
    assert not torch.equal(original_norm, folded_norm)
    # SmoothQuant moved the outliers: the same recipe without it is worse on this model
    plain = calibrate_model(qwen3_dir, tmp_path / "plain", load_recipe("w8a8-dynamic", **FAST))
    assert report.layers[0].output_error < plain.layers[0].output_error


def test_expert_without_tokens_all_experts_covers_it(tmp_path):
    src = gpt_oss_dir(tmp_path / "model", dead_expert=3)
    without = calibrate_model(src, tmp_path / "a", load_recipe("w4a16-g128-gptq", **FAST, all_experts=False, min_tokens=1))
    for layer in without.layers:
        assert layer.routed[3] == 0 and layer.experts_covered == 7
        assert f"model.layers.{layer.index}.mlp.experts[3].gate_up_proj" in layer.fallbacks
        assert f"model.layers.{layer.index}.mlp.experts[3].down_proj" in layer.fallbacks
        assert len(layer.fallbacks) == 2
    covered = calibrate_model(src, tmp_path / "b", load_recipe("w4a16-g128-gptq", **FAST, all_experts=True, min_tokens=1))
    for layer in covered.layers:
        assert layer.routed[3] == 0  # the router still never picks it ...
        assert layer.experts_covered == 8 and not layer.fallbacks  # ... but its statistics saw every token
    generate(tmp_path / "b")


def test_model_without_experts_and_empty_dataset_write_nothing(tmp_path, qwen3_dir):
    dense = tmp_path / "dense"
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(dense)
    with pytest.raises(NoExpertsError, match="no MoE experts modules"):
        calibrate_model(dense, tmp_path / "out", "w8a16")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="is empty"):
        calibrate_model(qwen3_dir, tmp_path / "out", load_recipe("w8a16", dataset=str(empty)))
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        calibrate_model(tmp_path / "missing", tmp_path / "out", "w8a16")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path):
    from tiny_models import byte_level_tokenizer

    src = save_tiny_model(tmp_path / "m", qwen3_moe_config(vocab_size=300))
    byte_level_tokenizer(384).save_pretrained(src)  # ids up to 383 for a 300-token embedding
    with pytest.raises(DatasetError, match="outside the model's vocabulary of 300"):
        calibrate_model(src, tmp_path / "out", load_recipe("w8a16", **FAST))
    assert not (tmp_path / "out").exists()


def test_group_that_does_not_divide_k_is_refused_before_loading(tmp_path):
    src = save_tiny_model(tmp_path / "m", qwen3_moe_config(hidden_size=96, head_dim=24, moe_intermediate_size=64))
    with pytest.raises(ValueError, match="group_size 128 does not divide K=96"):
        calibrate_model(src, tmp_path / "out", "w4a16-g128")
    assert not (tmp_path / "out").exists()


def test_offload_and_in_memory_give_the_same_checkpoint(qwen3_dir, tmp_path):
    recipe = load_recipe("w8a8-static", **FAST)
    calibrate_model(qwen3_dir, tmp_path / "a", recipe, offload=True)
    calibrate_model(qwen3_dir, tmp_path / "b", recipe, offload=False)
    a, b = load_quantized(tmp_path / "a"), load_quantized(tmp_path / "b")
    assert set(a.weight_map) == set(b.weight_map)
    for name in a.weight_map:
        assert torch.equal(a.tensor(name), b.tensor(name)), name


def test_cli_calibrate_prints_the_summary(qwen3_dir, tmp_path, capsys):
    from gmmquant.cli import main

    out = tmp_path / "out"
    rc = main(["calibrate", str(qwen3_dir), "-o", str(out), "--recipe", "w4a16-g128-gptq", "--num-samples", "4",
               "--seq-len", "32", "--min-tokens", "20"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "min tok" in text and "output err" in text
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 9]
    assert [r[0] for r in rows] == ["0", "1"] and all(r[1] == "8" for r in rows)
    assert "experts that received calibration tokens: 16/16" in text
    assert "fell back to RTN" in text  # 4 x 32 tokens, top-2 of 8: some experts see fewer than 20
    assert load_quantized(out).specs
    assert main(["calibrate", str(qwen3_dir), "-o", str(out), "--recipe", "w8a16", "--num-samples", "2", "--seq-len", "32"]) == 2
    assert "already exists" in capsys.readouterr().err


FAMILY_RECIPES = {  # every family with the recipe kind that exercises the most of its layout
    "mixtral": "gptq", "qwen2_moe": "smooth", "qwen3_moe": "static", "deepseek_v3": "smooth", "glm4_moe": "gptq",
    "olmoe": "static", "phimoe": "gptq", "granitemoe": "smooth", "gpt_oss": "smooth", "nemotron_h": "gptq",
}


@pytest.mark.parametrize("family", sorted(FAMILY_RECIPES))
def test_every_family_calibrates_loads_and_generates(family, tmp_path):
    from gmmquant.recipes import parse_recipe
    from test_runtime import FAMILIES

    kind = FAMILY_RECIPES[family]
    data = {"num_samples": 4, "seq_len": 32, "all_experts": True, "min_tokens": 1}
    recipe = parse_recipe({
        "gptq": {"name": "g32-gptq", "scheme": "w4a16-g32", "algorithm": "gptq", "gptq": {"act_order": True, "block_size": 32}},
        "smooth": {"name": "smooth", "scheme": "w8a8-dynamic", "smoothquant": {"alpha": 0.5}},
        "static": {"name": "static", "scheme": "w8a8-static"},
    }[kind] | {"calibration": data})
    config = FAMILIES[family]()
    config.vocab_size = 384
    src = save_tiny_model(tmp_path / "model", config)
    report = calibrate_model(src, tmp_path / "out", recipe)
    assert report.layers and all(layer.experts_covered == layer.num_experts for layer in report.layers)
    bound = 0.15 if kind == "gptq" else 0.05
    assert all(0 < layer.output_error < bound for layer in report.layers), [l.output_error for l in report.layers]
    if kind == "smooth" and family != "nemotron_h":  # no norm output feeds the nemotron_h MoE block as is: per-expert only
        assert all(layer.smoothing == "norm-fold+per-expert" for layer in report.layers)
    generate(tmp_path / "out")


def test_cli_defaults_to_the_builtin_model_and_eval_compares(tmp_path, capsys):
    """The README's demo in small: `gmmquant calibrate -o OUT` (built-in model, default recipe), then
    `gmmquant eval` on the float model and on the checkpoint."""
    from gmmquant.builtin import builtin_model_path
    from gmmquant.cli import main

    out = tmp_path / "demo"
    assert main(["calibrate", "-o", str(out), "--num-samples", "2", "--seq-len", "64"]) == 0
    text = capsys.readouterr().out
    assert "the built-in model" in text and "recipe 'w8a16'" in text
    assert load_quantized(out).config["model_type"] == "qwen3_moe"
    assert json.loads((out / "calibration.json").read_text())["recipe"]["name"] == "w8a16"
    assert (out / "tokenizer.json").is_file()
    values = {}
    for label, args in (("float", []), ("w8a16", [str(out)])):
        assert main(["eval", *args, "--max-windows", "8"]) == 0
        line = capsys.readouterr().out
        assert ("(float)" if label == "float" else "(gmmquant w8a16)") in line
        values[label] = float(line.split("perplexity ")[1].split()[0])
    assert values["float"] < 100  # a trained model (the unigram baseline is ~800)
    assert abs(values["w8a16"] / values["float"] - 1) < 0.01
    assert main(["eval", str(builtin_model_path()), "--dataset", str(tmp_path / "nope.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_module_list_experts_are_refused_by_the_observer():
    from gmmquant.calibrate.stats import ExpertsObserver
    from gmmquant.pack.layouts import find_experts_modules
    from test_runtime import OldStyleMoE

    block = OldStyleMoE()
    (path, info), = find_experts_modules(block).items()
    with pytest.raises(ValueError, match="nn.ModuleList of experts is not supported"):
        ExpertsObserver(block.get_submodule(path), info, all_experts=False, hessian=False)
