"""Hostile AscendV1 and compressed-tensors inputs: `load_model` (what `gmmquant eval` runs) refuses broken ones
with a clear FormatError, never a raw error or NaN outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hostile_util import PREFIX, assert_clear_error, edit_tensors
from gmmquant import FormatError, load_model
from gmmquant.interop import export_checkpoint

EXPERT0 = PREFIX.replace("experts", "experts.0")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, packed_exportable) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {to: export_checkpoint(packed_exportable, root / to, to) for to in ("ascend", "compressed-tensors")}


@pytest.fixture
def broken(tmp_path, exports):
    def make(to: str) -> Path:
        return Path(shutil.copytree(exports[to], tmp_path / to))
    return make


@pytest.mark.parametrize("to", ["ascend", "compressed-tensors"])
def test_clean_exports_load(exports, to):
    model = load_model(exports[to])
    assert bool(torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all())


@pytest.mark.parametrize("to", ["ascend", "compressed-tensors"])
@pytest.mark.parametrize("value,rule", [(float("nan"), "NaN or inf"), (0.0, "zero or negative"), (-1.0, "zero or negative")])
def test_bad_scales(broken, to, value, rule):
    ck = broken(to)
    name = f"{EXPERT0}.down_proj.weight_scale"

    def poison(t):
        bad = t[name].clone()
        bad.view(-1)[0] = value
        t[name] = bad
    edit_tensors(ck, poison)
    with pytest.raises(FormatError, match=rule):
        load_model(ck)


@pytest.mark.parametrize("to", ["ascend", "compressed-tensors"])
def test_truncated(broken, to):
    ck = broken(to)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(FormatError, match="corrupt or truncated"):
        load_model(ck)


@pytest.mark.parametrize("to", ["ascend", "compressed-tensors"])
def test_index_escaping(broken, to):
    ck = broken(to)
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "../../model.safetensors"}}))
    with pytest.raises(FormatError, match="outside"):
        load_model(ck)


@pytest.mark.parametrize("content,rule", [("{oops", "invalid JSON"), ("[1]", "must hold a JSON object")])
def test_ascend_description_garbage(broken, content, rule):
    ck = broken("ascend")
    (ck / "quant_model_description.json").write_text(content)
    with pytest.raises(FormatError, match=rule):
        load_model(ck)


def test_ascend_missing_expert_tensor(broken):
    ck = broken("ascend")
    edit_tensors(ck, lambda t: t.pop(next(k for k in sorted(t) if k.startswith(f"{EXPERT0}.up_proj.weight"))))
    with pytest.raises(FormatError, match=r"missing|\(expert, part\)"):
        load_model(ck)


def test_compressed_tensors_unknown_scheme(broken):
    ck = broken("compressed-tensors")
    config = json.loads((ck / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["weights"]["num_bits"] = 3
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError):
        load_model(ck)


def test_eval_of_a_broken_export_is_one_line(capsys, broken):
    ck = broken("compressed-tensors")
    (ck / "config.json").write_text("[1, 2, 3]")
    assert_clear_error(capsys, ["eval", ck, "--max-windows", "1", "--seq-len", "16"], "config.json", "must hold a JSON object")
