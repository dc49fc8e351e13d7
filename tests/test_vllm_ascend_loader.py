"""gmmquant's AscendV1 exports, loaded by vllm-ascend 0.23.0.post1's own code (tests/vllm_ascend_harness.py).

For each exportable scheme: vllm-ascend's quant config picks the MoE method, its `create_weights`, vLLM's
FusedMoE weight loader and `process_weights_after_loading` run on the exported tensors, every expert tensor
is consumed, and its expert MLP (`moe_mlp.quant_apply_mlp`, with `npu_grouped_matmul` routed to
`gmmquant.grouped_matmul`) gives the same output as gmmquant's runtime on the gmmquant checkpoint.

Needs the sources: `python tools/fetch_vllm_ascend.py` (skips otherwise).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

import vllm_ascend_harness as H
from gmmquant.interop import export_checkpoint
from gmmquant.pack import QuantizedWeight, get_scheme
from gmmquant.pack.checkpoint import load_quantized
from gmmquant.runtime import replace_experts, save_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not H.available(), reason=f"vllm-ascend / vLLM sources not under {H.peer_dir()} "
                                                          "(run tools/fetch_vllm_ascend.py)")

E, H_, I = 4, 64, 32
PREFIX = "model.layers.0.mlp.experts"
# scheme -> (preset, overrides, vllm-ascend MoE method, parameters its create_weights makes that no tensor fills)
EXPORTS = {
    "w8a8-dynamic": ("w8a8-dynamic", {}, "AscendW8A8DynamicFusedMoEMethod", []),
    # vllm-ascend's W4A16 MoE creates zero offsets and never loads them (why export refuses asymmetric W4A16)
    "w4a16-g32-sym": ("w4a16-g32", {"symmetric": True}, "AscendW4A16FusedMoEMethod", ["w13_weight_offset", "w2_weight_offset"]),
    # msModelSlim's "1.0.0" layouts: per channel (group_size 0) and two-level per group
    "w4a8-dynamic": ("w4a8-dynamic", {}, "AscendW4A8DynamicFusedMoEMethod", []),
    "w4a8-dynamic-g32": ("w4a8-dynamic-g32", {}, "AscendW4A8DynamicFusedMoEMethod", []),
    # W8A8 static as W8A8_MIX: vllm-ascend's MoE method for it is W8A8_DYNAMIC's with deq_scale / input_offset
    # parameters added; it quantizes activations per token (compared below with gmmquant's w8a8-dynamic)
    "w8a8-static": ("w8a8-static", {}, "AscendW8A8PDMixFusedMoeMethod", []),
}
# checkpoint tensors per expert Linear that vLLM's loop skips (no parameter takes them)
SKIPPED = {"w8a8-static": ("input_scale", "quant_bias")}


@pytest.fixture(scope="module")
def float_model():
    config = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=H_, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=I,
                                         num_experts=E, num_experts_per_tok=2, head_dim=16)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def exported(float_model, tmp_path_factory):
    """scheme -> (gmmquant checkpoint dir, AscendV1 export dir)."""
    cache = {}

    def get(name):
        if name not in cache:
            preset, overrides = EXPORTS[name][:2]
            model = copy.deepcopy(float_model)
            replace_experts(model, get_scheme(preset, **overrides), prepare=preset != "w8a8-static")
            if preset == "w8a8-static":  # calibrated per-expert input scales
                for module in model.modules():
                    if getattr(module, "qweight", None) is not None:
                        module.register_buffer("input_scale", torch.rand(E, generator=torch.Generator().manual_seed(1)) / 20 + 0.01)
            root = tmp_path_factory.mktemp(name)
            save_model(model, root / "gmmquant")
            export_checkpoint(root / "gmmquant", root / "ascend", "ascend")
            cache[name] = root / "gmmquant", root / "ascend"
        return cache[name]

    return get


def routed_rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by expert with one empty expert: `[S, H]` bf16 and counts `[E]` int64."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([5, 0, 7, 3], dtype=torch.int64)
    return torch.randn(int(counts.sum()), H_, generator=g).to(torch.bfloat16), counts


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_vllm_ascend_loads_export_and_matches_runtime(exported, name):
    ck_dir, ascend_dir = exported(name)
    method, unfilled_expected = EXPORTS[name][2:]
    _, _, tensors = H.read_dir(ascend_dir)
    expert_tensors = {n for n in tensors if n.startswith(PREFIX + ".")}
    x, counts = routed_rows()
    projections = load_quantized(ck_dir).projections(PREFIX)
    if name == "w8a8-static":  # what vllm-ascend runs: the same int8 weights with per-token activations
        projections = {p: QuantizedWeight(qw.qweight, qw.scale, None, get_scheme("w8a8-dynamic")) for p, qw in projections.items()}
    with H.sandbox("reference") as sb:
        loaded = H.load_experts(sb, ascend_dir, PREFIX, num_experts=E, hidden_size=H_, intermediate_size=I)
        layer = loaded.layer
        assert type(layer.quant_method.quant_method).__name__ == method
        # every expert tensor is loaded or skipped by vLLM's own rule, none is left over
        assert loaded.consumed | loaded.skipped == expert_tensors
        assert {n.rsplit(".", 1)[1] for n in loaded.skipped} == set(SKIPPED.get(name, ()))
        assert loaded.unfilled == [f"model.layers.0.mlp.experts.{n}" for n in unfilled_expected]
        out = H.expert_mlp(sb, layer, x, counts)
        gmm_calls = [c for c in sb.npu.calls if c[0] == "npu_grouped_matmul"]
    ref = H.gmmquant_mlp(projections, x, counts, torch.bfloat16, "reference")
    assert len(gmm_calls) == 2 and out.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(out, ref), f"max |diff| {float((out.float() - ref.float()).abs().max())}"
    # gmmquant's default CPU backend (fast paths) agrees with the reference formulas to one bf16 ulp of the largest output
    fast = H.gmmquant_mlp(projections, x, counts, torch.bfloat16, "cpu")
    assert float((fast.float() - ref.float()).abs().max()) <= 2 ** -7 * float(ref.float().abs().max())


def test_vllm_ascend_refuses_w8a16_moe(exported, tmp_path):
    """vllm-ascend registers W8A16 for linear layers only: its quant config raises on an MoE layer. This is the
    rule behind `export --to ascend` refusing w8a16 (the same tensors typed W8A16 instead of W8A8_DYNAMIC)."""
    _, ascend_dir = exported("w8a8-dynamic")
    w8a16 = tmp_path / "w8a16"
    shutil.copytree(ascend_dir, w8a16)
    desc_file = w8a16 / "quant_model_description.json"
    desc = {k: ("W8A16" if v == "W8A8_DYNAMIC" else v) for k, v in json.loads(desc_file.read_text()).items()}
    desc_file.write_text(json.dumps(desc))
    with H.sandbox() as sb, pytest.raises(NotImplementedError, match="quant_type=W8A16 for layer_type=moe"):
        H.load_experts(sb, w8a16, PREFIX, num_experts=E, hidden_size=H_, intermediate_size=I)


def test_sandbox_leaves_no_stand_ins_behind():
    import sys

    with H.sandbox():
        assert "torch_npu" in sys.modules and hasattr(torch, "npu")
    assert "torch_npu" not in sys.modules and not hasattr(torch.Tensor, "npu")
    assert not any(n.split(".")[0] in ("vllm", "vllm_ascend") for n in sys.modules)


@pytest.mark.parametrize("kind,method", [("w4a8", "AscendW4A8DynamicFusedMoEMethod"), ("w8a8_mix", "AscendW8A8PDMixFusedMoeMethod")])
def test_vllm_ascend_and_gmmquant_agree_on_msmodelslim_checkpoints(kind, method):
    """Checkpoints written by msModelSlim's own saver (tests/fixtures, tools/make_msmodelslim_fixture.py): vllm-ascend
    loads them and gmmquant's importer reads them into the same expert computation. W4A8 per-channel scales from
    msModelSlim are raw float32; gmmquant encodes them with trans_quant_param (FP19, as the NPU keeps them) while
    this stand-in decodes vllm-ascend's raw encoding exactly, hence one bf16 ulp of tolerance there."""
    from pathlib import Path

    from gmmquant.interop import read_checkpoint

    path = Path(__file__).parent / "fixtures" / f"msmodelslim_qwen3_moe_{kind}"
    x, counts = routed_rows(1)
    projections = read_checkpoint(path).quantized[PREFIX]
    with H.sandbox("reference") as sb:
        loaded = H.load_experts(sb, path, PREFIX, num_experts=E, hidden_size=H_, intermediate_size=I)
        assert type(loaded.layer.quant_method.quant_method).__name__ == method
        assert not loaded.unfilled
        out = H.expert_mlp(sb, loaded.layer, x, counts)
    ref = H.gmmquant_mlp(projections, x, counts, torch.bfloat16, "reference")
    if kind == "w8a8_mix":
        assert torch.equal(out, ref)
    else:
        # measured: 40% of elements one bf16 ulp apart, none more (2**-7 of the largest output bounds that)
        assert float((out.float() - ref.float()).abs().max()) <= 2 ** -7 * float(ref.float().abs().max())
