"""Recipes: the shipped ones load; bad ones are refused with the offending key, before any model is read."""

from __future__ import annotations

import pytest

from gmmquant.cli import main
from gmmquant.recipes import RecipeError, load_recipe, recipe_names

REQUIRED = {"w8a16", "w4a16-g128", "w4a16-g128-gptq", "w8a8-dynamic", "w8a8-dynamic-smooth", "w8a8-static"}


def test_shipped_recipes_load_and_match_their_names():
    assert REQUIRED <= set(recipe_names())
    for name in recipe_names():
        recipe = load_recipe(name)
        assert recipe.name == name
        scheme = recipe.quant_scheme()
        assert scheme.name == name
    assert load_recipe("w4a16-g128-gptq").algorithm == "gptq"
    assert load_recipe("w4a16-g128-gptq").quant_scheme().group_size == 128
    assert load_recipe("w8a8-dynamic-smooth").smoothquant.alpha == 0.5
    assert load_recipe("w8a8-static").quant_scheme().activation == "static"
    assert load_recipe(None).name == "w8a16"


def test_recipe_by_path_and_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("scheme: w4a16-g64\nsymmetric: true\nobserver: mse\ncalibration: {num_samples: 4}\n")
    recipe = load_recipe(path, seq_len=32, dataset=None)
    assert recipe.name == "mine" and recipe.observer == "mse"
    assert recipe.calibration.num_samples == 4 and recipe.calibration.seq_len == 32
    scheme = recipe.quant_scheme()
    assert (scheme.weight_bits, scheme.group_size, scheme.symmetric) == (4, 64, True)


def test_default_ignore_keeps_routers_shared_gates_and_lm_head_out():
    recipe = load_recipe("w8a16")
    assert recipe.targets_module("model.layers.0.mlp.experts")
    for name in ("model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate", "lm_head", "model.layers.3.mlp.router"):
        assert not recipe.targets_module(name)


BAD = [
    ("scheme: w8a16\nfoo: 1\n", "foo: unknown key"),
    ("scheme: w8a16\ncalibration: {num_sample: 4}\n", "calibration.num_sample: unknown key"),
    ("scheme: w8a16\ngptq: {blocksize: 4}\n", "gptq.blocksize: unknown key"),
    ("scheme: w8a16\ncalibration: {num_samples: many}\n", "calibration.num_samples: expected int"),
    ("scheme: w8a16\ncalibration: {all_experts: 1}\n", "calibration.all_experts: expected bool"),
    ("scheme: w8a16\ncalibration: {seq_len: 0}\n", "calibration.seq_len: must be > 0"),
    ("scheme: w8a16\ngroup_size: 128\n", "group_size:"),  # int8 per-group: no kernel row
    ("scheme: w4a16\ngroup_size: 100\n", "group_size:"),
    ("scheme: w8a8-dynamic\nsymmetric: false\n", "symmetric:"),  # W8A8 weights must be symmetric
    ("scheme: w8a16\nsmoothquant: {alpha: 0.5}\n", "smoothquant: needs per-token int8 activations"),
    ("scheme: w8a8-static\nsmoothquant: {alpha: 0.5}\n", "smoothquant: needs per-token int8 activations"),
    ("scheme: w8a8-dynamic\nsmoothquant: {alpha: 1.5}\n", "smoothquant.alpha: must be in [0, 1]"),
    ("scheme: w9a16\n", "scheme: unknown scheme"),
    ("algorithm: gptq\n", "scheme: required key is missing"),
    ("scheme: w8a16\nalgorithm: awq\n", "algorithm: must be one of"),
    ("scheme: w8a16\nobserver: percentile\n", "observer: must be one of"),
    ("scheme: w8a16\ntargets: model.layers.0\n", "targets: expected a list"),
    ("scheme: w8a16\ntargets: []\n", "targets: the list is empty"),
    ("scheme: w4a16-g128\ngptq: {block_size: 96}\n", "gptq.block_size"),
    ("- just\n- a list\n", "recipe: expected a mapping"),
    ("scheme: [unclosed\n", "not valid YAML"),
    # learned rounding, GPTQ blend, AWQ, router weighting
    ("scheme: w4a16\nalgorithm: autoround\nautoround: {iters: 0}\n", "autoround.iters: must be > 0"),
    ("scheme: w4a16\nautoround: {init: awq}\n", "autoround.init: must be one of"),
    ("scheme: w4a16\nautoround: {min_clip: 0}\n", "autoround.min_clip: must be in (0, 1]"),
    ("scheme: w4a16\nautoround: {lr: -1}\n", "autoround.lr: must be > 0"),
    ("scheme: w4a16\nautoround: {itres: 3}\n", "autoround.itres: unknown key"),
    ("scheme: w4a16\ngptq: {blend_all_tokens: -1}\n", "gptq.blend_all_tokens: must be >= 0"),
    ("scheme: w8a8-dynamic\nalgorithm: autoround\nsmoothquant: {alpha: 0.5}\n", "autoround: learned rounding does not"),
    ("scheme: w8a8-static\nawq: {grid: 20}\n", "awq: needs per-token int8 activations"),
    ("scheme: w4a8-dynamic\nawq: {grid: 0}\n", "awq.grid: must be > 0"),
    ("scheme: w4a8-dynamic\nawq: {}\nsmoothquant: {alpha: 0.5}\n", "awq: does not combine with smoothquant"),
    ("scheme: w4a8-dynamic\nalgorithm: autoround\nawq: {}\n", "awq: does not combine with algorithm: autoround"),
    ("scheme: w4a16\ncalibration: {router_weighted: true, all_experts: true}\n", "calibration.router_weighted: does not"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m for _, m in BAD])
def test_bad_recipes_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert message in str(err.value)


def test_unknown_recipe_name_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe 'w3a16'.*w8a16"):
        load_recipe("w3a16")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="calibration.bogus: unknown key"):
        load_recipe("w8a16", bogus=3)


def test_cli_refuses_a_bad_recipe_before_looking_at_the_model(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheme: w8a16\ngroup_size: 128\n")
    out = tmp_path / "out"
    # the model path does not exist: the recipe error must come first
    assert main(["calibrate", str(tmp_path / "no-such-model"), "--recipe", str(bad), "-o", str(out)]) == 2
    assert "group_size" in capsys.readouterr().err
    assert not out.exists()
