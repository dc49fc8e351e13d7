"""Hostile checkpoints: every way a gmmquant checkpoint on disk can be broken gets a clear refusal naming the
file, tensor or rule (from `gmmquant inspect`, and from the library loaders), never a raw traceback, a hang,
or a silent wrong result."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch

from hostile_util import PREFIX, assert_clear_error, cli, edit_config, edit_tensors, flip_byte
from gmmquant import FormatError, load_model
from gmmquant.pack.checkpoint import load_quantized

GATE_UP = f"{PREFIX}.gate_up_proj"
DOWN = f"{PREFIX}.down_proj"


def inspect_refuses(capsys, ck: Path, *fragments: str, verify: bool = False) -> str:
    return assert_clear_error(capsys, ["inspect", ck, *(["--verify"] if verify else [])], *fragments)


# --- the safetensors files -----------------------------------------------------------------------------------


def test_truncated_shard(capsys, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    inspect_refuses(capsys, ck, "model.safetensors", "corrupt or truncated")


def test_header_length_past_the_file(capsys, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    data = bytearray((ck / "model.safetensors").read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 4)
    (ck / "model.safetensors").write_bytes(bytes(data))
    inspect_refuses(capsys, ck, "model.safetensors", "corrupt or truncated")


def test_header_offsets_past_the_file(capsys, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    file = ck / "model.safetensors"
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = f"{GATE_UP}.qweight"
    start, stop = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, stop + 10**9]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    inspect_refuses(capsys, ck, "model.safetensors")


def test_garbage_header(capsys, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    data = bytearray((ck / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32
    (ck / "model.safetensors").write_bytes(bytes(data))
    inspect_refuses(capsys, ck, "model.safetensors", "corrupt or truncated")


@pytest.mark.parametrize("tensor", [f"{GATE_UP}.qweight", f"{DOWN}.antiquant_scale", "model.embed_tokens.weight"])
def test_bit_flip_is_caught_by_verify(capsys, packed_asym, copy_of, tensor):
    """Any flipped byte, in codes, scales or float weights: the SHA-256 recorded at save no longer matches."""
    ck = copy_of(packed_asym)
    file = ck / "model.safetensors"
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    start, _ = json.loads(data[8:8 + n])[tensor]["data_offsets"]
    flip_byte(file, len(data) - (8 + n + start))
    line = inspect_refuses(capsys, ck, tensor, "SHA-256", "changed after it was written", verify=True)
    assert str(file) in line


def test_verify_passes_a_clean_checkpoint(capsys, packed_asym):
    rc, out, _ = cli(capsys, "inspect", packed_asym, "--verify")
    assert rc == 0 and "validation: OK" in out
    n = len(load_quantized(packed_asym).headers)
    assert f"read all {n} tensors; {n} SHA-256 checksum(s) match" in out


def test_verify_without_recorded_checksums_reads_everything(capsys, tmp_path, packed_asym):
    """Checkpoints saved without checksums (older gmmquant) still verify as far as possible: every tensor is read."""
    from gmmquant.pack.checkpoint import save_quantized

    ck = load_quantized(packed_asym)
    out = tmp_path / "nosum"
    save_quantized(out, config=ck.config, specs=ck.specs, tensors=ck.iter_tensors(), act_dtype=ck.act_dtype,
                   checksums=False)
    rc, stdout, _ = cli(capsys, "inspect", out, "--verify")
    assert rc == 0 and f"{len(ck.headers)} tensor(s) have no recorded checksum" in stdout


# --- expert tensors: dtypes, shapes, values --------------------------------------------------------------------


def test_wrong_qweight_dtype(capsys, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    edit_tensors(ck, lambda t: t.update({f"{DOWN}.qweight": t[f"{DOWN}.qweight"].view(torch.float32)}))
    inspect_refuses(capsys, ck, f"{DOWN}.qweight: dtype float32, expected int32")


def test_wrong_qweight_shape(capsys, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    edit_tensors(ck, lambda t: t.update({f"{DOWN}.qweight": t[f"{DOWN}.qweight"][:, :64].contiguous()}))
    inspect_refuses(capsys, ck, f"{DOWN}.qweight: shape [8, 64, 16], expected [8, 128, 16]")


def test_wrong_scale_shape(capsys, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    edit_tensors(ck, lambda t: t.update({f"{DOWN}.antiquant_scale": t[f"{DOWN}.antiquant_scale"][:4].contiguous()}))
    inspect_refuses(capsys, ck, f"{DOWN}.antiquant_scale: shape [4, 1, 128], expected [8, 1, 128]")


def test_wrong_offset_shape(capsys, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    edit_tensors(ck, lambda t: t.update({f"{DOWN}.antiquant_offset": t[f"{DOWN}.antiquant_offset"][..., :64].contiguous()}))
    inspect_refuses(capsys, ck, f"{DOWN}.antiquant_offset: shape [8, 1, 64], expected [8, 1, 128]")


def _poison(name: str, value: float):
    def change(t):
        bad = t[name].clone()
        bad.view(-1)[3] = value
        t[name] = bad
    return change


@pytest.mark.parametrize("tensor,value,rule", [
    ("antiquant_scale", float("nan"), "NaN or inf"),
    ("antiquant_scale", float("inf"), "NaN or inf"),
    ("antiquant_scale", 0.0, "zero or negative"),
    ("antiquant_scale", -0.01, "zero or negative"),
    ("antiquant_offset", float("nan"), "NaN or inf"),
    ("antiquant_offset", float("-inf"), "NaN or inf"),
])
def test_bad_scale_and_offset_values(capsys, packed_asym, copy_of, tensor, value, rule):
    ck = copy_of(packed_asym)
    edit_tensors(ck, _poison(f"{GATE_UP}.{tensor}", value))
    inspect_refuses(capsys, ck, f"{GATE_UP}.{tensor}: 1 ", rule)
    with pytest.raises(FormatError, match=rule):
        load_model(ck)  # what eval and generation go through


def test_nan_scale_is_refused_by_eval_and_export(capsys, packed_sym, copy_of, tmp_path):
    ck = copy_of(packed_sym)
    edit_tensors(ck, _poison(f"{DOWN}.antiquant_scale", float("nan")))
    assert_clear_error(capsys, ["eval", ck, "--max-windows", "1", "--seq-len", "16"], "NaN or inf")
    assert_clear_error(capsys, ["export", ck, "--to", "compressed-tensors", "-o", tmp_path / "ct"], "NaN or inf")
    assert not (tmp_path / "ct").exists()


def test_group_size_not_dividing_k(capsys, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    edit_config(ck, lambda c: c["quantization_config"]["modules"][PREFIX]["scheme"].update(group_size=96, name="w4a16-g96"))
    inspect_refuses(capsys, ck, "group", "96")


# --- index and shards --------------------------------------------------------------------------------------


def test_shard_listed_in_the_index_but_missing(capsys, packed_sharded, copy_of):
    ck = copy_of(packed_sharded)
    victim = sorted(ck.glob("model-*.safetensors"))[1]
    victim.unlink()
    inspect_refuses(capsys, ck, "index names shard(s) that do not exist", victim.name)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_entry_escaping_the_directory(capsys, packed_sharded, copy_of, target):
    ck = copy_of(packed_sharded)
    (ck.parent / "outside.safetensors").write_bytes((ck / sorted(ck.glob("model-*"))[0].name).read_bytes())
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = target
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    inspect_refuses(capsys, ck, repr(target), "outside")
    with pytest.raises(FormatError, match="outside"):
        load_model(ck)


@pytest.mark.parametrize("index,rule", [
    ({"weight_map": [1]}, "'weight_map' must be an object"),
    ({"weight_map": {"a": 1}}, "is 1, not a shard file name"),
    ({"metadata": {}}, "'weight_map' must be an object"),
    ("[1, 2]", "must hold a JSON object"),
    ("{not json", "invalid JSON"),
])
def test_malformed_index(capsys, packed_sharded, copy_of, index, rule):
    ck = copy_of(packed_sharded)
    (ck / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    inspect_refuses(capsys, ck, "model.safetensors.index.json", rule)


def test_shard_symlink_to_dev_zero(capsys, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    (ck / "model.safetensors").unlink()
    (ck / "model.safetensors").symlink_to("/dev/zero")
    inspect_refuses(capsys, ck, "model.safetensors", "a device", "not a regular file")


def test_shard_symlink_to_a_regular_file_outside_loads(capsys, packed_asym, copy_of, tmp_path):
    """The Hugging Face hub cache links snapshot files to blobs outside the snapshot: that must keep working."""
    ck = copy_of(packed_asym)
    blob = tmp_path / "blobs" / "abc123"
    blob.parent.mkdir()
    os.replace(ck / "model.safetensors", blob)
    (ck / "model.safetensors").symlink_to(blob)
    rc, out, _ = cli(capsys, "inspect", ck, "--verify")
    assert rc == 0 and "validation: OK" in out


def test_duplicate_tensor_across_shards(capsys, packed_sharded, copy_of):
    ck = copy_of(packed_sharded)
    first, second = sorted(ck.glob("model-*.safetensors"))[:2]
    from safetensors import safe_open

    with safe_open(str(first), framework="pt") as f:
        name = next(iter(f.keys()))
        dup = f.get_tensor(name)
    edit_tensors(ck, lambda t: t.update({name: dup}), file=second.name)
    inspect_refuses(capsys, ck, name, "more than one shard")


# --- config.json and quantization_config -------------------------------------------------------------------------


@pytest.mark.parametrize("content,rule", [
    (b"{nope", "invalid JSON"),
    (b"[1, 2, 3]", "must hold a JSON object, got list"),
    (b'{"model_type": "qwen3_moe\xff\xfe"}', "not UTF-8"),
    (b"", "invalid JSON"),
])
def test_garbage_config(capsys, packed_asym, copy_of, content, rule):
    ck = copy_of(packed_asym)
    (ck / "config.json").write_bytes(content)
    inspect_refuses(capsys, ck, "config.json", rule)


def test_missing_config(capsys, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    (ck / "config.json").unlink()
    inspect_refuses(capsys, ck, "no config.json")


def test_config_is_a_fifo_does_not_hang(capsys, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    (ck / "config.json").unlink()
    os.mkfifo(ck / "config.json")
    inspect_refuses(capsys, ck, "config.json", "a FIFO")


@pytest.mark.parametrize("change,rule", [
    (lambda c: c.pop("quantization_config"), "no quantization_config"),
    (lambda c: c["quantization_config"].update(quant_method="awq"), "quant_method is 'awq'"),
    (lambda c: c["quantization_config"].update(format_version=99), "unknown gmmquant format_version 99"),
    (lambda c: c["quantization_config"]["modules"][PREFIX]["scheme"].update(weight_bits=3), PREFIX),
    (lambda c: c["quantization_config"].update(act_dtype="float64"), "act_dtype"),
    (lambda c: c["quantization_config"].update(modules={}), "non-empty mapping"),
    (lambda c: c["quantization_config"]["modules"][PREFIX].pop("projections"), "malformed"),
])
def test_bad_quantization_config(capsys, packed_asym, copy_of, change, rule):
    ck = copy_of(packed_asym)
    edit_config(ck, change)
    inspect_refuses(capsys, ck, rule)


# --- checkpoints that would load wrong ---------------------------------------------------------------------------


def test_asymmetric_relabelled_symmetric(capsys, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    edit_config(ck, lambda c: c["quantization_config"]["modules"][PREFIX]["scheme"].update(symmetric=True))
    inspect_refuses(capsys, ck, f"unexpected tensor {DOWN}.antiquant_offset", "relabelled")


def test_symmetric_relabelled_asymmetric(capsys, packed_sym, copy_of):
    ck = copy_of(packed_sym)
    edit_config(ck, lambda c: c["quantization_config"]["modules"][PREFIX]["scheme"].update(symmetric=False))
    inspect_refuses(capsys, ck, f"missing tensor {DOWN}.antiquant_offset")


def test_missing_non_expert_tensor(capsys, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    name = "model.layers.1.self_attn.q_proj.weight"
    edit_tensors(ck, lambda t: t.pop(name))
    inspect_refuses(capsys, ck, "missing tensors the model needs", name)


def test_unexpected_tensor_inside_an_experts_module(capsys, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    edit_tensors(ck, lambda t: t.update({f"{DOWN}.stowaway": torch.zeros(3)}))
    inspect_refuses(capsys, ck, f"unexpected tensor {DOWN}.stowaway")


def test_num_experts_against_the_router(capsys, packed_asym, copy_of):
    """config says 4 experts, tensors have 4 experts, but the router on disk is 8-way: refused before a forward."""
    ck = copy_of(packed_asym)

    def four(c):
        c["num_local_experts"] = 4
        for spec in c["quantization_config"]["modules"].values():
            spec["num_experts"] = 4
    edit_config(ck, four)
    edit_tensors(ck, lambda t: t.update({n: v[:4].contiguous() for n, v in t.items() if ".mlp.experts." in n}))
    inspect_refuses(capsys, ck, "model.layers.0.mlp.gate.weight: shape [8, 128], the model config makes it [4, 128]")


def test_quantization_config_expert_count_against_the_model(capsys, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    edit_config(ck, lambda c: c["quantization_config"]["modules"][PREFIX].update(num_experts=4))
    edit_tensors(ck, lambda t: t.update({n: v[:4].contiguous() for n, v in t.items() if n.startswith(PREFIX)}))
    inspect_refuses(capsys, ck, f"{PREFIX}: quantization_config says 4 experts, the model config builds 8")


def test_model_config_transformers_cannot_build(capsys, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    edit_config(ck, lambda c: c.update(model_type="no_such_model"))
    inspect_refuses(capsys, ck, "transformers cannot build model_type 'no_such_model'")


def test_from_pretrained_with_a_missing_offset_refuses(packed_asym, copy_of):
    """transformers alone would warn, initialise the offset randomly and give NaN logits: the quantizer refuses."""
    import transformers

    import gmmquant  # noqa: F401 - registers quant_method "gmmquant"

    ck = copy_of(packed_asym)
    edit_tensors(ck, lambda t: t.pop(f"{DOWN}.antiquant_offset"))
    with pytest.raises(FormatError, match=f"missing tensor {DOWN}.antiquant_offset"):
        transformers.AutoModelForCausalLM.from_pretrained(ck)


def test_a_clean_checkpoint_loads_and_runs(packed_asym):
    model = load_model(packed_asym)
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert bool(torch.isfinite(logits).all())


def test_config_with_transformers_encoded_floats_validates(capsys, tmp_path):
    """nemotron_h stores `time_step_limit: [0.0, {"__float__": "Infinity"}]`; validation reads config.json the
    way transformers does, so a clean checkpoint of it is not refused."""
    import transformers

    from gmmquant.pack import get_scheme
    from gmmquant.pack.stream import stream_pack

    config = transformers.NemotronHConfig(vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=16, hybrid_override_pattern="E*", n_routed_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=32, n_shared_experts=1, moe_shared_expert_intermediate_size=32,
                                          mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    assert "__float__" in (tmp_path / "src" / "config.json").read_text()
    stream_pack(tmp_path / "src", tmp_path / "ck", get_scheme("w8a16"))
    rc, out, err = cli(capsys, "inspect", tmp_path / "ck")
    assert rc == 0 and "validation: OK" in out, err
