"""Build a runnable transformers model from a converted foreign checkpoint (see foreign.py).

The model is created from its config with parameters on the meta device (buffers such as rotary tables are
computed normally); every tensor that is not a quantized expert is assigned in place; then `replace_experts`
installs GMM experts modules with the converted tensors (and runs experts modules stored in float through the
GMM kernel too, as `replace_experts(model)` does). No float copy of a quantized expert is ever made.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..pack.format import FormatError
from ..pack.layouts import find_experts_modules
from ..pack.safety import read_json_object
from ..runtime.replace import replace_experts
from .foreign import ForeignCheckpoint, config_dtype

logger = logging.getLogger(__name__)

COMPRESSED_TENSORS = "compressed-tensors"
ASCEND = "ascend"
ASCEND_DESCRIPTION = "quant_model_description.json"


def detect_format(path: "str | os.PathLike") -> Optional[str]:
    """`"ascend"` (a quant_model_description.json), `"compressed-tensors"` (its quant_method in config.json),
    or None (anything else, including gmmquant checkpoints)."""
    root = Path(path)
    if (root / ASCEND_DESCRIPTION).is_file():
        return ASCEND
    try:
        qc = read_json_object(root / "config.json", "config.json").get("quantization_config")
    except (OSError, FormatError):  # not a model directory (or an unreadable one): the callers say so
        return None
    return COMPRESSED_TENSORS if isinstance(qc, dict) and qc.get("quant_method") == COMPRESSED_TENSORS else None


def read_checkpoint(path: "str | os.PathLike") -> ForeignCheckpoint:
    """Convert a foreign checkpoint of either supported format (FormatError if it is neither)."""
    fmt = detect_format(path)
    if fmt == COMPRESSED_TENSORS:
        from .compressed_tensors import read_compressed_tensors

        return read_compressed_tensors(path)
    if fmt == ASCEND:
        from .ascend import read_ascend

        return read_ascend(path)
    raise FormatError(f"{path}: neither a compressed-tensors nor an AscendV1 ({ASCEND_DESCRIPTION}) checkpoint")


def is_norm_bias(model: nn.Module, name: str) -> bool:
    """Whether `name` is `<norm>.bias` for a norm module of `model` that has a weight and no bias (an RMSNorm)."""
    if not name.endswith(".bias"):
        return False
    try:
        module = model.get_submodule(name[: -len(".bias")])
    except AttributeError:
        return False
    return "norm" in type(module).__name__.lower() and "weight" in module._parameters and "bias" not in module._parameters


def _add_bias(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + module.bias.to(output.dtype)


def attach_norm_biases(model: nn.Module, biases: dict[str, torch.Tensor]) -> None:
    """Give RMSNorm modules the bias msModelSlim's anti-outlier step writes (`<norm>.bias`): the norm then
    returns `rmsnorm(x) * weight + bias`, as vllm-ascend's norm with bias (npu_add_rms_norm_bias) computes."""
    for name, bias in biases.items():
        module = model.get_submodule(name[: -len(".bias")])
        module.register_parameter("bias", nn.Parameter(bias, requires_grad=False))
        module.register_forward_hook(_add_bias)
        logger.info("%s: anti-outlier norm bias attached", name)


def build_model(ck: ForeignCheckpoint, *, backend: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A transformers model (CPU, eval mode) whose quantized experts run on grouped-matmul kernels.

    Args:
        ck: the converted checkpoint.
        backend: grouped_matmul backend of the experts (default: by device).
        dtype: cast the non-expert float tensors to this dtype (default: as stored).

    Raises:
        FormatError: tensors the model does not have, or model tensors the checkpoint lacks.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**ck.config)
    model_dtype = dtype or config_dtype(ck.config)  # as from_pretrained would (dtype "auto")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **({"dtype": model_dtype} if model_dtype else {}))
    infos = find_experts_modules(model)
    wrong = sorted(p for p in ck.specs if p not in infos or infos[p].linear_names)
    if wrong:
        raise FormatError(f"{ck.path}: {wrong} are not fused experts modules of {type(model).__name__}")
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in ck.other.items()}
    tied = set(dict(getattr(model, "all_tied_weights_keys", None) or {}))  # e.g. lm_head.weight -> embed_tokens
    state = {k: v for k, v in state.items() if k not in tied}  # a tied copy on disk is the same values

    def quantized(name: str) -> bool:
        return any(name.startswith(p + ".") for p in ck.specs)

    expected = {k for k in model.state_dict() if not quantized(k)} - tied
    attach_norm_biases(model, {k: state.pop(k) for k in list(state) if k not in expected and is_norm_bias(model, k)})
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise FormatError(f"{ck.path}: checkpoint does not fit {type(model).__name__}: "
                          f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                          f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta" and not quantized(n)]
    if still_meta:
        raise FormatError(f"{ck.path}: no tensors for {still_meta[:10]}")
    # The converted tensors go in through replace_experts, like RTN or gmmquant-checkpoint projections; it also
    # strips the (meta) float experts, routes float experts modules through the GMM kernel and repacks for CPU.
    replace_experts(model, None, backend=backend, act_dtype=ck.act_dtype, quantized=ck.quantized)
    logger.info("loaded %s (%s): %d quantized experts modules", ck.path, ck.format, len(ck.specs))
    return model.eval()


def load_foreign_model(path: "str | os.PathLike", *, device: "str | torch.device" = "cpu", backend: Optional[str] = None,
                       dtype: Optional[torch.dtype] = None, **ignored: object) -> nn.Module:
    """Load a compressed-tensors or AscendV1 MoE checkpoint for gmmquant's runtime (what `load_model` calls).

    Keyword arguments meant for `from_pretrained` do not apply here (the model is built from its config) and
    are reported in the log.
    """
    if ignored:
        logger.warning("%s: from_pretrained arguments %s are not used for %s checkpoints", path, sorted(ignored), detect_format(path))
    return build_model(read_checkpoint(path), backend=backend, dtype=dtype).to(device)
