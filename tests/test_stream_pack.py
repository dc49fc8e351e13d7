"""Stream-pack from HF checkpoint directories (per-expert and fused layouts) equals in-memory quantization."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from gmmquant.cli import main
from gmmquant.pack import get_scheme, quantize_weight
from gmmquant.pack.checkpoint import load_quantized
from gmmquant.pack.format import FormatError
from gmmquant.pack.layouts import canonical, canonical_bias, find_experts_modules
from gmmquant.pack.stream import stream_pack

transformers = pytest.importorskip("transformers")


def tiny_configs():
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return {
        # saved per expert: experts.{e}.gate_proj/up_proj/down_proj.weight
        "qwen3_moe": transformers.Qwen3MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32,
                                                 num_experts=4, num_experts_per_tok=2, head_dim=16),
        # saved per expert under another name: block_sparse_moe.experts.{e}.w1/w2/w3.weight
        "mixtral": transformers.MixtralConfig(**common, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
        # saved fused, [E, K, N] (is_transposed), gate/up interleaved, with biases
        "gpt_oss": transformers.GptOssConfig(**common, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                             head_dim=16, layer_types=["full_attention"] * 2),
    }


@pytest.fixture(scope="module", params=sorted(tiny_configs()))
def hf_model_dir(request, tmp_path_factory):
    config = tiny_configs()[request.param]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(path, max_shard_size="100KB")
    (path / "tokenizer_config.json").write_text("{}")
    return request.param, path, model


@pytest.mark.parametrize("scheme_name", ["w4a16", "w8a16", "w4a16-g32"])
def test_stream_pack_equals_in_memory_quantization(hf_model_dir, scheme_name, tmp_path):
    model_type, src, model = hf_model_dir
    scheme = get_scheme(scheme_name)
    summary = stream_pack(src, tmp_path / "out", scheme)
    ck = load_quantized(tmp_path / "out")
    modules = find_experts_modules(model)
    assert set(ck.specs) == set(modules) and len(modules) == 2
    assert len(summary.projections) == 4 and 0 < summary.max_rel_error < 0.2
    for path, info in modules.items():
        module = model.get_submodule(path)
        loaded = ck.projections(path)
        for proj in info.projections:
            expected = quantize_weight(canonical(getattr(module, proj).detach(), info, proj), scheme, torch.bfloat16)
            assert torch.equal(loaded[proj].qweight, expected.qweight), f"{path}.{proj}"
            assert torch.equal(loaded[proj].scale, expected.scale)
            assert (loaded[proj].offset is None) == (expected.offset is None)
            if expected.offset is not None:
                assert torch.equal(loaded[proj].offset, expected.offset)
            if info.has_bias:
                bias = canonical_bias(getattr(module, f"{proj}_bias").detach(), info, proj).float()
                assert torch.equal(ck.tensor(f"{path}.{proj}.bias"), bias)
    # every non-expert tensor is copied bit for bit, under its original name
    with safe_open(str(next(src.glob("*.safetensors"))), "pt") as f:
        name = next(k for k in f.keys() if "embed_tokens" in k)
        assert torch.equal(ck.tensor(name), f.get_tensor(name))
    assert (tmp_path / "out" / "tokenizer_config.json").exists()


def test_ignore_keeps_a_module_in_float(hf_model_dir, tmp_path):
    model_type, src, model = hf_model_dir
    stream_pack(src, tmp_path / "out", get_scheme("w8a16"), ignore=["model.layers.0.*"])
    ck = load_quantized(tmp_path / "out")
    assert list(ck.specs) == ["model.layers.1.mlp.experts"]
    assert ck.ignore == ["model.layers.0.*"]
    assert any(n.startswith("model.layers.0.") and "expert" in n and not n.endswith(("qweight", "scale")) for n in ck.weight_map)
    # the ignored module loads in float, through transformers' own conversions of the on-disk layout
    import gmmquant

    loaded = gmmquant.load_model(tmp_path / "out")
    assert not isinstance(loaded.model.layers[0].mlp.experts, gmmquant.GMMExperts)
    assert isinstance(loaded.model.layers[1].mlp.experts, gmmquant.GMMExperts)
    for name, p in model.model.layers[0].mlp.experts.named_parameters():
        assert torch.equal(getattr(loaded.model.layers[0].mlp.experts, name), p), name


def test_cli_pack_and_inspect(hf_model_dir, tmp_path, capsys):
    model_type, src, _ = hf_model_dir
    out = tmp_path / "cli"
    assert main(["pack", str(src), "-o", str(out), "--scheme", "w4a16", "--symmetric"]) == 0
    text = capsys.readouterr().out
    assert "quantized 4 expert projections" in text and "weight error: max" in text
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "gmmquant format v1" in text and "validation: OK" in text and ".gate_up_proj.qweight" in text
    # a scheme the shapes cannot take is refused before anything is written
    assert main(["pack", str(src), "-o", str(tmp_path / "bad"), "--scheme", "w4a16-g128"]) == 2
    assert "does not divide K" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_model_without_experts_is_refused(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "dense")
    with pytest.raises(FormatError, match="no fused MoE experts modules"):
        stream_pack(tmp_path / "dense", tmp_path / "out", get_scheme("w8a16"))
    with pytest.raises(FormatError, match="no config.json"):
        stream_pack(tmp_path / "nowhere", tmp_path / "out", get_scheme("w8a16"))
    assert not (tmp_path / "out").exists()
