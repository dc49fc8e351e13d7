"""Which serving engine runs which gmmquant scheme for MoE experts, checked before any work is done.

`gmmquant calibrate --target ENGINE` refuses a recipe whose experts the engine could not run, before the model
is loaded; `gmmquant export --to ascend` applies the vllm-ascend rule (the exporters raise the same message).
The rules come from the engines' own MoE loaders (docs/INTEROP.md; tests/test_vllm_ascend_loader.py runs
vllm-ascend's): a scheme passes only where that loader has an MoE method for its export.

This module imports nothing heavy, so the CLI can check a recipe first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from ..pack.schemes import QuantScheme


class EngineError(ValueError):
    """A scheme (or option) the target engine cannot run for MoE experts."""


def _vllm_ascend(scheme: QuantScheme) -> Optional[str]:
    if scheme.weight_only and scheme.weight_bits == 8:
        return ("W8A16 experts: vllm-ascend registers W8A16 for linear layers only; its quant config raises "
                "NotImplementedError on an MoE layer")
    if scheme.weight_only and not scheme.symmetric:
        return ("asymmetric W4A16: vllm-ascend's W4A16 MoE method builds all-zero weight offsets and never loads them, "
                "so a zero point would be silently dropped; export this checkpoint to compressed-tensors instead, which keeps "
                "zero points, or quantize with --symmetric before calibrating (re-packing a finished checkpoint would "
                "discard calibration work such as GPTQ)")
    if scheme.weight_only and scheme.group_size is None:
        return "per-channel W4A16: vllm-ascend's W4A16 MoE method takes per-group scales with one global group_size"
    return None  # w8a8-static goes out as W8A8_MIX, which vllm-ascend runs with dynamic per-token activations


def _vllm(scheme: QuantScheme) -> Optional[str]:
    if scheme.activation == "static":
        return "W8A8 static: vLLM's compressed-tensors int8 MoE method takes dynamic per-token activations only"
    if scheme.activation == "dynamic" and scheme.weight_bits == 4:
        return "gmmquant exports W4A8 to AscendV1 only (vllm-ascend); compressed-tensors has no export of it here"
    return None


@dataclass(frozen=True)
class Engine:
    """A serving engine and what it runs for MoE experts.

    Attributes:
        name: `--target` value.
        version: the release whose loader the rules were read from (and, for vllm-ascend, tested against).
        export: the `gmmquant export --to` format it loads; None: gmmquant checkpoints directly.
        runs: the schemes it can run, for messages.
        rule: scheme -> None if it runs, else why not.
        smoothquant: whether per-expert SmoothQuant factors (`smooth_scale`) can reach it.
    """

    name: str
    version: str
    export: Optional[str]
    runs: str
    rule: Callable[[QuantScheme], Optional[str]]
    smoothquant: bool

    def refusal(self, scheme: QuantScheme, *, smoothquant: bool = False) -> Optional[str]:
        """Why this engine cannot run `scheme` (with SmoothQuant factors if `smoothquant`), or None."""
        why = self.rule(scheme)
        if why is None and smoothquant and not self.smoothquant:
            why = ("SmoothQuant / per-expert AWQ leave per-expert smooth_scale factors (down_proj's cannot be folded "
                   f"into a norm) that the {self.export} format has no place for")
        if why is None:
            return None
        return (f"scheme {scheme.name!r}{' with per-expert smooth scales' if smoothquant else ''} cannot run on {self.name} {self.version} "
                f"MoE layers: {why}. {self.name} runs: {self.runs}")

    def check(self, scheme: QuantScheme, *, smoothquant: bool = False) -> None:
        """Raise EngineError with `refusal`'s message."""
        why = self.refusal(scheme, smoothquant=smoothquant)
        if why is not None:
            raise EngineError(why)


ENGINES: dict[str, Engine] = {
    "vllm-ascend": Engine("vllm-ascend", "0.23.0.post1", "ascend",
                          "w8a8-dynamic (W8A8_DYNAMIC), w4a16-g32/64/128/256 --symmetric (W4A16), "
                          "w4a8-dynamic[-g*] (W4A8_DYNAMIC), w8a8-static (W8A8_MIX; its MoE method quantizes the "
                          "activations per token, not with the calibrated scales)", _vllm_ascend, smoothquant=False),
    "vllm": Engine("vllm", "0.23.0", "compressed-tensors",
                   "w4a16[-g*] and w8a16, symmetric or not (pack-quantized), w8a8-dynamic (int-quantized)", _vllm, smoothquant=False),
    "hf": Engine("hf", "transformers 5", None, "every gmmquant scheme (gmmquant's runtime inside transformers)",
                 lambda scheme: None, smoothquant=True),
}
DEFAULT_TARGET = "hf"


def get_engine(name: str) -> Engine:
    if name not in ENGINES:
        raise EngineError(f"unknown target engine {name!r}; choose one of {sorted(ENGINES)}")
    return ENGINES[name]


__all__ = ["DEFAULT_TARGET", "ENGINES", "Engine", "EngineError", "get_engine"]
