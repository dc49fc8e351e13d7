"""Save a replaced (quantized) model as a gmmquant checkpoint, and load one for inference.

`load_model` builds the model skeleton with accelerate's `init_empty_weights` (parameters on the meta
device, buffers such as rotary tables real), puts the checkpoint's quantized expert tensors straight into
GMM experts modules, and assigns the other tensors: the float experts are never materialised, so peak
memory is close to the quantized size.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn

from ..pack.checkpoint import SaveReport, load_quantized, save_quantized
from ..pack.format import ExpertsSpec, FormatError
from ..pack.layouts import disk_naming
from .experts import GMMExperts
from .replace import replace_experts


def _experts_specs(model: nn.Module) -> tuple[dict[str, ExpertsSpec], torch.dtype]:
    specs, act = {}, None
    for path, module in model.named_modules():
        if not isinstance(module, GMMExperts):
            continue
        projs = {name: m for name, m in module.named_children() if name in module.info.projections}
        first = next(iter(projs.values()))
        if first.scheme is None:
            raise ValueError(f"{path} runs float weights; only quantized experts can be saved as a gmmquant checkpoint")
        extra = {name: [b for b in ("input_scale", "smooth_scale") if getattr(m, b) is not None] for name, m in projs.items()}
        specs[path] = ExpertsSpec(path, first.scheme, module.num_experts, dict(module.info.projections), first.act_dtype,
                                  has_bias=first.bias is not None, extra={k: v for k, v in extra.items() if v})
        act = first.act_dtype
    if not specs:
        raise ValueError("the model has no GMM experts modules: call replace_experts(model, scheme) first")
    return specs, act


def save_model(model: nn.Module, out_dir: "str | os.PathLike", *, source_dir: "Optional[str | os.PathLike]" = None,
               max_shard_size: "int | str" = "2GB", overwrite: bool = False) -> SaveReport:
    """Write a model whose experts were replaced with a quantization scheme as a gmmquant checkpoint.

    Args:
        model: a transformers model after `replace_experts(model, scheme)`.
        out_dir: checkpoint directory (written atomically).
        source_dir: copy tokenizer / generation files from this model directory.
    """
    specs, act = _experts_specs(model)
    config = model.config.to_dict()
    return save_quantized(out_dir, config=config, specs=specs, tensors=model.state_dict().items(), act_dtype=act,
                          source_dir=source_dir, max_shard_size=max_shard_size, overwrite=overwrite)


def load_model(path: "str | os.PathLike", *, device: "str | torch.device" = "cpu", backend: Optional[str] = None,
               dtype: Optional[torch.dtype] = None, **config_kwargs: Any) -> nn.Module:
    """Load a gmmquant checkpoint as a transformers model whose experts run on grouped-matmul kernels.

    Args:
        path: checkpoint directory (from `gmmquant pack`, `save_model` or `gmmquant calibrate`).
        device: where to put the model.
        backend: grouped_matmul backend for the experts (default: by device).
        dtype: dtype of the non-expert weights (default: as stored).

    Returns:
        The model in eval mode; `generate()` works as usual.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    ck = load_quantized(path)
    config = AutoConfig.from_pretrained(path, **config_kwargs)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype else {}))
    quantized = {prefix: ck.projections(prefix, device) for prefix in ck.specs}
    missing_modules = sorted(set(quantized) - {p for p, _ in model.named_modules()})
    if missing_modules:
        raise FormatError(f"{path}: quantized modules {missing_modules} do not exist in {type(model).__name__}")
    replace_experts(model, backend=backend, act_dtype=ck.act_dtype, quantized=quantized)
    for prefix, spec in ck.specs.items():  # biases, static input scales, smooth scales
        experts = model.get_submodule(prefix)
        for proj in spec.projections:
            for name in ("bias", "input_scale", "smooth_scale"):
                full = f"{prefix}.{proj}.{name}"
                if full in ck.weight_map:
                    getattr(experts, proj).register_buffer(name, ck.tensor(full, device))

    naming = disk_naming(config.model_type)
    expert_names = {n for spec in ck.specs.values() for n in spec.expected_tensors()}
    state = {}
    for name, tensor in ck.iter_tensors(device):
        if name not in expert_names:
            state[naming.rename(name)] = tensor.to(dtype) if dtype and tensor.is_floating_point() else tensor
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise FormatError(f"{path}: tensors {sorted(result.unexpected_keys)[:10]} do not belong to {type(model).__name__}")
    model.tie_weights()
    still_meta = sorted(n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta")
    if still_meta:
        raise FormatError(f"{path}: no tensor for {still_meta[:10]}{' ...' if len(still_meta) > 10 else ''}")
    return model.to(device).eval()


__all__ = ["load_model", "save_model"]
