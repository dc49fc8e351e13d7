"""Save a replaced (quantized) model as a gmmquant checkpoint, and load one for inference.

`load_model` validates the checkpoint, then loads it through transformers with gmmquant's quantizer
(hf_integration.py): the float experts are never materialised, so peak memory is close to the quantized
size.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn

from ..pack.checkpoint import SaveReport, load_quantized, save_quantized
from ..pack.format import ExpertsSpec
from ..pack.model_class import auto_model_class
from .experts import GMMExperts, GMMProjection


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
                                  has_bias=first.bias is not None, extra={k: v for k, v in extra.items() if v},
                                  post_expert_norm=module.info.post_expert_norm if module.post_expert_norm is not None else 0)
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
               dtype: Optional[torch.dtype] = None, **kwargs: Any) -> nn.Module:
    """Load a gmmquant checkpoint as a transformers model whose experts run on grouped-matmul kernels.

    The checkpoint is validated first (FormatError lists every problem), then loaded with
    the class its config names (`architectures`; else causal LM, image-text-to-text, ...) through gmmquant's quantizer: the model is built on the meta
    device, quantized experts modules become empty GMM modules that the checkpoint's tensors fill directly,
    and everything else, including experts left in float, goes through transformers' own loading and
    checkpoint conversions.

    A compressed-tensors checkpoint (llm-compressor's pack-quantized / int-quantized MoE) or an AscendV1 one
    (msModelSlim, `quant_model_description.json`) is converted to the same GMM modules at load time, without
    dequantizing its experts (gmmquant.interop).

    Args:
        path: checkpoint directory (from `gmmquant pack`, `save_model` or `gmmquant calibrate`, or a
            compressed-tensors / AscendV1 MoE checkpoint).
        device: where to put the model.
        backend: grouped_matmul backend for the experts (default: by device).
        dtype: dtype of the non-expert weights (default: as stored).
        **kwargs: passed to `from_pretrained`.

    Returns:
        The model in eval mode; `generate()` works as usual.
    """
    from transformers import AutoConfig

    from ..interop.load import detect_format, load_foreign_model  # noqa: PLC0415 - interop imports runtime

    if detect_format(path) is not None:  # compressed-tensors / AscendV1: converted at load time (docs/INTEROP.md)
        return load_foreign_model(path, device=device, backend=backend, dtype=dtype, **kwargs)
    load_quantized(path, validate=False)  # a clear error if it is no gmmquant checkpoint; the quantizer validates it all
    model_class = auto_model_class(AutoConfig.from_pretrained(path))  # causal LM, vision-language, seq2seq
    model = model_class.from_pretrained(path, **({"dtype": dtype} if dtype else {}), **kwargs)
    if backend is not None:
        for module in model.modules():
            if isinstance(module, GMMProjection):
                module.backend = backend
    return model.to(device).eval()


__all__ = ["load_model", "save_model"]
