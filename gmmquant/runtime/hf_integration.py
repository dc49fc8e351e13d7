"""transformers integration: `quant_method: "gmmquant"` for from_pretrained, and the "gmm" experts implementation.

`import gmmquant.runtime` registers both:
- a quantization config + quantizer, so `AutoModelForCausalLM.from_pretrained(checkpoint)` builds GMM experts
  modules on the meta device before the weights load and the quantized tensors land straight in them;
- `ALL_EXPERTS_FUNCTIONS["gmm"]`, so an unquantized model can run its experts through `grouped_matmul`
  with `experts_implementation="gmm"` (npu_grouped_matmul on NPU, the cpu backend elsewhere).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..pack.format import QUANT_METHOD, FormatError, parse_quantization_config
from ..pack.layouts import experts_module_info, module_dict_info
from ..pack.validate import validate_checkpoint
from .adapters import gmm_experts
from .experts import GMMExperts, GMMProjection, float_projections
from .replace import runs_on_cpu, strip_float_experts, trim_heap


PROJECTION_END = re.compile(r"(gate_up_proj|up_proj|down_proj|gate_proj)(_bias)?$")


@register_quantization_config(QUANT_METHOD)
class GMMQuantConfig(QuantizationConfigMixin):
    """The `quantization_config` of a gmmquant checkpoint (docs/FORMAT.md), validated on construction."""

    def __init__(self, format_version: int = 1, act_dtype: str = "bfloat16", modules: dict | None = None,
                 ignore: list | None = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.act_dtype = act_dtype
        self.modules = modules or {}
        self.ignore = ignore or []
        self.specs, _, self.torch_act_dtype = parse_quantization_config(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "act_dtype": self.act_dtype,
                "modules": self.modules, "ignore": self.ignore}


@register_quantizer(QUANT_METHOD)
class GMMHfQuantizer(HfQuantizer):
    """Swap each quantized experts module for an empty GMMExperts before the checkpoint's tensors load."""

    requires_calibration = True  # loads gmmquant checkpoints; quantizing is `gmmquant pack` / `calibrate`

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        files = kwargs.get("checkpoint_files") or []
        if files:  # the whole checkpoint against this model, before transformers fills in missing tensors
            with torch.device("cpu"):  # from_pretrained builds under a meta-device context
                validate_checkpoint(Path(files[0]).parent, model=model, missing_is_error=False)
        names = {name for name, _ in model.named_modules()}
        missing = sorted(p for p in self.quantization_config.specs if p not in names)
        if missing:
            raise FormatError(f"quantized modules {missing} do not exist in {type(model).__name__}")
        for prefix, spec in self.quantization_config.specs.items():
            source = model.get_submodule(prefix)
            info = experts_module_info(prefix, source) or module_dict_info(prefix, source)
            if info is None:
                raise FormatError(f"{prefix} is not a fused experts module of {type(model).__name__}")
            projections = {p: GMMProjection.empty(spec, p) for p in spec.projections}
            gmm = gmm_experts(source, info, projections, canonical_order=True)  # keeps the source's gate function
            strip_float_experts(source, info)
            model.set_submodule(prefix, gmm)
            if "." in prefix:  # the MoE block's _init_weights may reach into its experts (switch_transformers'
                # experts[f"expert_{i}"].wi): its own tensors come from the checkpoint, so it needs no init
                model.get_submodule(prefix.rsplit(".", 1)[0])._is_hf_initialized = True
        untie_quantized(model, list(self.quantization_config.specs))

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        for module in model.modules():
            if isinstance(module, GMMExperts) and runs_on_cpu(module, None):
                module.prepare()  # load-time repacking for the CPU kernels
                trim_heap()

    def update_weight_conversions(self, weight_conversions: list, model: nn.Module) -> list:
        """The model's converters for fused experts parameters (qwen3_vl_moe and diffusion_gemma transpose
        `mlp.experts.gate_up_proj` on load) are unanchored regexes, so they would also take the quantized
        tensors `...gate_up_proj.qweight` / `.antiquant_scale` for the float parameter. Anchor them at the
        end of the name: float experts (modules left out by `ignore`) still convert, quantized ones load as saved."""
        from transformers.core_model_loading import WeightConverter

        updated = []
        for conv in weight_conversions:
            sources = list(getattr(conv, "_original_source_patterns", None) or [])
            if isinstance(conv, WeightConverter) and sources and all(PROJECTION_END.search(s) for s in sources):
                conv = conv.copy([s if s.endswith("$") else s + "$" for s in sources],
                                 list(conv._original_target_patterns), operations=list(conv.operations))
            updated.append(conv)
        return super().update_weight_conversions(updated, model)

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        return False

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def untie_quantized(model: nn.Module, prefixes: list[str]) -> None:
    """Forget weight ties that involve replaced experts parameters (diffusion_gemma ties its encoder's experts
    to its decoder's): both GMM modules are in the checkpoint and load their own tensors."""
    for module in [model] + [m for m in model.modules() if m is not model]:
        tied = getattr(module, "all_tied_weights_keys", None)
        if not isinstance(tied, dict):
            continue
        base = next((n for n, m in model.named_modules() if m is module), "")
        full = (lambda k: f"{base}.{k}" if base else k)
        for target, source in list(tied.items()):
            if any(full(target).startswith(p + ".") or full(source).startswith(p + ".") for p in prefixes):
                del tied[target]


def gmm_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """The "gmm" experts implementation: this module's float weights through grouped_matmul."""
    info = experts_module_info("", self)
    key = tuple(id(getattr(self, p)) for p in info.projections)  # rebuilt if the parameters are replaced
    cached = self.__dict__.get("_gmm_experts")
    if cached is None or cached[0] != key:
        cached = (key, GMMExperts(self, info, float_projections(self, info, backend=None), canonical_order=False))
        self.__dict__["_gmm_experts"] = cached  # not a submodule: no new state_dict keys
    return cached[1](hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register("gmm", gmm_experts_forward)
