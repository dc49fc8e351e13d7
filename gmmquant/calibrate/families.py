"""Which model class calibration loads, and which families it refuses (before any weight is read)."""

from __future__ import annotations

from typing import Any

from ..pack.model_class import auto_model_class, is_seq2seq
from ..runtime.families import UNSUPPORTED, UnsupportedFamilyError


class CalibrationRefused(ValueError):
    """A model calibration does not handle, refused before any weight is loaded; the message says why and
    what to do instead (round-to-nearest with replace_experts + save_model)."""


def calibration_model_class(config: Any) -> type:
    """The class calibration loads a model directory with: the one its config names (`architectures`), else
    the causal-LM / image-text-to-text / multimodal class of its model type. Vision-language models are
    loaded whole (their vision tower stays as it is in the checkpoint) and their language-model experts are
    calibrated on text.

    Raises:
        UnsupportedFamilyError: a model type gmmquant refuses (runtime.families.UNSUPPORTED), with the reason.
        CalibrationRefused: encoder-decoder models (nllb-moe, switch_transformers): the text calibration pass
            drives one stack of decoder layers; quantize those with `replace_experts` + `save_model`.
    """
    if config.model_type in UNSUPPORTED:
        raise UnsupportedFamilyError(f"model type {config.model_type!r} is not supported by gmmquant: {UNSUPPORTED[config.model_type]}")
    if is_seq2seq(config):
        raise CalibrationRefused(f"model type {config.model_type!r} is an encoder-decoder model; calibration runs one decoder "
                         "stack on text and does not drive an encoder and a decoder. Quantize it with round-to-nearest: "
                         "gmmquant.replace_experts(model, scheme) then gmmquant.save_model(model, out_dir)")
    return auto_model_class(config)


TOWER_WORDS = ("vision", "visual", "audio")  # module paths of the non-text towers of multimodal models


def check_one_stack(targets: list[str], layers_path: str) -> list[str]:
    """Calibration walks one list of decoder layers on text. Experts outside it are either in a vision /
    audio tower (dots3_note's vision experts): returned, to be left as they are in the checkpoint (float),
    since text never reaches them; or in a second text stack (diffusion_gemma's encoder and decoder, which
    share their weights): refused.

    Raises:
        CalibrationRefused: naming the experts modules outside `layers_path` and the round-to-nearest alternative.
    """
    outside = sorted(p for p in targets if not p.startswith(layers_path + "."))
    if all(any(w in p for w in TOWER_WORDS) for p in outside):
        return outside
    raise CalibrationRefused(f"experts modules {outside[:2]}{'...' if len(outside) > 2 else ''} are outside the decoder "
                             f"layers {layers_path!r} that calibration walks (a model with two layer stacks); quantize it "
                             "with round-to-nearest: gmmquant.replace_experts(model, scheme) then "
                             "gmmquant.save_model(model, out_dir), or leave those modules out with the recipe's `ignore`")


__all__ = ["CalibrationRefused", "calibration_model_class", "check_one_stack"]
