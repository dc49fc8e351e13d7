"""One F.grouped_mm call for a float MoE call whose groups are the experts in order (cpu and cuda)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..plan import GMMPlan


def _aligned_for_grouped_mm(*tensors: Tensor) -> bool:
    # grouped_mm requires 16-byte aligned strides for every non-unit dimension.
    return all(
        all((stride * t.element_size()) % 16 == 0 for stride, size in zip(t.stride(), t.shape) if stride != 1 and size > 1)
        for t in tensors
    )


def float_grouped_mm(plan: GMMPlan) -> Optional[Tensor]:
    """All experts in one F.grouped_mm call, or None when the call does not fit it."""
    x, w = plan.x, plan.weight
    # A bias must join the float32 accumulator before the one rounding; grouped_mm rounds first.
    if plan.bias is not None or not plan.experts_in_order or x.shape[0] == 0 or not _aligned_for_grouped_mm(x, w):
        return None
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return None
    sizes = torch.tensor(plan.group_sizes, device=x.device)
    return F.grouped_mm(x, w, offs=sizes.cumsum(0).to(torch.int32))
