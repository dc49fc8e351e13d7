"""Which model class calibration loads, and which families it refuses (before any weight is read)."""

from __future__ import annotations

from typing import Any

from ..pack.model_class import auto_model_class, is_seq2seq
from ..runtime.families import UNSUPPORTED, UnsupportedFamilyError


def calibration_model_class(config: Any) -> type:
    """The class calibration loads a model directory with: the one its config names (`architectures`), else
    the causal-LM / image-text-to-text / multimodal class of its model type. Vision-language models are
    loaded whole (their vision tower stays as it is in the checkpoint) and their language-model experts are
    calibrated on text.

    Raises:
        UnsupportedFamilyError: a model type gmmquant refuses (runtime.families.UNSUPPORTED), with the reason.
        ValueError: encoder-decoder models (nllb-moe, switch_transformers): the text calibration pass
            drives one stack of decoder layers; quantize those with `replace_experts` + `save_model`.
    """
    if config.model_type in UNSUPPORTED:
        raise UnsupportedFamilyError(f"model type {config.model_type!r} is not supported by gmmquant: {UNSUPPORTED[config.model_type]}")
    if is_seq2seq(config):
        raise ValueError(f"model type {config.model_type!r} is an encoder-decoder model; calibration runs one decoder "
                         "stack on text and does not drive an encoder and a decoder. Quantize it with round-to-nearest: "
                         "gmmquant.replace_experts(model, scheme) then gmmquant.save_model(model, out_dir)")
    return auto_model_class(config)


__all__ = ["calibration_model_class"]
