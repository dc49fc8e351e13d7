"""A checkpoint made by llm-compressor itself (tools/make_llmcompressor_fixture.py) runs in gmmquant's runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gmmquant.interop import read_compressed_tensors
from gmmquant.interop.linears import split_projection
from gmmquant.interop.naming import Naming
from gmmquant.runtime import GMMExperts, load_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
# experts only; and every Linear but lm_head / routers (attention quantized too), llm-compressor's usual recipe
NAMES = ["llmc_qwen3_moe_w4a16", "llmc_qwen3_moe_w4a16_all"]
IDS = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(2))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.fixture(scope="module", params=NAMES)
def decompressed(request, tmp_path_factory):
    """(fixture dir, {linear: weight}, HF bf16 model) as compressed-tensors decompresses the fixture."""
    fixture = FIXTURES / request.param
    config = json.loads((fixture / "config.json").read_text())
    qc = QuantizationConfig.model_validate(config.pop("quantization_config"))
    group = qc.config_groups["group_0"]
    scheme = QuantizationScheme(targets=group.targets, weights=group.weights, input_activations=group.input_activations)
    compressor = BaseCompressor.get_value_from_registry(qc.format)
    with safe_open(str(fixture / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bases = sorted({k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed")})
    weights = {}
    for base in bases:
        state = {k[len(base) + 1:]: tensors.pop(k) for k in list(tensors) if k.startswith(base + ".")}
        weights[base] = compressor.decompress(state, scheme)["weight"]
    path = tmp_path_factory.mktemp("decompressed")
    save_file({**tensors, **{b + ".weight": w for b, w in weights.items()}}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    return fixture, weights, model


@pytest.mark.parametrize("name", NAMES)
def test_fixture_is_llmcompressor_output(name):
    versions = json.loads((FIXTURES / name / "FIXTURE_VERSIONS.json").read_text())
    config = json.loads((FIXTURES / name / "config.json").read_text())
    assert versions["llmcompressor"] and config["quantization_config"]["format"] == "pack-quantized"
    assert sum(p.stat().st_size for p in (FIXTURES / name).iterdir()) < 200_000


def test_import_moves_codes_without_changing_weights(decompressed):
    """Every expert weight gmmquant imports equals compressed-tensors' decompression of it, bit for bit."""
    fixture, weights, _ = decompressed
    ck = read_compressed_tensors(fixture)
    naming = Naming("qwen3_moe")
    assert {s.scheme.name for s in ck.specs.values()} == {"w4a16-g32-sym"} and ck.act_dtype == torch.bfloat16
    checked = 0
    for prefix, spec in ck.specs.items():
        for proj, qw in ck.quantized[prefix].items():
            assert qw.qweight.dtype == torch.int32 and qw.scale.shape[1] == qw.qweight.shape[1] // 32  # [E, K/g, N]
            names = naming.expert_linears(f"{prefix}.{proj}", spec.num_experts)
            for e, row in enumerate(split_projection(qw, len(names[0]))):
                for base, codes in zip(names[e], row):
                    assert torch.equal(codes.dequantize().to(torch.bfloat16), weights[base]), base
                    checked += 1
    assert checked == 2 * 4 * 3
    attention = sorted(b for b in weights if ".self_attn." in b)  # quantized only in the "_all" fixture
    assert len(attention) == (8 if fixture.name.endswith("_all") else 0)
    for base in attention:  # dequantized at load time (gmmquant runs experts only), to the same bf16 values
        assert torch.equal(ck.other[base + ".weight"], weights[base]), base


def test_runs_in_gmm_runtime_and_matches_decompressed_logits(decompressed):
    fixture, _, reference = decompressed
    model = load_model(fixture)
    experts = [m for m in model.modules() if isinstance(m, GMMExperts)]
    assert len(experts) == 2 and all(p.qweight.dtype == torch.int32 for m in experts for p in m.projections())
    ours, ref = logits(model), logits(reference)
    # Same weights; the difference is bf16 rounding inside the experts (GMM kernel vs. HF's expert loop).
    err = float((ours - ref).abs().max() / ref.abs().max())
    assert err < 2e-2, f"relative logit difference {err:.3e}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
