"""Router-weighted calibration (`calibration.router_weighted`): an expert's error on a token reaches the MoE block
output multiplied by the token's router weight p, so GPTQ's Hessian and learned rounding's loss weigh each
routed row by p^2. Float64 references for the weighted statistics, the MoE block output error (sum over experts
of p * expert(x)) lower than unweighted calibration and RTN where the router trusts some tokens more than others,
and the rules (all_experts, streamed sources, call conventions without router weights)."""

from __future__ import annotations

import pytest
import torch
import transformers

from gmmquant.calibrate.autoround import ARLayer, autoround_expert, expert_activation
from gmmquant.calibrate.gptq import accumulate_hessian
from gmmquant.calibrate.pipeline import calibrate_model
from gmmquant.calibrate.quantize import quantize_experts
from gmmquant.calibrate.stats import ExpertsObserver, InputStats
from gmmquant.pack.layouts import expert_weight, find_experts_modules
from gmmquant.pack.primitives import QuantizedWeight, quantize_weight
from gmmquant.pack.schemes import get_scheme
from gmmquant.recipes import RecipeError, load_recipe, parse_recipe

from tiny_models import qwen3_moe_config, save_tiny_model


def test_weighted_hessian_matches_float64_across_batches():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(m, 16, generator=gen) for m in (7, 0, 33, 12)]
    cs = [torch.rand(x.shape[0], generator=gen) for x in xs]
    h, total = None, 0.0
    for x, c in zip(xs, cs):
        h, total = accumulate_hessian(h, x, total, c)
    x, c = torch.cat(xs).double(), torch.cat(cs).double()
    ref = 2 * (x * c.unsqueeze(1)).T @ x / c.sum()
    torch.testing.assert_close(h.double(), ref, rtol=1e-5, atol=1e-6)
    assert total == pytest.approx(float(c.sum()), rel=1e-6)
    # weights of one are the plain running mean
    ones, _ = accumulate_hessian(None, xs[0], 0.0, torch.ones(7))
    plain, _ = accumulate_hessian(None, xs[0], 0)
    torch.testing.assert_close(ones, plain, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="non-negative"):
        accumulate_hessian(None, xs[0], 0.0, -torch.ones(7))


def test_input_stats_keep_the_router_weights_of_the_kept_samples():
    gen = torch.Generator().manual_seed(1)
    st = InputStats(want_hessian=True, max_samples=40, seed=2)
    xs = [torch.randn(30, 8, generator=gen) for _ in range(3)]
    ps = [torch.rand(30, generator=gen) for _ in range(3)]
    for x, p in zip(xs, ps):
        st.add(x, p)
    assert st.samples.shape == (40, 8) and st.sample_weights.shape == (40,) and st.rows == 90
    every, weights = torch.cat(xs), torch.cat(ps)
    for row, p in zip(st.samples, st.sample_weights):  # each kept row keeps its own router weight
        (i,) = torch.nonzero((every == row).all(dim=-1)).flatten().tolist()
        assert float(p) == float(weights[i])
    x, c = every.double(), weights.double().pow(2)
    torch.testing.assert_close(st.hessian.double(), 2 * (x * c.unsqueeze(1)).T @ x / c.sum(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be mixed"):
        st.add(xs[0])


def swiglu(h):
    half = h.shape[-1] // 2
    return torch.nn.functional.silu(h[..., :half]) * h[..., half:]


def test_autoround_weighted_loss_is_the_float64_weighted_mse():
    scheme = get_scheme("w4a16-g128", symmetric=True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(96, 128, generator=gen)
    w1, w2 = torch.randn(128, 256, generator=gen) / 11, torch.randn(128, 128, generator=gen) / 11
    c = torch.rand(96, generator=gen).pow(2)
    res = autoround_expert(x, [ARLayer(w1), ARLayer(w2)], swiglu, scheme, torch.bfloat16, iters=10, row_weights=c)
    rtn = [quantize_weight(w.unsqueeze(0), scheme, torch.bfloat16).dequantize()[0].double() for w in (w1, w2)]
    xd = x.double()
    err = (swiglu(xd @ rtn[0]) @ rtn[1] - swiglu(xd @ w1.double()) @ w2.double()).pow(2).mean(dim=-1)
    ref = float((err * c.double()).sum() / c.double().sum())
    assert res.loss_start == pytest.approx(ref, rel=1e-4)
    assert res.loss_best <= res.loss_start
    with pytest.raises(ValueError, match="row_weights"):
        autoround_expert(x, [ARLayer(w1), ARLayer(w2)], swiglu, scheme, torch.bfloat16, iters=2, row_weights=c[:5])


# --- one experts module whose router trusts some tokens far more than others ---------------------------------

@pytest.fixture(scope="module")
def skewed_setup():
    """Layer 0's experts of a random tiny Qwen3-MoE, called with top-2 routing whose router weights are skewed
    (0.9 / 0.1), and two kinds of token: "heavy" ones (24 channels x 6) go to one of experts 0-3 with weight 0.9
    and one of 4-7 with 0.1, the others the other way round. Each expert thus sees one kind with weight 0.9
    and the other with 0.1; unweighted calibration fits both alike, though only one reaches the block output."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(qwen3_moe_config())
    path, info = next(iter(find_experts_modules(model).items()))
    module = model.get_submodule(path)
    gen = torch.Generator().manual_seed(4)
    heavy_channels = torch.randperm(128, generator=gen)[:24]
    calls = []
    for _ in range(4):
        x = torch.randn(256, 128, generator=gen)
        heavy = torch.rand(256, generator=gen) < 0.5
        x[heavy.nonzero().flatten().unsqueeze(1), heavy_channels] *= 3.0
        low, high = torch.randint(0, 4, (256,), generator=gen), torch.randint(4, 8, (256,), generator=gen)
        idx = torch.where(heavy.unsqueeze(1), torch.stack([low, high], -1), torch.stack([high, low], -1))
        calls.append((x, idx, torch.tensor([0.95, 0.05]).repeat(256, 1)))
    return module, info, calls


def observe(module, info, calls, recipe):
    r = recipe.autoround
    obs = ExpertsObserver(module, info, all_experts=False, hessian=recipe.needs_hessians,
                          samples=r.max_rows if recipe.algorithm == "autoround" else 0,
                          router_weighted=recipe.calibration.router_weighted)
    with torch.no_grad():
        for x, idx, w in calls:
            module(x, idx, w)
    return obs.remove()


@torch.no_grad()
def block_error(result, module, info, calls):
    """Relative error of the MoE block output sum_e p_e * expert_e(x) over every call, against float."""
    act = expert_activation(module, info)
    wf = {p: expert_weight(module, info, p).float() for p in info.projections}
    wq = {}
    for p in info.projections:
        proj = result.projections[p]
        wq[p] = QuantizedWeight(proj.qweight, proj.antiquant_scale, proj.antiquant_offset, proj.scheme).dequantize().float()
    num = den = 0.0
    for x, idx, w in calls:
        f = torch.zeros(x.shape[0], 128)
        q = torch.zeros_like(f)
        for e in range(info.num_experts):
            p = (w * (idx == e)).sum(dim=-1, keepdim=True)
            f += p * (act(x @ wf["gate_up_proj"][e]) @ wf["down_proj"][e])
            q += p * (act(x @ wq["gate_up_proj"][e]) @ wq["down_proj"][e])
        num += float((q - f).pow(2).sum())
        den += float(f.pow(2).sum())
    return (num / den) ** 0.5


def recipe_for(algorithm, router_weighted, **sections):
    data = {"name": "t", "scheme": "w4a16-g128", "symmetric": True, "algorithm": algorithm,
            "calibration": {"min_tokens": 16, "router_weighted": router_weighted}}
    data.update(sections)
    return parse_recipe(data)


@pytest.mark.parametrize("algorithm,sections", [
    ("gptq", {"gptq": {"act_order": True}}),
    ("autoround", {"autoround": {"iters": 40, "max_rows": 1024, "batch_rows": 0}}),
])
def test_router_weighting_lowers_the_block_output_error(skewed_setup, algorithm, sections):
    module, info, calls = skewed_setup
    errors = {}
    for label, algo, weighted in (("rtn", "rtn", False), ("plain", algorithm, False), ("weighted", algorithm, True)):
        recipe = recipe_for(algo, weighted, **sections)
        stats = observe(module, info, calls, recipe)
        if weighted:
            st = stats.inputs["gate_up_proj"][0]
            assert (st.sample_weights is not None) == (algorithm == "autoround")
        errors[label] = block_error(quantize_experts(module, info, stats, recipe, torch.bfloat16, path="m"),
                                    module, info, calls)
    assert errors["plain"] < errors["rtn"], errors
    assert errors["weighted"] < 0.97 * errors["plain"], errors


def test_router_weighted_rules(tmp_path):
    with pytest.raises(RecipeError, match="calibration.router_weighted: does not combine with calibration.all_experts"):
        parse_recipe({"name": "t", "scheme": "w4a16", "calibration": {"router_weighted": True, "all_experts": True}})
    with pytest.raises(RecipeError, match="calibration.router_weighted: expected bool"):
        parse_recipe({"name": "t", "scheme": "w4a16", "calibration": {"router_weighted": "yes"}})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(qwen3_moe_config())
    path, info = next(iter(find_experts_modules(model).items()))
    import dataclasses

    dense = dataclasses.replace(info, call="dense")
    with pytest.raises(ValueError, match="router_weighted needs routed calibration"):
        ExpertsObserver(model.get_submodule(path), dense, all_experts=False, hessian=True, router_weighted=True)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("rw") / "model", qwen3_moe_config())


FAST = {"num_samples": 4, "seq_len": 64, "batch_size": 4, "min_tokens": 16}


def layer_errors(model_dir, out, algorithm, **autoround):
    """Per-layer MoE output errors of a router-weighted sym W4 g128 calibration of `model_dir`."""
    settings = {"iters": 15, "max_rows": 128, "batch_rows": 0, **autoround}
    recipe = parse_recipe({"name": "t", "scheme": "w4a16-g128", "symmetric": True, "algorithm": algorithm,
                           "autoround": settings, "calibration": dict(FAST, router_weighted=True)})
    return [layer.output_error for layer in calibrate_model(model_dir, out, recipe).layers]


def test_pipeline_router_weighted_autoround_and_streamed_refusal(tiny_model_dir, tmp_path):
    rtn = layer_errors(tiny_model_dir, tmp_path / "rtn", "rtn")
    learned = layer_errors(tiny_model_dir, tmp_path / "ar", "autoround")
    assert all(a < r for a, r in zip(learned, rtn)), (learned, rtn)
    gptq = parse_recipe({"name": "t", "scheme": "w4a16-g128", "algorithm": "gptq",
                         "calibration": dict(FAST, router_weighted=True)})
    with pytest.raises(RecipeError, match="calibration.router_weighted: not supported by streamed calibration"):
        calibrate_model(tiny_model_dir, tmp_path / "s", gptq, max_memory="1GB")
    assert not (tmp_path / "s").exists()


def test_shipped_recipes_weigh_by_the_router():
    for name in ("w4a16-g128-autoround", "w4a16-g128-sym-autoround", "w4a8-dynamic-autoround"):
        assert load_recipe(name).calibration.router_weighted, name


# --- float-stream targets (autoround.float_targets) ------------------------------------------------------------

def test_autoround_float_targets_loss_is_against_the_float_rows():
    scheme = get_scheme("w4a16-g128", symmetric=True)
    gen = torch.Generator().manual_seed(6)
    x_float = torch.randn(64, 128, generator=gen)
    x = x_float + 0.05 * torch.randn(64, 128, generator=gen)  # the quantized stream's drifted rows
    w1, w2 = torch.randn(128, 256, generator=gen) / 11, torch.randn(128, 128, generator=gen) / 11
    res = autoround_expert(x, [ARLayer(w1), ARLayer(w2)], swiglu, scheme, torch.bfloat16, iters=10, target_inputs=x_float)
    rtn = [quantize_weight(w.unsqueeze(0), scheme, torch.bfloat16).dequantize()[0].double() for w in (w1, w2)]
    ref = swiglu(x_float.double() @ w1.double()) @ w2.double()
    start = float((swiglu(x.double() @ rtn[0]) @ rtn[1] - ref).pow(2).mean())
    assert res.loss_start == pytest.approx(start, rel=1e-4)
    assert res.loss_best < res.loss_start
    with pytest.raises(ValueError, match="target_inputs must match"):
        autoround_expert(x, [ARLayer(w1), ARLayer(w2)], swiglu, scheme, torch.bfloat16, iters=2, target_inputs=x_float[:5])


def test_observer_pairs_float_rows_with_the_sampled_rows(skewed_setup):
    from gmmquant.calibrate.stats import ExpertsInputRecorder

    module, info, calls = skewed_setup
    recorder = ExpertsInputRecorder(module, info)
    with torch.no_grad():
        for x, idx, w in calls:
            module(x + 1.0, idx, w)  # "the float stream": every row shifted by one
    float_rows = recorder.remove()
    assert len(float_rows) == len(calls)
    obs = ExpertsObserver(module, info, all_experts=False, hessian=False, samples=200, router_weighted=True,
                          float_rows=float_rows)
    with torch.no_grad():
        for x, idx, w in calls:
            module(x, idx, w)
    stats = obs.remove()
    for e in range(info.num_experts):
        st = stats.inputs["gate_up_proj"][e]
        assert st.samples.shape == (200, 128)
        torch.testing.assert_close(st.sample_targets, st.samples + 1.0, rtol=0, atol=1e-5)
    extra = ExpertsObserver(module, info, all_experts=False, hessian=False, samples=8, float_rows=float_rows[:1])
    with torch.no_grad(), pytest.raises(RuntimeError, match="does not pair"):
        for x, idx, w in calls[:2]:
            module(x, idx, w)
    extra.remove()


def test_pipeline_float_targets_beats_rtn(tiny_model_dir, tmp_path):
    rtn = layer_errors(tiny_model_dir, tmp_path / "rtn", "rtn")
    learned = layer_errors(tiny_model_dir, tmp_path / "ar", "autoround", float_targets=True)
    assert all(a < r for a, r in zip(learned, rtn)), (learned, rtn)
