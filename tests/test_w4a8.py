"""w4a8-dynamic end to end: scales the NPU sees exactly, the A8W4 runtime against a float64 oracle, calibrate
(GPTQ, SmoothQuant option), save / load / from_pretrained / inspect / eval, and the export rules."""

from __future__ import annotations

import json

import pytest
import torch

from gmm_oracle import dequant_stacked
from gmmquant.cli import main
from gmmquant.interop import export_checkpoint
from gmmquant.kernels import decode_quant_param, dynamic_quant
from gmmquant.pack import get_scheme, quantize_weight
from gmmquant.pack.checkpoint import load_quantized
from gmmquant.pack.format import FormatError
from gmmquant.recipes import load_recipe
from gmmquant.runtime import GMMExperts, load_model
from gmmquant.runtime.experts import GMMProjection
from gmmquant.calibrate.pipeline import calibrate_model

from tiny_models import qwen3_moe_config, save_tiny_model

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["w4a8-dynamic", "w4a8-dynamic-g32"])
def test_scales_are_what_the_npu_multiplies_by(name):
    """Stored scales survive the int64 encoding (FP19) and, per group, vllm-ascend's float16 cast unchanged."""
    w = torch.randn(3, 64, 48) * torch.logspace(-3, 0, 48)
    qw = quantize_weight(w, get_scheme(name), torch.bfloat16)
    assert qw.scale.dtype == torch.float32
    assert int((qw.scale.view(torch.int32) & 0x1FFF).abs().max()) == 0  # FP19: low 13 mantissa bits zero
    if get_scheme(name).group_size:
        assert torch.equal(qw.scale.to(torch.float16).float(), qw.scale)
    encoded = qw.gmm_kwargs()["scale"][0]
    assert encoded.dtype == torch.int64 and torch.equal(decode_quant_param(encoded)[0], qw.scale)


@pytest.mark.parametrize("name", ["w4a8-dynamic", "w4a8-dynamic-g32"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_runtime_matches_float64_oracle(name, backend):
    g = torch.Generator().manual_seed(0)
    e, k, n = 4, 64, 48
    qw = quantize_weight(torch.randn(e, k, n, generator=g) / 8, get_scheme(name), torch.bfloat16)
    proj = GMMProjection.from_quantized(qw, torch.bfloat16, backend=backend)
    counts = torch.tensor([5, 0, 9, 2])  # an empty expert included
    x = torch.randn(int(counts.sum()), k, generator=g).to(torch.bfloat16)
    out = proj(x, counts)
    xq, pts = dynamic_quant(x)
    w = dequant_stacked(qw)  # float64 [E, K, N]
    rows = torch.repeat_interleave(torch.arange(e), counts)
    ref = torch.einsum("mk,mkn->mn", xq.double(), w[rows]) * pts.double().unsqueeze(1)
    # A8W4 accumulates each quant group in float16 (the NPU's golden order), then rounds to bf16 once
    err = float((out.double() - ref).abs().max())
    assert out.dtype == torch.bfloat16 and err <= 1e-2 * float(ref.abs().max()), err


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """One calibration (the expensive part) covering GPTQ, SmoothQuant and per-group scales; a per-channel RTN
    checkpoint from replace_experts for the exports."""
    from gmmquant.recipes import parse_recipe
    from gmmquant.runtime import replace_experts, save_model

    root = tmp_path_factory.mktemp("w4a8")
    src = save_tiny_model(root / "model", qwen3_moe_config(), outlier_channels=4)
    recipe = load_recipe("w4a8-dynamic-g128", num_samples=4, seq_len=64, batch_size=4).to_dict()
    recipe.update(name="w4a8-g128-smooth", smoothquant={"alpha": 0.5, "fold_norm": True})
    report = calibrate_model(src, root / "smooth", parse_recipe(recipe))
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    replace_experts(model, "w4a8-dynamic")
    save_model(model, root / "w4a8-dynamic", source_dir=src)
    return root, report


def test_calibrate_gptq_and_smoothquant(calibrated):
    root, report = calibrated
    for layer in report.layers:
        assert layer.experts_covered == layer.num_experts == 8
        assert 0 < layer.output_error < 0.3, (layer.index, layer.output_error)
        assert layer.smoothing != "none"
    ck = load_quantized(root / "smooth")
    assert any("smooth_scale" in names for spec in ck.specs.values() for names in spec.extra.values())
    assert all(spec.scheme.name == "w4a8-g128-smooth" and spec.scheme.a8w4 for spec in ck.specs.values())


def test_save_load_from_pretrained_inspect_eval(calibrated, capsys):
    root, _ = calibrated
    path = root / "smooth"
    ck = load_quantized(path)
    spec = ck.specs["model.layers.0.mlp.experts"]
    assert spec.scheme.a8w4 and spec.scheme.group_size == 128
    assert ck.headers["model.layers.0.mlp.experts.gate_up_proj.weight_scale"] == (torch.float32, (8, 1, 256))
    ids = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(3))
    model = load_model(path)
    assert isinstance(model.model.layers[0].mlp.experts, GMMExperts)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        a, b = model(ids).logits, hf(ids).logits
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "w4a8-g128-smooth" in out and "validation: OK" in out
    assert main(["eval", str(path), "--seq-len", "64", "--max-windows", "2"]) == 0
    assert "(gmmquant w4a8-g128-smooth): perplexity" in capsys.readouterr().out


def test_exports(calibrated, tmp_path):
    root, _ = calibrated
    out = export_checkpoint(root / "w4a8-dynamic", tmp_path / "ascend", "ascend")
    desc = json.loads((out / "quant_model_description.json").read_text())
    assert desc["model_quant_type"] == "W4A8_DYNAMIC" and desc["version"] == "1.0.0" and desc["group_size"] == 0
    with pytest.raises(FormatError, match="W4A8 experts are not exported to compressed-tensors"):
        export_checkpoint(root / "w4a8-dynamic", tmp_path / "ct", "compressed-tensors")
    with pytest.raises(FormatError, match="SmoothQuant"):
        export_checkpoint(root / "smooth", tmp_path / "smooth", "ascend")
    # the export reads back into gmmquant's runtime with the same codes and scales, so the same logits
    ids = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(load_model(out)(ids).logits, load_model(root / "w4a8-dynamic")(ids).logits)
