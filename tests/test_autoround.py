"""Learned rounding and clipping (calibrate/autoround.py), GPTQ's blended Hessian, and what the streamed path
refuses: exact storage of what was optimised, float64 references, lower output error than RTN on a model with
planted activation outliers, an expert without tokens (falls back, reported)."""

from __future__ import annotations


import pytest
import torch
import transformers

from gmmquant.calibrate.autoround import (
    ARLayer,
    _base_range,
    _fake_quant,
    autoround_expert,
    fake_quant_tokens,
    final_quantize,
)
from gmmquant.calibrate.pipeline import calibrate_model
from gmmquant.calibrate.quantize import blend_hessian, quantize_experts
from gmmquant.calibrate.stats import ExpertsObserver, InputStats
from gmmquant.pack.layouts import find_experts_modules
from gmmquant.pack.primitives import quantize_weight
from gmmquant.pack.schemes import get_scheme
from gmmquant.recipes import RecipeError, load_recipe, parse_recipe

from tiny_models import byte_level_tokenizer, qwen3_moe_config

SCHEMES = [("w4a16-g128", None), ("w4a16-g128", True), ("w4a16", None), ("w4a16", True), ("w4a8-dynamic", None),
           ("w4a8-dynamic-g128", None)]
OUTLIERS, FACTOR = (3, 17, 90), 30.0


def scheme_of(name, sym):
    return get_scheme(name, **({} if sym is None else {"symmetric": sym}))


def swiglu(h):
    half = h.shape[-1] // 2
    return torch.nn.functional.silu(h[..., :half]) * h[..., half:]


def outlier_expert(seed=0, m=384, k=128, i=128):
    """Inputs with planted outlier channels and an expert whose matching input rows are divided by the same
    factor (the float function is that of an expert without outliers)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w1 = torch.randn(k, 2 * i, generator=gen) * k**-0.5
    w2 = torch.randn(i, k, generator=gen) * i**-0.5
    x[:, list(OUTLIERS)] *= FACTOR
    w1[list(OUTLIERS)] /= FACTOR
    return x, w1, w2


def output_mse(x, ws, quant_act=False):
    h = x
    for j, w in enumerate(ws):
        if j:
            h = swiglu(h)
        if quant_act:
            h = fake_quant_tokens(h)
        h = h @ w
    return h


@pytest.mark.parametrize("name,sym", SCHEMES)
def test_stored_codes_dequantize_to_the_optimised_weight(name, sym):
    """final_quantize (pack.primitives) gives exactly the weight _fake_quant evaluated, for random learned
    parameters: the checkpoint is what the loss was measured on."""
    scheme = scheme_of(name, sym)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(256, 128, generator=gen) * 0.05
    lo, hi = _base_range(w, scheme.group_size)
    v = torch.rand(w.shape, generator=gen) - 0.5
    alpha = 0.5 + 0.5 * torch.rand(lo.shape, generator=gen)
    beta = 0.5 + 0.5 * torch.rand(lo.shape, generator=gen)
    for act_dtype in (torch.bfloat16, torch.float16):
        qw = final_quantize(w, v, alpha, beta, scheme, act_dtype)
        loop = _fake_quant(w, v, alpha, beta, lo, hi, scheme, act_dtype)
        assert torch.equal(qw.dequantize()[0], loop)
        assert qw.scale.dtype == quantize_weight(w.unsqueeze(0), scheme, act_dtype).scale.dtype
    # no offset, no clipping: exactly round-to-nearest
    ones = torch.ones_like(lo)
    rtn = quantize_weight(w.unsqueeze(0), scheme, torch.bfloat16)
    start = final_quantize(w, torch.zeros_like(w), ones, ones, scheme, torch.bfloat16)
    assert torch.equal(start.qweight, rtn.qweight) and torch.equal(start.scale, rtn.scale)


def test_fake_quant_tokens_matches_float64():
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(2)) * 3
    ref = x.double()
    s = ref.abs().amax(dim=-1, keepdim=True) / 127
    expected = torch.clamp(torch.round(ref / s), -127, 127) * s
    torch.testing.assert_close(fake_quant_tokens(x).double(), expected, rtol=0, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fake_quant_tokens(xg).sum(), xg)
    assert torch.equal(g, torch.ones_like(g))  # straight through


@pytest.mark.parametrize("name,sym", SCHEMES)
def test_learned_rounding_beats_rtn_on_planted_outliers(name, sym):
    scheme = scheme_of(name, sym)
    quant_act = scheme.activation == "dynamic"
    x, w1, w2 = outlier_expert(m=256)
    res = autoround_expert(x, [ARLayer(w1), ARLayer(w2)], swiglu, scheme, torch.bfloat16, iters=30,
                           quant_act=quant_act, batch_rows=128)
    ref = output_mse(x, [w1, w2])
    rtn = [quantize_weight(w.unsqueeze(0), scheme, torch.bfloat16).dequantize()[0] for w in (w1, w2)]
    learned = [q.dequantize()[0] for q in res.quantized]
    err_rtn = float((output_mse(x, rtn, quant_act) - ref).pow(2).mean())
    err_ar = float((output_mse(x, learned, quant_act) - ref).pow(2).mean())
    # the objective is the error on the expert's calibration rows (as the calibration report measures it);
    # on random Gaussian data little of it carries over to unseen rows, so the test checks those rows
    torch.testing.assert_close(err_rtn, res.loss_start, rtol=1e-4, atol=0)  # the start is exactly RTN
    torch.testing.assert_close(err_ar, res.loss_best, rtol=1e-4, atol=0)  # the stored tensors are what was kept
    assert err_ar < 0.9 * err_rtn, (err_ar, err_rtn)


def test_blend_hessian_matches_float64():
    gen = torch.Generator().manual_seed(3)
    xe, xa = torch.randn(5, 16, generator=gen), torch.randn(300, 16, generator=gen)
    he, ha = 2 * xe.T @ xe / 5, 2 * xa.T @ xa / 300
    got = blend_hessian(he, 5, ha, 0.5 * 64)
    ref = (he.double() * 5 + ha.double() * 32) / 37
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    assert blend_hessian(he, 5, None, 32) is he and blend_hessian(he, 5, ha, 0) is he
    assert torch.equal(blend_hessian(None, 0, ha, 32), ha)


# --- one experts module: routed tokens, an expert that gets none ---------------------------------------------

@pytest.fixture(scope="module")
def experts_setup():
    """Layer 0's experts of a random tiny Qwen3-MoE with planted input outliers, and routed calls in which
    expert 7 gets no token and expert 6 only a few."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(qwen3_moe_config())
    path, info = next(iter(find_experts_modules(model).items()))
    module = model.get_submodule(path)
    with torch.no_grad():
        module.gate_up_proj[..., list(OUTLIERS)] /= FACTOR
    gen = torch.Generator().manual_seed(4)
    calls = []
    for _ in range(4):
        x = torch.randn(256, 128, generator=gen)
        x[:, list(OUTLIERS)] *= FACTOR
        idx = torch.stack([torch.randint(0, 6, (256,), generator=gen), torch.full((256,), 6)], dim=-1)
        idx[8:, 1] = (idx[8:, 0] + 1) % 6  # expert 6: 8 tokens per call; expert 7: none
        calls.append((x, idx, torch.full((256, 2), 0.5)))
    return module, info, calls


def observe(module, info, calls, recipe):
    samples = recipe.autoround.max_rows if recipe.algorithm == "autoround" else recipe.awq.max_rows if recipe.awq else 0
    obs = ExpertsObserver(module, info, all_experts=False, hessian=recipe.needs_hessians, samples=samples,
                          blend=recipe.blends_all_tokens, sample_all=recipe.awq is not None)
    with torch.no_grad():
        for c in calls:
            module(*c)
    return obs.remove()


def recipe_for(algorithm, scheme="w4a16-g128", **sections):
    data = {"name": "t", "scheme": scheme, "algorithm": algorithm, "calibration": {"min_tokens": 16}}
    data.update(sections)
    return parse_recipe(data)


@torch.no_grad()
def moe_error(result, module, info, calls, experts, quant_act=False):
    """Relative error of the named experts' outputs (sum over their routed rows) against float; the stored
    smooth_scale multiplies the activations (here: the weight rows), `quant_act` rounds them per token."""
    from gmmquant.calibrate.autoround import expert_activation
    from gmmquant.pack.layouts import expert_weight

    act = expert_activation(module, info)
    num = den = 0.0
    for e in experts:
        wf = [expert_weight(module, info, p)[e].float() for p in info.projections]
        wq = []
        for p in info.projections:
            proj = result.projections[p]
            scale = proj.antiquant_scale if proj.scheme.weight_only else proj.weight_scale
            from gmmquant.pack.primitives import QuantizedWeight
            wq.append(QuantizedWeight(proj.qweight, scale, proj.antiquant_offset, proj.scheme).dequantize()[e])
        smooth = [None if result.projections[p].smooth_scale is None else result.projections[p].smooth_scale[e].float()
                  for p in info.projections]

        def run(h, j, w):
            if smooth[j] is not None:
                h = h * smooth[j]
            return (fake_quant_tokens(h) if quant_act else h) @ w

        for x, idx, _ in calls:
            rows = x[(idx == e).any(dim=-1)]
            f = act(rows @ wf[0]) @ wf[1]
            q = run(act(run(rows, 0, wq[0])), 1, wq[1])
            num += float((q - f).pow(2).sum())
            den += float(f.pow(2).sum())
    return (num / den) ** 0.5


def test_module_learned_rounding_beats_rtn_and_reports_the_expert_without_tokens(experts_setup):
    module, info, calls = experts_setup
    results = {}
    for algorithm in ("rtn", "autoround"):
        recipe = recipe_for(algorithm, autoround={"iters": 20, "max_rows": 512, "batch_rows": 0})  # all routed rows
        stats = observe(module, info, calls, recipe)
        results[algorithm] = quantize_experts(module, info, stats, recipe, torch.bfloat16, path="m")
    ar = results["autoround"]
    assert ar.seen["gate_up_proj"][7] == 0
    assert "m[7].gate_up_proj" in ar.fallbacks and "m[7].down_proj" in ar.fallbacks  # reported, not crashed
    assert "m[6].gate_up_proj" not in ar.fallbacks  # 32 tokens >= min_tokens
    for e in range(6):
        assert moe_error(ar, module, info, calls, [e]) < 0.95 * moe_error(results["rtn"], module, info, calls, [e]), e
    # the expert without tokens is exactly RTN
    for p in info.projections:
        assert torch.equal(ar.projections[p].qweight[7], results["rtn"].projections[p].qweight[7])


def test_blended_hessian_helps_the_rarely_routed_expert(experts_setup):
    """Expert 6 saw 32 tokens: GPTQ on them alone over-fits; blending the all-token Hessian generalises
    (error measured on every token through expert 6, the rows it will see at other routings)."""
    module, info, calls = experts_setup
    every = [(x, torch.full_like(idx, 6), w) for x, idx, w in calls]
    errors = {}
    for blend in (0.0, 1.0):
        recipe = recipe_for("gptq", gptq={"blend_all_tokens": blend, "blend_rows": 256})
        stats = observe(module, info, calls, recipe)
        assert bool(stats.all_inputs) == (blend > 0)
        if blend:
            assert stats.all_inputs["gate_up_proj"][7].rows == 1024  # the expert without routed tokens has H_all
        result = quantize_experts(module, info, stats, recipe, torch.bfloat16, path="m")
        if blend:
            assert not any("[7]" in f for f in result.fallbacks)  # blended: no RTN fallback needed
        errors[blend] = moe_error(result, module, info, every, [6])
    assert errors[1.0] < errors[0.0], errors


@pytest.mark.parametrize("name", ["w4a8-dynamic", "w4a8-dynamic-g128", "w8a8-dynamic"])
def test_awq_search_starts_at_rtn_and_shrinks_outlier_error(name):
    from gmmquant.calibrate.awq import awq_smooth_factor
    from gmmquant.calibrate.observers import OBSERVERS

    scheme = get_scheme(name)
    x, w1, _ = outlier_expert(m=256)
    s, err0, err = awq_smooth_factor(x, w1, scheme, torch.bfloat16, OBSERVERS["minmax"], grid=10)
    dq = quantize_weight(w1.unsqueeze(0), scheme, torch.bfloat16).dequantize()[0].double()
    rtn = float((fake_quant_tokens(x).double() @ dq - x.double() @ w1.double()).pow(2).mean())
    assert err0 == pytest.approx(rtn, rel=1e-4)  # a = 0 is plain RTN with per-token activations
    assert err < 0.5 * err0, (err, err0)  # the planted outliers move into the weights
    assert s.shape == (128,) and bool((s > 0).all())
    assert float(s[list(OUTLIERS)].min()) > float(s.median())  # the outlier channels get the largest factors


def test_module_awq_per_expert_smooth_scales_beat_rtn(experts_setup):
    module, info, calls = experts_setup
    results = {}
    for awq in (None, {"grid": 10, "max_rows": 512}):
        recipe = recipe_for("rtn", scheme="w4a8-dynamic", **({"awq": awq} if awq else {}))
        stats = observe(module, info, calls, recipe)
        results[awq is not None] = quantize_experts(module, info, stats, recipe, torch.bfloat16, path="m")
    smooth = results[True].projections["gate_up_proj"].smooth_scale
    assert smooth is not None and smooth.shape == (8, 128)
    assert torch.equal(smooth[7], torch.ones_like(smooth[7]))  # no tokens: no scaling (reported as a fallback)
    assert "m[7].gate_up_proj" in results[True].fallbacks
    for e in range(6):
        awq_err = moe_error(results[True], module, info, calls, [e], quant_act=True)
        assert awq_err < 0.9 * moe_error(results[False], module, info, calls, [e], quant_act=True), e


def test_observer_samples_are_deterministic_and_bounded():
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(100, 8, generator=gen) for _ in range(5)]
    a, b = InputStats(max_samples=64, seed=3), InputStats(max_samples=64, seed=3)
    for x in xs:
        a.add(x)
        b.add(x)
    assert a.samples.shape == (64, 8) and torch.equal(a.samples, b.samples) and a.rows == 500
    every = torch.cat(xs)
    assert all(bool((every == r).all(dim=-1).any()) for r in a.samples)  # real rows, not mixtures


# --- recipes, the pipeline on a planted-outlier model, the streamed path ---------------------------------------

@pytest.fixture(scope="module")
def outlier_model_dir(tmp_path_factory):
    """A tiny Qwen3-MoE whose post-attention norms carry 3 channels scaled by 30, with every expert's gate_up
    input rows and the router's columns divided by 30: the same function, activation outliers."""
    torch.manual_seed(0)
    config = qwen3_moe_config()
    model = transformers.AutoModelForCausalLM.from_config(config)
    ch = list(OUTLIERS)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight[ch] *= FACTOR
            layer.mlp.experts.gate_up_proj[..., ch] /= FACTOR
            layer.mlp.gate.weight[:, ch] /= FACTOR
    path = tmp_path_factory.mktemp("outliers") / "model"
    model.to(torch.bfloat16).save_pretrained(path)
    byte_level_tokenizer(config.vocab_size).save_pretrained(path)
    return path


FAST = {"num_samples": 4, "seq_len": 64, "batch_size": 4, "min_tokens": 16}


def test_pipeline_autoround_beats_rtn_on_the_planted_outlier_model(outlier_model_dir, tmp_path):
    errors = {}
    for algorithm in ("rtn", "autoround"):
        recipe = parse_recipe({"name": "t", "scheme": "w4a16-g128", "symmetric": True, "algorithm": algorithm,
                               "autoround": {"iters": 15, "max_rows": 128, "batch_rows": 0}, "calibration": FAST})
        report = calibrate_model(outlier_model_dir, tmp_path / algorithm, recipe)
        errors[algorithm] = [layer.output_error for layer in report.layers]
    for ar, rtn in zip(errors["autoround"], errors["rtn"]):
        assert ar < 0.95 * rtn, errors


def test_streamed_calibration_refuses_autoround_blend_and_awq(outlier_model_dir, tmp_path):
    with pytest.raises(RecipeError, match="algorithm: autoround is not supported by streamed calibration"):
        calibrate_model(outlier_model_dir, tmp_path / "a", load_recipe("w4a16-g128-autoround"), max_memory="1GB")
    blend = recipe_for("gptq", gptq={"blend_all_tokens": 1.0})
    with pytest.raises(RecipeError, match="gptq.blend_all_tokens: not supported by streamed calibration"):
        calibrate_model(outlier_model_dir, tmp_path / "b", blend, max_memory="1GB")
    awq = recipe_for("rtn", scheme="w4a8-dynamic", awq={"grid": 4})
    with pytest.raises(RecipeError, match="awq: not supported by streamed calibration"):
        calibrate_model(outlier_model_dir, tmp_path / "c", awq, max_memory="1GB")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_shipped_autoround_recipes():
    for name, sym in (("w4a16-g128-autoround", False), ("w4a16-g128-sym-autoround", True),
                      ("w4a8-dynamic-autoround", True)):
        recipe = load_recipe(name)
        assert recipe.algorithm == "autoround" and recipe.quant_scheme().symmetric is sym
    assert load_recipe("w4a8-dynamic-autoround").quant_scheme().a8w4
