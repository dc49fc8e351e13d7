"""The npu backend, proven with a fake torch_npu that records calls (no Ascend toolkit here)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types

import pytest
import torch

from gmmquant.kernels import dynamic_quant, grouped_matmul, pack_int4, select_backend, trans_quant_param


class FakeNpuDevice:
    type = "npu"
    index = 0

    def __eq__(self, other):
        return getattr(other, "type", None) == "npu"

    def __hash__(self):
        return hash("npu")

    def __repr__(self):
        return "npu:0"


class NpuTensor(torch.Tensor):
    """A CPU tensor that reports an NPU device; reading its values on the host is an error."""

    @property
    def device(self):
        return FakeNpuDevice()

    def tolist(self):
        raise AssertionError("a device group_list must not be read on the host")


def on_npu(t: torch.Tensor) -> torch.Tensor:
    return torch.Tensor._make_subclass(NpuTensor, t)


@pytest.fixture
def fake_torch_npu(monkeypatch):
    calls = []
    module = types.ModuleType("torch_npu")

    def recorder(name, result):
        def op(*args, **kwargs):
            calls.append((name, args, kwargs))
            return result
        return op

    module.npu_grouped_matmul = recorder("npu_grouped_matmul", ["npu-result"])
    module.npu_dynamic_quant = recorder("npu_dynamic_quant", ("y", "scale"))
    module.npu_trans_quant_param = recorder("npu_trans_quant_param", "encoded")
    module.npu_convert_weight_to_int4pack = recorder("npu_convert_weight_to_int4pack", "packed")
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    return calls


def vllm_ascend_w8a8_call(m=6, k=32, n=16, e=4):
    """The arguments vllm-ascend passes for a W8A8-dynamic MoE gate_up projection."""
    return dict(
        x=[on_npu(torch.randint(-5, 5, (m, k), dtype=torch.int8))],
        weight=[on_npu(torch.randint(-5, 5, (e, k, n), dtype=torch.int8))],
        scale=[on_npu(torch.rand(e, n).to(torch.bfloat16))],
        per_token_scale=[on_npu(torch.rand(m))],
        group_list=on_npu(torch.tensor([2, 0, 3, 1], dtype=torch.int64)),
        split_item=2, group_type=0, group_list_type=1, output_dtype=torch.bfloat16,
    )


def test_npu_device_selects_npu_backend():
    assert select_backend([on_npu(torch.zeros(1, 1))]) == "npu"


def test_every_argument_passes_through_unchanged(fake_torch_npu):
    kwargs = vllm_ascend_w8a8_call()
    out = grouped_matmul(**kwargs)
    assert out == ["npu-result"]
    ((name, args, got),) = fake_torch_npu
    assert name == "npu_grouped_matmul"
    assert args[0] is kwargs["x"] and args[1] is kwargs["weight"]
    for key in ("scale", "per_token_scale", "group_list"):
        assert got[key] is kwargs[key], key
    assert got["split_item"] == 2 and got["group_type"] == 0 and got["group_list_type"] == 1
    assert got["output_dtype"] is torch.bfloat16 and got["act_type"] == 0
    for key in ("bias", "offset", "antiquant_scale", "antiquant_offset", "activation_input",
                "activation_quant_scale", "activation_quant_offset", "tuning_config"):
        assert got[key] is None, key
    assert "backend" not in got


def test_weight_only_int4_call_passes_through(fake_torch_npu):
    e, k, n = 4, 64, 16
    q = torch.randint(-8, 8, (e, k, n), dtype=torch.int8)
    kwargs = dict(
        x=[on_npu(torch.randn(6, k).to(torch.bfloat16))], weight=[on_npu(pack_int4(q))],
        antiquant_scale=[on_npu(torch.rand(e, 2, n).to(torch.bfloat16))],
        antiquant_offset=[on_npu(torch.rand(e, 2, n).to(torch.bfloat16))],
        group_list=on_npu(torch.tensor([2, 2, 5, 6], dtype=torch.int64)), split_item=3, group_type=0, group_list_type=0,
    )
    grouped_matmul(**kwargs)
    (_, args, got), = fake_torch_npu
    assert args[1][0] is kwargs["weight"][0]
    assert got["antiquant_scale"] is kwargs["antiquant_scale"] and got["antiquant_offset"] is kwargs["antiquant_offset"]
    assert got["split_item"] == 3 and got["group_list_type"] == 0


def test_contract_still_checked_before_the_npu(fake_torch_npu):
    from gmmquant.kernels import GMMContractError

    kwargs = vllm_ascend_w8a8_call()
    kwargs["output_dtype"] = torch.float16  # a bf16 scale requires bf16 output
    with pytest.raises(GMMContractError, match=r"\[output_dtype.table\]"):
        grouped_matmul(**kwargs)
    assert fake_torch_npu == []


def test_companion_ops_delegate(fake_torch_npu):
    x = on_npu(torch.randn(4, 16).to(torch.float16))
    assert dynamic_quant(x) == ("y", "scale")
    assert trans_quant_param(on_npu(torch.rand(8))) == "encoded"
    assert pack_int4(on_npu(torch.randint(-8, 8, (4, 16), dtype=torch.int8))) == "packed"
    names = [c[0] for c in fake_torch_npu]
    assert names == ["npu_dynamic_quant", "npu_trans_quant_param", "npu_convert_weight_to_int4pack"]


def test_importing_gmmquant_never_imports_torch_npu():
    # torch_npu is not installed here, so any attempt by gmmquant to import it would fail this script.
    script = textwrap.dedent(
        """
        import sys, torch
        import gmmquant, gmmquant.kernels, gmmquant.cli, gmmquant.runtime
        from gmmquant.kernels import grouped_matmul, dynamic_quant, pack_int4, trans_quant_param
        x = torch.randn(3, 32).to(torch.bfloat16)
        w = torch.randn(2, 32, 16).to(torch.bfloat16)
        grouped_matmul([x], [w], group_list=torch.tensor([1, 2]), group_list_type=1, group_type=0, split_item=2)
        dynamic_quant(x); pack_int4(torch.zeros(8, dtype=torch.int8)); trans_quant_param(torch.ones(4))
        assert "torch_npu" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_torch_npu_is_only_imported_inside_functions():
    """Static check: no module of gmmquant imports torch_npu at import time."""
    import ast
    from pathlib import Path

    import gmmquant

    offenders = []
    for path in Path(gmmquant.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only; imports inside functions are lazy by construction
            for sub in ast.walk(node):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    break
                if isinstance(node, ast.ClassDef):
                    break
                names = [a.name for a in sub.names] if isinstance(sub, (ast.Import, ast.ImportFrom)) else []
                module = getattr(sub, "module", None) or ""
                if "torch_npu" in names or module.startswith("torch_npu"):
                    offenders.append(f"{path}:{sub.lineno}")
    assert offenders == []
