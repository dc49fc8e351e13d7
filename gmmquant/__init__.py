"""gmmquant: quantized Mixture-of-Experts experts on grouped-matmul kernels.

Public API (DESIGN.md section 6): everything importable from here; other modules may move.
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

__version__ = "0.1.0"

__all__ = [
    "GMMContractError",
    "__version__",
    "antiquant_dequantize",
    "dynamic_quant",
    "grouped_matmul",
    "pack_int4",
    "trans_quant_param",
    "unpack_int4",
]
