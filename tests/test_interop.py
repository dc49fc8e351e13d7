"""Export to compressed-tensors / AscendV1, read back by compressed-tensors itself and by gmmquant's importer."""

from __future__ import annotations

import copy
import re
import json

import pytest
import torch
from safetensors import safe_open

from gmmquant.cli import main
from gmmquant.interop import detect_format, export_checkpoint, read_checkpoint
from gmmquant.interop.linears import split_projection
from gmmquant.interop.naming import Naming
from gmmquant.pack import get_scheme
from gmmquant.pack.checkpoint import load_quantized
from gmmquant.pack.format import FormatError
from gmmquant.runtime import GMMExperts, load_model, replace_experts, save_model

transformers = pytest.importorskip("transformers")
ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                                     num_experts_per_tok=2, head_dim=16),
    # disk names differ from memory names: block_sparse_moe.experts.{e}.w1 / w3 / w2
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
}
IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
SCHEMES = {  # name -> (preset, overrides)
    "w4a16-g32": ("w4a16-g32", {}),  # asymmetric (zero points)
    "w4a16-g32-sym": ("w4a16-g32", {"symmetric": True}),
    "w4a16": ("w4a16", {}),  # per-channel, asymmetric
    "w8a16": ("w8a16", {}),
    "w8a16-asym": ("w8a16", {"symmetric": False}),
    "w8a8-dynamic": ("w8a8-dynamic", {}),
}
EXPORTABLE = {
    "compressed-tensors": ["w4a16-g32", "w4a16-g32-sym", "w4a16", "w8a16", "w8a16-asym", "w8a8-dynamic"],
    "ascend": ["w4a16-g32-sym", "w8a8-dynamic"],  # w8a16: vllm-ascend has no W8A16 MoE method (refused below)
}
CASES = [(to, s) for to, schemes in EXPORTABLE.items() for s in schemes]


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def float_models():
    out = {}
    for family, make in CONFIGS.items():
        torch.manual_seed(0)
        out[family] = transformers.AutoModelForCausalLM.from_config(make()).to(torch.bfloat16).eval()
    return out


@pytest.fixture(scope="module")
def checkpoints(float_models, tmp_path_factory):
    """(family, scheme) -> gmmquant checkpoint dir and the logits of load_model(that dir)."""
    cache = {}

    def get(family, scheme):
        if (family, scheme) not in cache:
            model = copy.deepcopy(float_models[family])
            preset, overrides = SCHEMES[scheme]
            replace_experts(model, get_scheme(preset, **overrides))
            path = tmp_path_factory.mktemp(f"{family}-{scheme}") / "gmmquant"
            save_model(model, path, max_shard_size="40KB")  # several shards, so the exports shard and index too
            cache[family, scheme] = path, logits(load_model(path))
        return cache[family, scheme]

    return get


def exported(checkpoints, family, scheme, to, tmp_path):
    path, ref = checkpoints(family, scheme)
    out = export_checkpoint(path, tmp_path / f"{to}-{scheme}", to, max_shard_size="40KB")
    return path, out, ref


def read_dir(path):
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def our_linears(path, family):
    """disk base name -> dequantized [N, K] weight (bf16) of every expert linear of a gmmquant checkpoint."""
    ck = load_quantized(path)
    naming = Naming(ck.config["model_type"])
    out = {}
    for prefix, spec in ck.specs.items():
        for proj, qw in ck.projections(prefix).items():
            names = naming.expert_linears(f"{prefix}.{proj}", spec.num_experts)
            for e, row in enumerate(split_projection(qw, len(names[0]))):
                for base, codes in zip(names[e], row):
                    out[base] = codes.dequantize(torch.float32).to(torch.bfloat16)
    return out


@pytest.mark.parametrize("scheme", EXPORTABLE["compressed-tensors"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_compressed_tensors_decompressor_reproduces_our_weights(checkpoints, family, scheme, tmp_path):
    """compressed-tensors' own decompressor, on our export, gives exactly our dequantized expert weights."""
    src, out, _ = exported(checkpoints, family, scheme, "compressed-tensors", tmp_path)
    config = json.loads((out / "config.json").read_text())
    qc = QuantizationConfig.model_validate(config["quantization_config"])  # the package accepts our config
    assert (out / "model.safetensors.index.json").exists() and detect_format(out) == "compressed-tensors"
    tensors = read_dir(out)
    expected = our_linears(src, family)
    group = next(iter(qc.config_groups.values()))
    compressor = BaseCompressor.get_value_from_registry(group.format)
    scheme_obj = QuantizationScheme(targets=group.targets, weights=group.weights, input_activations=group.input_activations)
    assert expected and all(any(re.match(t[3:], base) for t in group.targets) for base in expected)
    assert not any(re.match(group.targets[0][3:], n) for n in qc.ignore)
    for base, want in expected.items():
        state = {k[len(base) + 1:]: v for k, v in tensors.items() if k.startswith(base + ".")}
        got = compressor.decompress(state, scheme_obj)["weight"]
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), base
    # vLLM looks a fused MoE layer's scheme up as <experts>.0.gate_proj / up_proj / down_proj, whatever the disk names
    for layer in (0, 1):
        assert any(re.match(t[3:], f"model.layers.{layer}.{'block_sparse_moe' if family == 'mixtral' else 'mlp'}.experts.0.up_proj")
                   for t in group.targets)
    if family == "mixtral":
        assert any(".block_sparse_moe.experts.3.w3." in k for k in tensors) and "model.layers.0.block_sparse_moe.gate.weight" in tensors


@pytest.mark.parametrize("to,scheme", CASES)
def test_export_import_identical_logits(checkpoints, to, scheme, tmp_path):
    """Our importer turns the export back into the very tensors we wrote: identical codes, identical logits."""
    src, out, ref = exported(checkpoints, "qwen3_moe", scheme, to, tmp_path)
    imported = read_checkpoint(out)
    ours = load_quantized(src)
    for prefix in ours.specs:
        for proj, qw in ours.projections(prefix).items():
            back = imported.quantized[prefix][proj]
            assert torch.equal(back.qweight, qw.qweight) and torch.equal(back.scale, qw.scale)
            assert (back.offset is None) == (qw.offset is None) and (qw.offset is None or torch.equal(back.offset, qw.offset))
    model = load_model(out)
    torch.testing.assert_close(logits(model), ref, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", EXPORTABLE["ascend"])
def test_ascend_layout_and_sign(checkpoints, scheme, tmp_path):
    """AscendV1 tensors dequantize, with msModelSlim's formula (q - weight_offset) * weight_scale, to our weights."""
    src, out, _ = exported(checkpoints, "qwen3_moe", scheme, "ascend", tmp_path)
    description = json.loads((out / "quant_model_description.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["quantize"] == description["model_quant_type"].lower()
    tensors = read_dir(out)
    assert set(description) - {"model_quant_type", "version", "group_size", "metadata"} == set(tensors)
    assert description["model.layers.0.self_attn.q_proj.weight"] == "FLOAT"
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    for base, want in our_linears(src, "qwen3_moe").items():
        if "weight_packed" in {k.rsplit(".", 1)[1] for k in tensors if k.startswith(base + ".")}:
            assert description[base + ".weight_packed"] == "W4A16" and description["group_size"] == 32
            q = unpack_from_int32(tensors[base + ".weight_packed"], 4, tuple(tensors[base + ".weight_shape"].tolist()))
            scale = tensors[base + ".weight_scale"].repeat_interleave(32, dim=1)
            got = (q.to(torch.bfloat16) * scale)
        else:
            qtype = description[base + ".weight"]
            assert qtype == ("W8A8_DYNAMIC" if scheme == "w8a8-dynamic" else "W8A16")
            assert tensors[base + ".weight_scale"].dtype == torch.float32 and tensors[base + ".weight_offset"].shape[1] == 1
            got = (tensors[base + ".weight"].float() - tensors[base + ".weight_offset"]) * tensors[base + ".weight_scale"]
            if scheme == "w8a16-asym":
                assert bool(tensors[base + ".weight_offset"].ne(0).any())
        assert torch.equal(got.to(torch.bfloat16), want), base


@pytest.mark.parametrize("to,scheme,rule", [
    ("ascend", "w4a16-g32", "asymmetric W4A16"),
    ("ascend", "w4a16", "asymmetric W4A16"),
    ("ascend", "w8a16", "W8A16 experts: vllm-ascend registers W8A16 for linear layers only"),
    ("compressed-tensors", "w8a8-static", "dynamic per-token"),
])
def test_exporters_refuse_what_the_target_cannot_represent(float_models, tmp_path, to, scheme, rule):
    model = copy.deepcopy(float_models["qwen3_moe"])
    replace_experts(model, scheme, prepare=False)
    if scheme == "w8a8-static":  # give the static scheme its calibrated input scales
        for module in model.modules():
            if hasattr(module, "input_scale") and getattr(module, "qweight", None) is not None:
                module.register_buffer("input_scale", torch.full((module.qweight.shape[0],), 0.05))
    save_model(model, tmp_path / "ck")
    with pytest.raises(FormatError, match=rule):
        export_checkpoint(tmp_path / "ck", tmp_path / "out", to)
    assert not (tmp_path / "out").exists()
    assert main(["export", str(tmp_path / "ck"), "--to", to, "-o", str(tmp_path / "out")]) == 2


def test_per_channel_w4a16_refused_for_ascend(checkpoints, tmp_path):
    path, _ = checkpoints("qwen3_moe", "w4a16-g32-sym")
    ck = json.loads((path / "config.json").read_text())
    for spec in ck["quantization_config"]["modules"].values():
        assert spec["scheme"]["group_size"] == 32
    from gmmquant.interop.ascend import quant_type

    with pytest.raises(FormatError, match="per-channel W4A16"):
        quant_type(get_scheme("w4a16", symmetric=True))


@pytest.mark.parametrize("family,rule", [("gpt_oss", "biases"), ("granitemoe", "fused on disk")])
def test_fused_on_disk_families_refused(tmp_path, family, rule):
    torch.manual_seed(0)
    config = {"gpt_oss": lambda: transformers.GptOssConfig(**COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                                           head_dim=16, layer_types=["full_attention"] * 2),
              "granitemoe": lambda: transformers.GraniteMoeConfig(**COMMON, intermediate_size=32, num_local_experts=4,
                                                                  num_experts_per_tok=2)}[family]()
    model = transformers.AutoModelForCausalLM.from_config(config)
    replace_experts(model, "w8a8-dynamic")
    save_model(model, tmp_path / "ck")
    for to in ("compressed-tensors", "ascend"):
        with pytest.raises(FormatError, match=rule):
            export_checkpoint(tmp_path / "ck", tmp_path / "out", to)
        assert not (tmp_path / "out").exists()


def test_cli_export_and_incomplete_import(checkpoints, tmp_path, capsys):
    path, ref = checkpoints("qwen3_moe", "w8a8-dynamic")
    assert main(["export", str(path), "--to", "compressed-tensors", "-o", str(tmp_path / "ct")]) == 0
    assert "int-quantized" in capsys.readouterr().out
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["input_activations"]["dynamic"] is True
    # drop one expert's tensors: the importer names what is missing
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tmp_path / "ct" / "config.json").read_text())
    from safetensors.torch import save_file

    tensors = {k: v for k, v in read_dir(tmp_path / "ct").items() if ".experts.2.up_proj." not in k}
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(FormatError, match=r"gate_up_proj: per-expert linears missing for \(expert, part\) \[\(2, 1\)\]"):
        load_model(broken)


def test_ascend_import_dequantizes_quantized_attention(checkpoints, tmp_path):
    """msModelSlim usually quantizes attention too: such linears are dequantized, the experts stay int8."""
    from safetensors.torch import save_file

    src, out, ref = exported(checkpoints, "qwen3_moe", "w8a8-dynamic", "ascend", tmp_path)
    description = json.loads((out / "quant_model_description.json").read_text())
    tensors = read_dir(out)
    base = "model.layers.1.self_attn.o_proj"
    w = tensors.pop(base + ".weight").float()
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    tensors[base + ".weight"] = torch.round(w / scale).to(torch.int8)
    tensors[base + ".weight_scale"], tensors[base + ".weight_offset"] = scale, torch.zeros_like(scale)
    for suffix in ("weight", "weight_scale", "weight_offset"):
        description[f"{base}.{suffix}"] = "W8A8_DYNAMIC"
    for file in out.glob("*.safetensors*"):
        file.unlink()
    save_file(tensors, str(out / "model.safetensors"))
    (out / "quant_model_description.json").write_text(json.dumps(description))
    model = load_model(out)
    want = (tensors[base + ".weight"].float() * scale).to(torch.bfloat16)
    got = model.get_submodule(base).weight
    assert got.dtype == want.dtype and torch.equal(got, want), (got.dtype, float((got.float() - want.float()).abs().max()))
    assert model.get_submodule("model.layers.1.mlp.experts").gate_up_proj.qweight.dtype == torch.int8
    err = float((logits(model) - ref).abs().max() / ref.abs().max())
    assert 0 < err < 5e-2, err


def test_smooth_scales_refused():
    from gmmquant.interop.compressed_tensors import check_exportable
    from gmmquant.pack.format import ExpertsSpec

    spec = ExpertsSpec("model.layers.0.mlp.experts", get_scheme("w8a8-dynamic"), 4, {"gate_up_proj": (64, 64), "down_proj": (32, 64)},
                       torch.bfloat16, extra={"down_proj": ["smooth_scale"]})
    with pytest.raises(FormatError, match="SmoothQuant"):
        check_exportable(spec, "AscendV1")


@pytest.mark.parametrize("source", ["save_model", "stream_pack"])
@pytest.mark.parametrize("to", ["compressed-tensors", "ascend"])
def test_float_experts_modules_export_per_expert(float_models, tmp_path, source, to):
    """Experts modules left in float are written per expert (ignored by compressed-tensors, FLOAT in AscendV1)."""
    from gmmquant.pack.stream import stream_pack

    model = copy.deepcopy(float_models["mixtral"])
    path = tmp_path / "ck"
    if source == "save_model":  # fused in-memory names
        original = copy.deepcopy(model.get_submodule("model.layers.0.mlp.experts"))  # replace_experts strips it
        replace_experts(model, "w8a8-dynamic")
        model.set_submodule("model.layers.0.mlp.experts", original)
        save_model(model, path)
    else:  # the original per-expert names
        model.save_pretrained(tmp_path / "hf")
        stream_pack(tmp_path / "hf", path, get_scheme("w8a8-dynamic"), ignore=["model.layers.0.*"])
    out = export_checkpoint(path, tmp_path / "out", to)
    tensors = read_dir(out)
    w1 = tensors["model.layers.0.block_sparse_moe.experts.2.w1.weight"]
    assert w1.dtype == torch.bfloat16 and w1.shape == (32, 64)
    torch.testing.assert_close(w1, float_models["mixtral"].model.layers[0].mlp.experts.gate_up_proj[2, :32], rtol=0, atol=0)
    assert tensors["model.layers.1.block_sparse_moe.experts.2.w1.weight"].dtype == torch.int8
    if to == "compressed-tensors":
        ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
        assert any(p.startswith("re:") and re.match(p[3:], "model.layers.0.block_sparse_moe.experts.3.w2") for p in ignore)
    imported = load_model(out)
    float_experts = imported.get_submodule("model.layers.0.mlp.experts")
    assert isinstance(float_experts, GMMExperts) and float_experts.gate_up_proj.scheme is None  # float GMM, via replace_experts
    # load_model(path) keeps HF's own float experts loop for the ignored module: bf16 rounding differs.
    torch.testing.assert_close(logits(imported), logits(load_model(path)), rtol=0, atol=1e-2)


def test_tied_embeddings_load_tied(tmp_path):
    """A checkpoint that stores only the embeddings of a tied model (as HF saves them) loads with lm_head tied."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    config = CONFIGS["qwen3_moe"]()
    config.tie_word_embeddings = True
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    replace_experts(model, "w8a16")
    save_model(model, tmp_path / "ck")
    out = export_checkpoint(tmp_path / "ck", tmp_path / "ct", "compressed-tensors")
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(out / "model.safetensors"))
    loaded = load_model(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(loaded), logits(load_model(tmp_path / "ck")), rtol=0, atol=0)
