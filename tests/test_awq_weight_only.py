"""Weight-only AWQ (`awq:` with a w4a16 scheme): one factor per experts module, searched by the router-weighted
MoE output error and folded into the norm before the experts (and the router's columns) exactly. Float64
reference for the search's a = 0 candidate, planted outliers the search must find, the fold leaving the float
block unchanged, and a calibrated checkpoint closer to the float model than GPTQ alone."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors import safe_open

from gmmquant import calibrate_model, load_model
from gmmquant.calibrate.awq import awq_shared_factor
from gmmquant.calibrate.observers import OBSERVERS
from gmmquant.pack.primitives import quantize_weight
from gmmquant.pack.schemes import get_scheme
from gmmquant.recipes import RecipeError, parse_recipe

from tiny_models import qwen3_moe_config, save_tiny_model

OUTLIERS = (5, 40, 99)


def swiglu(h):
    half = h.shape[-1] // 2
    return torch.nn.functional.silu(h[..., :half]) * h[..., half:]


def routed_calls(seed=0, experts=4, calls=3, m=96, k=128):
    """Calls with planted outlier channels (x 25) and random top-2 routing with softmax-like weights."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(calls):
        x = torch.randn(m, k, generator=gen)
        x[:, list(OUTLIERS)] *= 25.0
        idx = torch.stack([torch.randperm(experts, generator=gen)[:2] for _ in range(m)])
        p = torch.rand(m, 1, generator=gen)
        out.append((x, idx, torch.cat([p, 1 - p], dim=-1)))
    return out


def test_search_a0_is_rtn_and_finds_the_planted_outliers():
    scheme = get_scheme("w4a16-g128", symmetric=True)
    gen = torch.Generator().manual_seed(1)
    w1 = torch.randn(4, 128, 256, generator=gen) / 11
    w2 = torch.randn(4, 128, 128, generator=gen) / 11
    calls = routed_calls()
    s, err0, err = awq_shared_factor(calls, w1, w2, swiglu, scheme, torch.bfloat16, OBSERVERS["minmax"], grid=10,
                                     max_rows=10_000)
    # a = 0: plain RTN, scored in float64 with each routed token weighted by its router weight squared
    num = den = 0.0
    x, ids, p = (torch.cat([c[i] for c in calls]) for i in range(3))
    for e in range(4):
        picked = ids == e
        rows = picked.any(dim=-1)
        c = (p * picked).sum(dim=-1)[rows].double().pow(2)
        xe = x[rows].double()
        dq = quantize_weight(w1[e].unsqueeze(0), scheme, torch.bfloat16).dequantize()[0].double()
        ref = swiglu(xe @ w1[e].double()) @ w2[e].double()
        num += float(((swiglu(xe @ dq) @ w2[e].double() - ref).pow(2).mean(dim=-1) * c).sum())
        den += float(c.sum())
    assert err0 == pytest.approx(num / den, rel=1e-4)
    assert err < 0.5 * err0, (err, err0)
    assert torch.equal(s, torch.exp2(torch.round(torch.log2(s))))  # powers of two: the fold is exact
    assert float(s[list(OUTLIERS)].min()) > float(s.median())  # the outlier channels get the largest factors


def test_search_keeps_a0_without_outliers_worth_moving():
    """Uniform inputs: no scaling should win by much; whatever is chosen is never worse than a = 0."""
    scheme = get_scheme("w4a16-g128")
    gen = torch.Generator().manual_seed(2)
    w1, w2 = torch.randn(4, 128, 256, generator=gen) / 11, torch.randn(4, 128, 128, generator=gen) / 11
    calls = [(torch.randn(64, 128, generator=gen), torch.randint(0, 4, (64, 2), generator=gen), None)]
    s, err0, err = awq_shared_factor(calls, w1, w2, swiglu, scheme, torch.bfloat16, OBSERVERS["minmax"], grid=6)
    assert err <= err0 and s.shape == (128,)


FAST = {"num_samples": 4, "seq_len": 64, "batch_size": 4, "min_tokens": 16}


@pytest.fixture(scope="module")
def outlier_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("awq") / "model", qwen3_moe_config(), outlier_channels=3)


def recipe(awq: bool, scheme="w4a16-g128"):
    data = {"name": "t", "scheme": scheme, "symmetric": True, "algorithm": "gptq", "calibration": FAST}
    if awq:
        data["awq"] = {"grid": 10, "max_rows": 512}
    return parse_recipe(data)


@torch.no_grad()
def logits_error(model_dir, checkpoint, ids):
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()(ids).logits.float()
    got = load_model(checkpoint)(ids).logits.float()
    return float((got - ref).norm() / ref.norm())


def test_pipeline_folds_awq_into_the_norm_and_beats_gptq(outlier_dir, tmp_path):
    reports = {awq: calibrate_model(outlier_dir, tmp_path / str(awq), recipe(awq)) for awq in (False, True)}
    for plain, folded in zip(reports[False].layers, reports[True].layers):
        assert folded.smoothing == "norm-fold"
        assert folded.output_error < plain.output_error, (folded.output_error, plain.output_error)
    ids = torch.randint(0, 384, (2, 48), generator=torch.Generator().manual_seed(0))
    assert logits_error(outlier_dir, tmp_path / "True", ids) < logits_error(outlier_dir, tmp_path / "False", ids)
    # the norm and the router changed by exact powers of two, inversely; nothing else outside the experts
    src = transformers.AutoModelForCausalLM.from_pretrained(outlier_dir, dtype=torch.bfloat16).state_dict()
    files = sorted((tmp_path / "True").glob("*.safetensors"))
    saved = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            saved.update({k: h.get_tensor(k) for k in h.keys() if k in src})
    norm = "model.layers.0.post_attention_layernorm.weight"
    ratio = src[norm].float() / saved[norm].float()
    assert not torch.equal(ratio, torch.ones_like(ratio))
    assert torch.equal(ratio, torch.exp2(torch.round(torch.log2(ratio))))
    router = "model.layers.0.mlp.gate.weight"
    torch.testing.assert_close(saved[router].float() / src[router].float(), ratio.expand_as(src[router]), rtol=0, atol=0)
    unchanged = [k for k in saved if "post_attention_layernorm" not in k and ".mlp.gate." not in k and "experts" not in k]
    assert unchanged and all(torch.equal(saved[k], src[k]) for k in unchanged)


def test_awq_rules():
    parse_recipe({"name": "t", "scheme": "w4a16-g128", "algorithm": "autoround", "awq": {}})  # weight-only: allowed
    with pytest.raises(RecipeError, match="awq: needs per-token int8 activations"):
        parse_recipe({"name": "t", "scheme": "w8a8-static", "awq": {}})
    with pytest.raises(RecipeError, match="awq: does not combine with algorithm: autoround for dynamic schemes"):
        parse_recipe({"name": "t", "scheme": "w4a8-dynamic", "algorithm": "autoround", "awq": {}})
