"""Write tests/fixtures/msmodelslim_qwen3_moe_{w4a8,w8a8_mix} with msModelSlim's own AscendV1 save code.

Run in a virtualenv with msModelSlim (it pins its own dependencies; torch_npu is not needed for saving):

    python -m venv /tmp/venv-msmodelslim
    /tmp/venv-msmodelslim/bin/pip install torch==2.13.0          # the CPU build first
    /tmp/venv-msmodelslim/bin/pip install msmodelslim==26.1.0 numpy transformers==5.24.0
    /tmp/venv-msmodelslim/bin/python tools/make_msmodelslim_fixture.py tests/fixtures

A 1-layer, 4-expert Qwen3-MoE with random weights; every expert Linear is quantized here (symmetric per-channel
round-to-nearest, int4 for W4A8 and int8 for W8A8_MIX with an input scale of 0.02) into msModelSlim's fake-quant
IR modules (`W4A8DynamicFakeQuantLinear`, `W8A8PDMixFakeQuantLinear`), whose tensors msModelSlim's
`AscendV1Saver.on_w4a8_dynamic` / `on_w8a8_pd_mix` turn into the files (packing, `scale_bias`, `deq_scale`,
`quant_bias` are msModelSlim's). Other tensors are stored as FLOAT, and the description gets the fields
`AscendV1Saver.post_run` writes. Only the saver's file writers are replaced (by a collector).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

E, H, I = 4, 64, 32
PREFIX = "model.layers.0.mlp.experts"


class Collector:
    """What AscendV1Saver's handlers call on `self`: write_tensor, update_quant_type and two fields."""

    def __init__(self, saver_cls):
        self.tensors, self.desc = {}, {}
        self.model_quant_type = "Unknown"
        self.QUANT_TYPE_PRIORITY = saver_cls.QUANT_TYPE_PRIORITY
        self._desc_transform = None
        self._global_torch_dtype_is_bf16 = True
        self._update = saver_cls.update_quant_type

    def write_tensor(self, name, desc, tensor):
        self.desc[name] = desc
        self.tensors[name] = tensor.detach().cpu().contiguous()

    def update_quant_type(self, quant_type):
        self._update(self, quant_type)


def ir_module(cls, **tensors):
    module = cls.__new__(cls)  # the IR constructors take calibration objects; the saver reads only these
    nn.Module.__init__(module)
    for name, t in tensors.items():
        setattr(module, name, None if t is None else nn.Parameter(t, requires_grad=False))
    return module


def main(out_root: str) -> None:
    import transformers
    from msmodelslim import ir as qir
    from msmodelslim.core.quant_service.modelslim_v1.save.ascendv1 import AscendV1Saver

    config = transformers.Qwen3MoeConfig(vocab_size=96, hidden_size=H, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=I,
                                         num_experts=E, num_experts_per_tok=2, head_dim=16, dtype="bfloat16")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    experts = model.model.layers[0].mlp.experts
    linears = {}
    for e in range(E):
        gate_up, down = experts.gate_up_proj[e].float(), experts.down_proj[e].float()
        linears[f"{PREFIX}.{e}.gate_proj"], linears[f"{PREFIX}.{e}.up_proj"] = gate_up[:I], gate_up[I:]
        linears[f"{PREFIX}.{e}.down_proj"] = down
    for kind in ("w4a8", "w8a8_mix"):
        saver = Collector(AscendV1Saver)
        for base, w in linears.items():
            qmax = 7 if kind == "w4a8" else 127
            scale = w.abs().amax(dim=1) / qmax
            q = torch.round(w / scale.unsqueeze(1)).clamp(-qmax - (kind == "w4a8"), qmax).to(torch.int8)
            if kind == "w4a8":
                module = ir_module(qir.W4A8DynamicFakeQuantLinear, weight=q, weight_scale=scale, bias=None)
                AscendV1Saver.on_w4a8_dynamic(saver, base, module)
            else:
                module = ir_module(qir.W8A8PDMixFakeQuantLinear, weight=q, weight_scale=scale, bias=None,
                                   input_scale=torch.tensor(0.02), input_offset=torch.tensor(0.0))
                AscendV1Saver.on_w8a8_pd_mix(saver, base, module)
        for name, t in model.state_dict().items():
            if ".experts." not in name:
                saver.write_tensor(name, "FLOAT", t)
        out = Path(out_root) / f"msmodelslim_qwen3_moe_{kind}"
        out.mkdir(parents=True, exist_ok=True)
        save_file(saver.tensors, str(out / "quant_model_weights.safetensors"), metadata={"format": "pt"})
        desc = dict(saver.desc, version="1.0.0", model_quant_type=saver.model_quant_type, metadata={}, group_size=0,
                    optional={})
        (out / "quant_model_description.json").write_text(json.dumps(desc, indent=2) + "\n")
        cfg = config.to_dict()
        cfg.pop("quantization_config", None)
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        print(f"{out}: {len(saver.tensors)} tensors, model_quant_type {saver.model_quant_type}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
