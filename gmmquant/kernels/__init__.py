"""Grouped-matmul kernels with torch_npu.npu_grouped_matmul semantics, and their companion ops.

This package imports only torch. torch_npu is imported lazily by the npu paths.
"""

from .antiquant import antiquant_dequantize
from .backends.cpu import prepack as prepack_for_cpu
from .contract import check_grouped_matmul
from .errors import GMMContractError
from .grouped_matmul import grouped_matmul, select_backend
from .int4 import pack_int4, unpack_int4
from .plan import GMMPlan, Mode
from .quant_ops import a8w4_scale_bias, decode_quant_param, dynamic_quant, trans_quant_param

__all__ = [
    "GMMContractError",
    "GMMPlan",
    "Mode",
    "a8w4_scale_bias",
    "antiquant_dequantize",
    "check_grouped_matmul",
    "decode_quant_param",
    "dynamic_quant",
    "grouped_matmul",
    "pack_int4",
    "prepack_for_cpu",
    "select_backend",
    "trans_quant_param",
    "unpack_int4",
]
