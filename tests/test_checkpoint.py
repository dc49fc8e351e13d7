"""Checkpoint format v1: round trips, atomic writes, and a clear error for every kind of broken checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gmmquant.pack import get_scheme, quantize_weight
from gmmquant.pack.checkpoint import load_quantized, projection_tensors, save_quantized
from gmmquant.pack.format import ExpertsSpec, FormatError

E, H, I = 4, 64, 32
PREFIX = "model.layers.0.mlp.experts"


def make(scheme_name="w4a16-g32", seed=0, act=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    scheme = get_scheme(scheme_name)
    gate_up = quantize_weight(torch.randn(E, H, 2 * I, generator=g), scheme, act)
    down = quantize_weight(torch.randn(E, I, H, generator=g), scheme, act)
    tensors = {**projection_tensors(PREFIX, "gate_up_proj", gate_up), **projection_tensors(PREFIX, "down_proj", down)}
    others = {"model.embed_tokens.weight": torch.randn(32, H, generator=g).to(act),
              "model.layers.0.mlp.gate.weight": torch.randn(E, H, generator=g).to(act),
              "lm_head.weight": torch.randn(32, H, generator=g).to(act)}
    spec = ExpertsSpec(PREFIX, scheme, E, {"gate_up_proj": (H, 2 * I), "down_proj": (I, H)}, act)
    return spec, tensors, others, {"gate_up_proj": gate_up, "down_proj": down}


def save(path, spec, tensors, others, **kw):
    src = path.parent / "src"
    src.mkdir(exist_ok=True)
    (src / "tokenizer.json").write_text('{"fake": true}')
    (src / "model.safetensors").write_bytes(b"not copied")
    kw.setdefault("source_dir", src)
    return save_quantized(path, config={"model_type": "qwen3_moe", "hidden_size": H}, specs={PREFIX: spec},
                          tensors=list(tensors.items()) + list(others.items()), act_dtype=spec.act_dtype, **kw)


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16", "w4a16-g32", "w8a8-dynamic"])
def test_round_trip_is_bit_identical(tmp_path, scheme):
    spec, tensors, others, qws = make(scheme)
    out = tmp_path / "ckpt"
    report = save(out, spec, tensors, others, ignore=["lm_head"])
    assert report.shards == 1 and report.copied_files == ["tokenizer.json"]
    ck = load_quantized(out)
    assert ck.config["quantization_config"]["format_version"] == 1 and ck.ignore == ["lm_head"]
    assert ck.specs[PREFIX].scheme == get_scheme(scheme)
    for name, t in {**tensors, **others}.items():
        got = ck.tensor(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name
    loaded = ck.projections(PREFIX)
    for proj, qw in qws.items():
        assert torch.equal(loaded[proj].qweight, qw.qweight)
        assert torch.equal(loaded[proj].dequantize(), qw.dequantize())
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    streamed = dict(ck.iter_tensors())
    assert set(streamed) == set(tensors) | set(others)
    assert all(torch.equal(streamed[n], t) for n, t in {**tensors, **others}.items())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_shards_are_bounded_and_indexed(tmp_path):
    spec, tensors, others, _ = make("w8a16")
    out = tmp_path / "ckpt"
    report = save(out, spec, tensors, others, max_shard_size=10_000)
    assert report.shards >= 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) == report.shards
    for f in files:
        tensors_in = load_file(out / f)
        assert len(tensors_in) == 1 or sum(t.numel() * t.element_size() for t in tensors_in.values()) <= 10_000
    assert set(index["weight_map"]) == set(tensors) | set(others)
    load_quantized(out)


def test_refuses_existing_directory_and_overwrites_atomically(tmp_path):
    spec, tensors, others, _ = make()
    out = tmp_path / "ckpt"
    save(out, spec, tensors, others)
    with pytest.raises(FileExistsError, match="already exists"):
        save(out, spec, tensors, others)
    save(out, spec, tensors, others, overwrite=True)
    load_quantized(out)


def test_failed_save_leaves_nothing(tmp_path):
    spec, tensors, others, _ = make()

    def exploding():
        yield from list(tensors.items())[:2]
        raise RuntimeError("disk on fire")

    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_quantized(out, config={}, specs={PREFIX: spec}, tensors=exploding(), act_dtype=torch.bfloat16)
    assert list(tmp_path.iterdir()) == []


def test_invalid_tensors_are_refused_before_anything_appears(tmp_path):
    spec, tensors, others, _ = make()
    bad = dict(tensors)
    bad[f"{PREFIX}.down_proj.antiquant_scale"] = bad[f"{PREFIX}.down_proj.antiquant_scale"].float()
    del bad[f"{PREFIX}.gate_up_proj.antiquant_offset"]
    with pytest.raises(FormatError) as info:
        save(tmp_path / "ckpt", spec, bad, others)
    message = str(info.value)
    assert "down_proj.antiquant_scale: dtype float32, expected bfloat16" in message
    assert "missing tensor model.layers.0.mlp.experts.gate_up_proj.antiquant_offset" in message
    assert not (tmp_path / "ckpt").exists()
    nan = dict(tensors)
    nan[f"{PREFIX}.down_proj.antiquant_scale"] = torch.full_like(nan[f"{PREFIX}.down_proj.antiquant_scale"], float("nan"))
    with pytest.raises(FormatError, match="NaN or inf"):
        save(tmp_path / "ckpt", spec, nan, others)
    assert not (tmp_path / "ckpt").exists()


@pytest.fixture
def saved(tmp_path):
    spec, tensors, others, _ = make()
    out = tmp_path / "ckpt"
    save(out, spec, tensors, others, max_shard_size=5_000)
    return out


def rewrite_config(path: Path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))


def shard_of(path: Path, name: str) -> Path:
    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_corrupt_shard(saved):
    shard = shard_of(saved, f"{PREFIX}.gate_up_proj.qweight")
    shard.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(FormatError, match="corrupt or truncated safetensors file"):
        load_quantized(saved)


def test_truncated_shard(saved):
    shard = shard_of(saved, f"{PREFIX}.gate_up_proj.qweight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="corrupt or truncated"):
        load_quantized(saved)


def test_missing_shard(saved):
    os.remove(shard_of(saved, f"{PREFIX}.down_proj.qweight"))
    with pytest.raises(FormatError, match="the index names shard\\(s\\) that do not exist"):
        load_quantized(saved)


def test_wrong_dtype_and_shape(saved):
    name = f"{PREFIX}.down_proj.qweight"
    shard = shard_of(saved, name)
    content = load_file(shard)
    content[name] = content[name].to(torch.int8)[..., :3].contiguous()
    save_file(content, str(shard))
    with pytest.raises(FormatError) as info:
        load_quantized(saved)
    assert f"{name}: dtype int8, expected int32" in str(info.value)
    assert f"{name}: shape [4, 32, 3], expected [4, 32, 8]" in str(info.value)


def test_unknown_format_version(saved):
    rewrite_config(saved, lambda qc: qc.update(format_version=2))
    with pytest.raises(FormatError, match="unknown gmmquant format_version 2"):
        load_quantized(saved)


def test_not_a_gmmquant_checkpoint(saved):
    rewrite_config(saved, lambda qc: qc.update(quant_method="awq"))
    with pytest.raises(FormatError, match="quant_method is 'awq'"):
        load_quantized(saved)
    (saved / "config.json").write_text("{nope")
    with pytest.raises(FormatError, match="invalid JSON"):
        load_quantized(saved)


def test_scheme_the_kernel_cannot_run(saved):
    def to_int8_per_group(qc):
        qc["modules"][PREFIX]["scheme"].update(weight_bits=8, group_size=32)
    rewrite_config(saved, to_int8_per_group)
    with pytest.raises(FormatError, match="int8 weight-only supports per-channel only"):
        load_quantized(saved)


def test_group_size_that_does_not_divide_k(saved):
    def bad_k(qc):
        qc["modules"][PREFIX]["projections"]["down_proj"]["k"] = 48
    rewrite_config(saved, bad_k)
    with pytest.raises(FormatError, match="group_size 32 does not divide K=48"):
        load_quantized(saved)


def test_malformed_module_entry(saved):
    rewrite_config(saved, lambda qc: qc["modules"][PREFIX].pop("num_experts"))
    with pytest.raises(FormatError, match="malformed quantization_config entry"):
        load_quantized(saved)
