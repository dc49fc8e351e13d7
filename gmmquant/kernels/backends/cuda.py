"""The cuda backend: F.grouped_mm for float calls; quantized modes run the reference math on the GPU.

There is no dedicated CUDA kernel for the quantized modes yet: they dequantize per call (DESIGN.md
section 4), which is correct but not fast.
"""

from __future__ import annotations

from torch import Tensor

from ..plan import GMMPlan, Mode
from . import reference
from .float_grouped import float_grouped_mm


def run(plan: GMMPlan) -> list[Tensor]:
    """Execute a validated plan on CUDA tensors."""
    if plan.mode is Mode.FLOAT and plan.output == "single":
        y = float_grouped_mm(plan)
        if y is not None:
            return [y]
    return reference.run(plan)
