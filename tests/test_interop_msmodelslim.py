"""Import of msModelSlim's own AscendV1 layouts: W4A8_DYNAMIC (per channel, two-level per group, old unpacked),
W4A16 (two int4 per byte), W8A8_MIX, and anti-outlier norm biases.

The fixtures are written by `write_msmodelslim` below from msModelSlim's documented save layout (read from its
source at 3de0a3c: `core/quant_service/modelslim_v1/save/ascendv1.py` `on_w4a8_dynamic` / `on_w8a8_pd_mix`,
`save/utils/pack.py` `w4a8_pack_int4` / `process_scale`, and `pytorch/llm_ptq/.../save/complex_quantifier.py` for
the two-level W4A8 and packed W4A16 forms), not by running msModelSlim itself, which needs torch_npu.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gmmquant.interop import read_checkpoint
from gmmquant.kernels import unpack_int4
from gmmquant.pack.format import FormatError
from gmmquant.runtime import load_model

transformers = pytest.importorskip("transformers")

E, H, I, G = 4, 64, 32, 32
PREFIX = "model.layers.0.mlp.experts"


def pack_pairs(q: torch.Tensor, dim: int) -> torch.Tensor:
    """Two int4 codes per int8 along `dim`, first code in the low nibble (msModelSlim's _pack_int4)."""
    q = q.to(torch.int16) & 0xF
    low, high = (q[0::2], q[1::2]) if dim == 0 else (q[:, 0::2], q[:, 1::2])
    return (low | (high << 4)).to(torch.uint8).view(torch.int8)


def float_model(seed: int = 0):
    config = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=H, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=I,
                                         num_experts=E, num_experts_per_tok=2, head_dim=16)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()


def expert_linears(model) -> dict[str, torch.Tensor]:
    """msModelSlim's per-expert Linear names -> float32 weight [N, K]."""
    experts = model.model.layers[0].mlp.experts
    out = {}
    for e in range(E):
        gate_up, down = experts.gate_up_proj[e].float(), experts.down_proj[e].float()
        out[f"{PREFIX}.{e}.gate_proj"], out[f"{PREFIX}.{e}.up_proj"] = gate_up[:I], gate_up[I:]
        out[f"{PREFIX}.{e}.down_proj"] = down
    return out


def quantize_linear(w: torch.Tensor, kind: str) -> tuple[dict[str, torch.Tensor], tuple]:
    """(msModelSlim tensors without the base prefix, (codes [N, K], the scale a kernel multiplies by [N, G],
    zero point [N, G] or None))."""
    n, k = w.shape
    if kind in ("w4a8-pc", "w4a8-old"):
        s = w.abs().amax(dim=1, keepdim=True) / 7
        q = torch.round(w / s).clamp(-8, 7).to(torch.int8)
        t = {"weight": pack_pairs(q, 0) if kind == "w4a8-pc" else q, "weight_scale": s, "weight_offset": torch.zeros(n, 1)}
        if kind == "w4a8-pc":  # process_scale with 16 TP slices for down_proj
            contrib = q.float() * s
            t["scale_bias"] = 8 * (contrib.reshape(n, 16, k // 16).sum(2) if n == H and k == I else contrib.sum(1, keepdim=True))
        return t, (q, s, None)
    if kind == "w4a8-pg":  # two levels: float -> int8 per channel (s1), int8 -> int4 per group (s2)
        s1 = w.abs().amax(dim=1, keepdim=True) / 127
        w8 = torch.round(w / s1).clamp(-127, 127)
        s2 = w8.reshape(n, k // G, G).abs().amax(dim=2) / 7
        q = torch.round(w8.reshape(n, k // G, G) / s2.unsqueeze(-1)).clamp(-8, 7).reshape(n, k).to(torch.int8)
        combined = (s1 * s2).to(torch.float16).float()  # what vllm-ascend's process_scale feeds the kernel
        t = {"weight": pack_pairs(q, 0), "weight_scale": s1, "weight_offset": torch.zeros(n, 1),
             "weight_scale_second": s2, "weight_offset_second": torch.zeros(n, k // G, dtype=torch.int64),
             "scale_bias": torch.zeros(n, 16 if n == H and k == I else 1)}
        return t, (q, combined, None)
    if kind == "w4a16-pg":  # asymmetric per group, packed along N
        g = w.reshape(n, k // G, G)
        lo, hi = g.amin(2).clamp(max=0), g.amax(2).clamp(min=0)
        s = (hi - lo) / 15
        zp = torch.round(-8 - lo / s).clamp(-8, 7)
        q = (torch.round(g / s.unsqueeze(-1)) + zp.unsqueeze(-1)).clamp(-8, 7).reshape(n, k).to(torch.int8)
        return {"weight": pack_pairs(q, 0), "weight_scale": s, "weight_offset": zp}, (q, s, zp)
    if kind == "w4a16-pc":  # symmetric per channel, packed along K
        s = w.abs().amax(dim=1, keepdim=True) / 7
        q = torch.round(w / s).clamp(-8, 7).to(torch.int8)
        return {"weight": pack_pairs(q, 1), "weight_scale": s, "weight_offset": torch.zeros(n, 1)}, (q, s, None)
    if kind == "w8a8-mix":
        s = w.abs().amax(dim=1, keepdim=True) / 127
        q = torch.round(w / s).clamp(-127, 127).to(torch.int8)
        return {"weight": q, "weight_scale": s, "weight_offset": torch.zeros(n, 1), "input_scale": torch.tensor([0.02]),
                "input_offset": torch.zeros(1), "quant_bias": torch.zeros(n, dtype=torch.int32),
                "deq_scale": 0.02 * s[:, 0]}, (q, s, None)
    raise ValueError(kind)


QTYPE = {"w4a8-pc": "W4A8_DYNAMIC", "w4a8-pg": "W4A8_DYNAMIC", "w4a8-old": "W4A8_DYNAMIC", "w4a16-pg": "W4A16",
         "w4a16-pc": "W4A16", "w8a8-mix": "W8A8_MIX"}


def write_msmodelslim(path: Path, model, kind: str, *, version: str = "1.0.0", norm_bias: bool = False) -> dict[str, torch.Tensor]:
    """An AscendV1 directory in msModelSlim's layout; returns base -> (codes, kernel scale, zero point)."""
    path.mkdir(parents=True)
    tensors, desc, want = {}, {}, {}
    for base, w in expert_linears(model).items():
        t, deq = quantize_linear(w, kind)
        want[base] = deq
        for suffix, v in t.items():
            tensors[f"{base}.{suffix}"] = v.contiguous()
            desc[f"{base}.{suffix}"] = QTYPE[kind]
    for name, p in model.state_dict().items():
        if ".experts." not in name:
            tensors[name] = p.contiguous()
            desc[name] = "FLOAT"
    if norm_bias:
        tensors["model.layers.0.post_attention_layernorm.bias"] = torch.linspace(-0.1, 0.1, H).to(torch.bfloat16)
        desc["model.layers.0.post_attention_layernorm.bias"] = "FLOAT"
    desc.update({"model_quant_type": QTYPE[kind], "version": version, "group_size": G if kind.endswith("pg") else 0})
    save_file(tensors, path / "quant_model_weights.safetensors", metadata={"format": "pt"})
    (path / "quant_model_description.json").write_text(json.dumps(desc))
    config = model.config.to_dict()
    config["quantize"] = QTYPE[kind].lower()
    (path / "config.json").write_text(json.dumps(config))
    return want


@pytest.mark.parametrize("kind,scheme", [("w4a8-pc", "w4a8-dynamic"), ("w4a8-pg", "w4a8-dynamic-g32"),
                                         ("w4a8-old", "w4a8-dynamic"), ("w4a16-pg", "w4a16-g32"),
                                         ("w4a16-pc", "w4a16-sym"), ("w8a8-mix", "w8a8-dynamic")])
def test_msmodelslim_layouts_import_exactly(tmp_path, kind, scheme):
    model = float_model()
    want = write_msmodelslim(tmp_path / kind, model, kind, version="0" if kind == "w4a8-old" else "1.0.0")
    ck = read_checkpoint(tmp_path / kind)
    spec = ck.specs[PREFIX]
    assert spec.scheme.name == scheme
    for proj, qw in ck.quantized[PREFIX].items():
        names = ["gate_proj", "up_proj"] if proj == "gate_up_proj" else ["down_proj"]
        codes = unpack_int4(qw.qweight) if qw.qweight.dtype == torch.int32 else qw.qweight  # [E, K, N]
        scale = qw.scale if qw.scale.dim() == 3 else qw.scale.unsqueeze(1)  # [E, G, N]
        for e in range(E):
            q, s, zp = (torch.cat([want[f"{PREFIX}.{e}.{n}"][i] for n in names]) if want[f"{PREFIX}.{e}.{names[0]}"][i] is not None
                        else None for i in range(3))
            assert torch.equal(codes[e], q.t()), (proj, e)  # codes moved, never re-rounded
            assert torch.equal(scale[e], s.t().to(qw.scale.dtype)), (proj, e)  # in the dtype the kernel takes
            if zp is None:
                assert qw.offset is None
            else:  # antiquant_offset = -zero_point
                offset = qw.offset if qw.offset.dim() == 3 else qw.offset.unsqueeze(1)
                assert torch.equal(offset[e], (-zp).t().to(qw.offset.dtype)), (proj, e)
    loaded = load_model(tmp_path / kind)
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.arange(12).reshape(1, 12)).logits).all()


def test_two_int4_per_byte_without_the_new_layout_is_named(tmp_path):
    """Per-channel W4A16 packs along K in msModelSlim's "1.0.0" layout; under another version the bytes are read
    one code each, and the error says what happened instead of 'codes outside the signed 4-bit range'."""
    write_msmodelslim(tmp_path / "m", float_model(), "w4a16-pc", version="0")
    with pytest.raises(FormatError, match="not one int4 code per byte; msModelSlim's \"1.0.0\" layout packs two per byte"):
        read_checkpoint(tmp_path / "m")


def test_asymmetric_w4a8_is_refused(tmp_path):
    path = tmp_path / "m"
    write_msmodelslim(path, float_model(), "w4a8-pc")
    from safetensors.torch import load_file

    tensors = load_file(path / "quant_model_weights.safetensors")
    tensors[f"{PREFIX}.1.up_proj.weight_offset"] += 1
    save_file(tensors, path / "quant_model_weights.safetensors", metadata={"format": "pt"})
    with pytest.raises(FormatError, match="W4A8_DYNAMIC weights must be symmetric"):
        read_checkpoint(path)


def test_anti_outlier_norm_bias(tmp_path):
    """msModelSlim's anti-outlier step leaves `<norm>.bias`; the norm then adds it, as vllm-ascend's does."""
    model = float_model()
    write_msmodelslim(tmp_path / "m", model, "w8a8-mix", norm_bias=True)
    loaded = load_model(tmp_path / "m")
    norm = loaded.model.layers[0].post_attention_layernorm
    x = torch.randn(3, H).to(torch.bfloat16)
    with torch.no_grad():
        plain = model.model.layers[0].post_attention_layernorm(x)
        assert torch.equal(norm(x), plain + torch.linspace(-0.1, 0.1, H).to(torch.bfloat16))


FIXTURES = Path(__file__).parent / "fixtures"


def test_msmodelslim_written_w4a8_round_trips_byte_for_byte(tmp_path):
    """The W4A8_DYNAMIC fixture was written by msModelSlim's own saver (tools/make_msmodelslim_fixture.py):
    imported into gmmquant and exported again, every expert tensor comes back as msModelSlim wrote it."""
    from safetensors.torch import load_file

    from gmmquant.interop import export_checkpoint
    from gmmquant.runtime import save_model

    src = FIXTURES / "msmodelslim_qwen3_moe_w4a8"
    model = load_model(src)
    assert model.model.layers[0].mlp.experts.gate_up_proj.scheme.name == "w4a8-dynamic"
    save_model(model, tmp_path / "gmmquant", source_dir=src)
    export_checkpoint(tmp_path / "gmmquant", tmp_path / "ascend", "ascend")
    theirs = load_file(src / "quant_model_weights.safetensors")
    ours = {}
    for file in (tmp_path / "ascend").glob("*.safetensors"):
        ours.update(load_file(file))
    expert_names = sorted(n for n in theirs if ".experts." in n)
    assert expert_names == sorted(n for n in ours if ".experts." in n)
    for name in expert_names:
        if name.endswith("scale_bias"):  # 8 * sum(q * scale): the same sums, summed in the same order
            assert torch.allclose(ours[name], theirs[name], rtol=1e-6, atol=0), name
        else:
            assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name


def test_msmodelslim_written_w8a8_mix_imports_as_dynamic():
    """msModelSlim's W8A8_MIX experts load as w8a8-dynamic (as vllm-ascend runs them): same int8 codes, the
    float32 weight_scale rounded to the bf16 kernel scale, and its static parameters consistent."""
    from safetensors.torch import load_file

    src = FIXTURES / "msmodelslim_qwen3_moe_w8a8_mix"
    theirs = load_file(src / "quant_model_weights.safetensors")
    ck = read_checkpoint(src)
    qw = ck.quantized[PREFIX]["down_proj"]
    assert qw.scheme.name == "w8a8-dynamic" and qw.scale.dtype == torch.bfloat16
    for e in range(E):
        base = f"{PREFIX}.{e}.down_proj"
        assert torch.equal(qw.qweight[e], theirs[f"{base}.weight"].t())
        assert torch.equal(qw.scale[e], theirs[f"{base}.weight_scale"][:, 0].to(torch.bfloat16))
        assert torch.equal(theirs[f"{base}.deq_scale"], theirs[f"{base}.input_scale"] * theirs[f"{base}.weight_scale"][:, 0])
    with torch.no_grad():
        assert torch.isfinite(load_model(src)(torch.arange(8).reshape(1, 8)).logits).all()
