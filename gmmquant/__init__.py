"""gmmquant: quantized Mixture-of-Experts experts on grouped-matmul kernels.

Public API (DESIGN.md section 6): everything importable from here; other modules may move. Importing
gmmquant registers `quant_method: "gmmquant"` and `experts_implementation="gmm"` with transformers.
"""

from .kernels import (
    GMMContractError,
    antiquant_dequantize,
    dynamic_quant,
    grouped_matmul,
    pack_int4,
    trans_quant_param,
    unpack_int4,
)
from .pack import PRESETS, QuantScheme, QuantizedWeight, SchemeError, get_scheme, quantize_weight
from .pack.checkpoint import QuantizedCheckpoint, load_quantized, save_quantized
from .pack.format import FormatError
from .pack.stream import stream_pack
from .recipes import Recipe, RecipeError, load_recipe
from .runtime import GMMExperts, NoExpertsError, load_model, replace_experts, save_model  # registers quant_method "gmmquant"
from .calibrate.data import DatasetError
from .calibrate.pipeline import CalibrationReport, calibrate_model

__version__ = "0.1.0"

__all__ = [
    "CalibrationReport",
    "DatasetError",
    "Recipe",
    "RecipeError",
    "calibrate_model",
    "load_recipe",
    "FormatError",
    "GMMExperts",
    "NoExpertsError",
    "GMMContractError",
    "PRESETS",
    "QuantScheme",
    "QuantizedCheckpoint",
    "QuantizedWeight",
    "SchemeError",
    "__version__",
    "antiquant_dequantize",
    "dynamic_quant",
    "get_scheme",
    "grouped_matmul",
    "load_model",
    "load_quantized",
    "pack_int4",
    "quantize_weight",
    "replace_experts",
    "save_model",
    "save_quantized",
    "stream_pack",
    "trans_quant_param",
    "unpack_int4",
]
