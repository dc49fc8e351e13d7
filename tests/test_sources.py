"""Quantized source checkpoints (block FP8, MXFP4, compressed-tensors): dequantization against float64
references, format rules, and pack / streamed calibration of tiny checkpoints in each format."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from gmmquant.sources import SourceError, TensorStore, source_format
from gmmquant.sources.fp8_block import dequantize_fp8_block
from gmmquant.sources.mxfp4 import dequantize_mxfp4
from tests.source_models import fp8_block_reference, fp8_checkpoint, mxfp4_checkpoint, mxfp4_reference, quantize_fp8_block
from tests.source_models import read_all as _tensors

BF16_REL = 2.0 ** -8  # one bf16 rounding (8 significant bits)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


# ---------------------------------------------------------------- dequantization, float64 references


@pytest.mark.parametrize("shape,block", [((300, 260), (128, 128)), ((3, 256, 384), (128, 128)), ((40, 50), (16, 32))])
def test_fp8_block_dequant_matches_float64(shape, block):
    torch.manual_seed(0)
    q, s = quantize_fp8_block(torch.randn(shape) * 3, block)  # partial edge blocks where 128 does not divide
    ref = fp8_block_reference(q, s, block)
    got32 = dequantize_fp8_block(q, s, block, torch.float32, "w")
    assert _rel(got32, ref) <= 2.0 ** -23  # one float32 rounding of the product
    got16 = dequantize_fp8_block(q, s, block, torch.bfloat16, "w")
    assert _rel(got16, ref) <= BF16_REL


def test_fp8_block_dequant_matches_transformers():
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    torch.manual_seed(1)
    q, s = quantize_fp8_block(torch.randn(260, 300), (128, 128))
    theirs = _dequantize_fp8_weight(q, s, [128, 128], torch.float32)
    assert torch.equal(dequantize_fp8_block(q, s, (128, 128), torch.float32, "w"), theirs)


def test_mxfp4_dequant_matches_float64_and_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 150, (3, 8, 4), dtype=torch.uint8, generator=g)
    ref = mxfp4_reference(blocks, scales).transpose(-1, -2)  # [E, in, out]
    got = dequantize_mxfp4(blocks, scales, torch.float32, "x")
    assert got.shape == (3, 128, 8)
    assert _rel(got, ref) == 0.0  # e2m1 times a power of two is exact in float32
    assert torch.equal(got, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    assert torch.equal(dequantize_mxfp4(blocks[1], scales[1], torch.float32, "x"), got[1])  # one expert's slice


def test_compressed_tensors_float_and_pack_quantized_match_float64():
    from gmmquant.interop.packing import pack_offset_binary

    torch.manual_seed(2)
    fmt_fp8 = source_format({"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
                                                     "config_groups": {"g": {"format": "float-quantized", "targets": ["Linear"],
                                                                             "weights": {"num_bits": 8, "type": "float"}}}}})
    q = (torch.randn(64, 96) * 50).to(torch.float8_e4m3fn)
    for scale in (torch.rand(64, 1) + 0.1, torch.rand(1) + 0.1, torch.rand(1, 2) + 0.1, torch.rand(64, 3) + 0.1):
        grid = scale.double().reshape(-1, 1) if scale.dim() == 1 else scale.double()
        reference = q.double() * grid.repeat_interleave(math.ceil(64 / grid.shape[0]), 0)[:64].repeat_interleave(
            math.ceil(96 / grid.shape[1]), 1)[:, :96]
        got = fmt_fp8.dequantize("w.weight", q, {"weight_scale": scale}, torch.float32)
        assert _rel(got, reference) <= 2.0 ** -23, list(scale.shape)
    fmt_int4 = source_format({"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                                      "config_groups": {"g": {"format": "pack-quantized", "targets": ["Linear"],
                                                                              "weights": {"num_bits": 4, "group_size": 32}}}}})
    codes = torch.randint(-8, 8, (16, 64))
    scale = torch.rand(16, 2) + 0.01
    got = fmt_int4.dequantize("w.weight", pack_offset_binary(codes, 4), {"weight_scale": scale,
                                                                         "weight_shape": torch.tensor([16, 64])}, torch.float32)
    reference = codes.double() * scale.double().repeat_interleave(32, dim=1)
    assert _rel(got, reference) <= 2.0 ** -23


# ---------------------------------------------------------------- format rules: clear errors


@pytest.mark.parametrize("qc,words", [
    ({"quant_method": "awq"}, "unknown quantization_config.quant_method 'awq'"),
    ({"quant_method": "gmmquant"}, "already a gmmquant checkpoint"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
    ({"quant_method": "fp8", "weight_block_size": [0, 128]}, "weight_block_size"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "e4m3"),
    ({"quant_method": "compressed-tensors", "format": "marlin-24"}, "marlin-24"),
    ("fp8", "expected an object"),
])
def test_bad_quantization_configs_are_refused_naming_the_rule(qc, words):
    with pytest.raises(SourceError, match=words.replace("(", r"\(").replace("[", r"\[")):
        source_format({"quantization_config": qc})


def test_fp8_missing_or_misshapen_scale_is_refused():
    fmt = source_format({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    q, s = quantize_fp8_block(torch.randn(256, 256), (128, 128))
    with pytest.raises(SourceError, match="without 'a.weight_scale_inv'"):
        fmt.dequantize("a.weight", q, {}, torch.bfloat16)
    with pytest.raises(SourceError, match=r"weight_scale_inv has shape \[2, 1\], expected \[2, 2\]"):
        fmt.dequantize("a.weight", q, {"scale_inv": s[:, :1]}, torch.bfloat16)
    with pytest.raises(SourceError, match="a scale without its weight"):
        fmt.group(["b.weight_scale_inv"])
    mx = source_format({"quantization_config": {"quant_method": "mxfp4"}})
    with pytest.raises(SourceError, match="without their scale tensor 'e.gate_up_proj_scales'"):
        mx.group(["e.gate_up_proj_blocks"])


def test_corrupt_source_file_is_a_clear_error(tmp_path):
    save_file({"a.weight": torch.zeros(64, 64, dtype=torch.float8_e4m3fn), "a.weight_scale_inv": torch.ones(1, 1)},
              str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 1000])  # truncated
    with pytest.raises(ValueError, match="corrupt or truncated"):
        TensorStore(tmp_path, source_format({"quantization_config": {"quant_method": "fp8"}})).get("a.weight")


# ---------------------------------------------------------------- tiny checkpoints: pack


@pytest.fixture(scope="module")
def deepseek_fp8(tmp_path_factory):
    return fp8_checkpoint(tmp_path_factory.mktemp("ds"), "deepseek_v3", block=(16, 32))


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory):
    return mxfp4_checkpoint(tmp_path_factory.mktemp("oss"))


def test_store_dequantizes_experts_as_the_float64_reference(deepseek_fp8, gpt_oss_mxfp4):
    for quant, ref in (deepseek_fp8, gpt_oss_mxfp4):
        store = TensorStore(quant, source_format(json.loads((quant / "config.json").read_text())), torch.bfloat16)
        reference = _tensors(ref)
        assert set(store.entries) == set(reference)
        for name in store.entries:
            assert torch.equal(store.get(name), reference[name]), name
        fused = [n for n in store.entries if n.endswith("experts.down_proj")]
        for name in fused:  # one expert's slice, as packing and calibration read it
            assert torch.equal(store.get(name, slice(1, 3)), reference[name][1:3])


@pytest.mark.parametrize("which", ["deepseek_fp8", "gpt_oss_mxfp4"])
def test_pack_of_a_quantized_source_equals_pack_of_its_dequantized_bf16(which, request, tmp_path):
    from gmmquant.pack import get_scheme
    from gmmquant.pack.stream import stream_pack

    quant, ref = request.getfixturevalue(which)
    scheme = get_scheme("w8a16")
    a = stream_pack(quant, tmp_path / "a", scheme, max_memory=3 * 2**20)  # chunks of a few experts
    b = stream_pack(ref, tmp_path / "b", scheme)
    ta, tb = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert ta.keys() == tb.keys()
    assert not any(n.endswith("_scale_inv") or n.endswith(("_blocks", "_scales")) for n in ta)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    assert a.mean_rel_error == pytest.approx(b.mean_rel_error)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gmmquant"


def test_pack_cli_refuses_an_unknown_quant_method(deepseek_fp8, tmp_path, capsys):
    from gmmquant.cli import main

    quant, _ = deepseek_fp8
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in quant.iterdir():
        (bad / f.name).symlink_to(f)
    config = json.loads((quant / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitnet"}
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps(config))
    assert main(["pack", str(bad), "-o", str(tmp_path / "out"), "--scheme", "w8a16"]) == 2
    assert "unknown quantization_config.quant_method 'bitnet'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- tiny checkpoints: streamed calibration


def _calibrate(src, out, recipe="w8a16", **kw):
    from gmmquant.calibrate.pipeline import calibrate_model
    from gmmquant.recipes import load_recipe

    recipe = load_recipe(recipe, num_samples=4, seq_len=32, min_tokens=1)  # GPTQ on every expert that saw a token
    return calibrate_model(src, out, recipe, **kw)


@pytest.mark.parametrize("which,recipe", [("deepseek_fp8", "w4a8-dynamic"), ("gpt_oss_mxfp4", "w8a16")])
def test_streamed_calibration_of_a_quantized_source_equals_its_bf16(which, recipe, request, tmp_path):
    quant, ref = request.getfixturevalue(which)
    a = _calibrate(quant, tmp_path / "a", recipe, max_memory=2 * 2**20)  # chunks of a few experts
    b = _calibrate(ref, tmp_path / "b", recipe, max_memory="1GiB")  # one chunk per layer
    ta, tb = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    assert [r.routed for r in a.layers] == [r.routed for r in b.layers]
    assert all(0 < r.output_error < 0.5 for r in a.layers)


def test_streamed_calibration_is_close_to_the_layer_by_layer_pipeline(deepseek_fp8, tmp_path):
    """Same recipe on the same bf16 model: streamed (float32 statistics) vs layer by layer (bf16 statistics)."""
    _, ref = deepseek_fp8
    a = _calibrate(ref, tmp_path / "streamed", "w4a8-dynamic", max_memory=2 * 2**20)
    b = _calibrate(ref, tmp_path / "layers", "w4a8-dynamic")
    assert [r.routed for r in a.layers] == [r.routed for r in b.layers]
    assert [r.fallbacks for r in a.layers] == [r.fallbacks for r in b.layers]
    for ra, rb in zip(a.layers, b.layers):
        assert ra.weight_error == pytest.approx(rb.weight_error, rel=0.05)
    ta, tb = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "layers")
    assert ta.keys() == tb.keys()
    scales = [n for n in ta if n.endswith("weight_scale")]
    assert scales and all(_rel(ta[n].float(), tb[n].float()) < 0.05 for n in scales)


def test_streamed_calibration_over_two_devices_equals_one(deepseek_fp8, tmp_path):
    quant, _ = deepseek_fp8
    _calibrate(quant, tmp_path / "one", max_memory=2 * 2**20, devices=["cpu"])
    _calibrate(quant, tmp_path / "two", max_memory=2 * 2**20, devices=["cpu", "cpu"])
    ta, tb = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)


def test_streamed_checkpoint_loads_and_runs_close_to_the_float_model(deepseek_fp8, tmp_path):
    import transformers

    import gmmquant

    quant, ref = deepseek_fp8
    _calibrate(quant, tmp_path / "q", max_memory=2 * 2**20)
    ids = torch.randint(0, 300, (1, 16))
    float_model = transformers.AutoModelForCausalLM.from_pretrained(ref, dtype=torch.bfloat16).eval()
    model = gmmquant.load_model(tmp_path / "q").eval()
    with torch.no_grad():
        want, got = float_model(ids).logits.float(), model(ids).logits.float()
    assert float((got - want).norm() / want.norm()) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_calibration_on_cuda_matches_cpu(deepseek_fp8, tmp_path):
    quant, _ = deepseek_fp8
    a = _calibrate(quant, tmp_path / "cpu", max_memory=2 * 2**20)
    b = _calibrate(quant, tmp_path / "cuda", max_memory=2 * 2**20, device="cuda:0")
    ta, tb = _tensors(tmp_path / "cpu"), _tensors(tmp_path / "cuda")
    assert ta.keys() == tb.keys()
    for name in ta:  # int codes may flip at rounding ties between devices: compare dequantized error instead
        if ta[name].is_floating_point():
            assert _rel(tb[name].float(), ta[name].float()) < 0.02, name
    assert [r.routed for r in a.layers] == [r.routed for r in b.layers]


# ---------------------------------------------------------------- devices


@pytest.fixture
def fake_torch_npu(monkeypatch):
    """A torch_npu that records what device checks ask it (no Ascend toolkit here)."""
    import sys
    import types

    calls = []
    npu = types.SimpleNamespace(is_available=lambda: calls.append("is_available") or True,
                                device_count=lambda: calls.append("device_count") or 2)
    module = types.ModuleType("torch_npu")
    module.npu = npu
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    return calls


def test_npu_devices_are_checked_through_torch_npu(fake_torch_npu):
    from gmmquant.calibrate.devices import DeviceError, check_devices

    assert check_devices(["npu:1", "npu", "cpu"]) == ["npu:1", "npu:0", "cpu"]
    assert "device_count" in fake_torch_npu
    with pytest.raises(DeviceError, match="has 2 npu device"):
        check_devices(["npu:2"])


def test_unusable_devices_are_refused_before_any_work(monkeypatch, deepseek_fp8, tmp_path):
    import sys

    from gmmquant.calibrate.devices import DeviceError, check_device

    monkeypatch.setitem(sys.modules, "torch_npu", None)  # not installed
    with pytest.raises(DeviceError, match="needs torch_npu"):
        check_device("npu:0")
    with pytest.raises(DeviceError, match="unknown device type 'tpu'"):
        check_device("tpu:0")
    if not torch.cuda.is_available():
        quant, _ = deepseek_fp8
        with pytest.raises(DeviceError, match="0 cuda device"):
            _calibrate(quant, tmp_path / "out", device="cuda:0")
        assert not (tmp_path / "out").exists()
