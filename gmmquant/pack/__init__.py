"""Packing: quantization math, schemes, and the gmmquant checkpoint format."""

from .primitives import QuantizedWeight, antiquant_offset, choose_qparams, dequantize, error_bound, minmax, quant_range, quantize, quantize_weight
from .schemes import PRESETS, QuantScheme, SchemeError, get_scheme

__all__ = [
    "PRESETS",
    "QuantScheme",
    "QuantizedWeight",
    "SchemeError",
    "antiquant_offset",
    "choose_qparams",
    "dequantize",
    "error_bound",
    "get_scheme",
    "minmax",
    "quant_range",
    "quantize",
    "quantize_weight",
]
