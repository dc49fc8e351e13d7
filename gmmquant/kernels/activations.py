"""The activations of npu_grouped_matmul's `act_type`, applied in float32 to the dequantized output."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def fast_gelu(x: Tensor) -> Tensor:
    """Ascend's FastGelu: `x / (1 + exp(-1.702 |x|)) * exp(0.851 (x - |x|))` (a sigmoid-style GELU)."""
    ax = x.abs()
    return x / (1 + torch.exp(-1.702 * ax)) * torch.exp(0.851 * (x - ax))


ACTIVATIONS: dict[int, Callable[[Tensor], Tensor]] = {
    0: lambda x: x,
    1: torch.relu,
    2: lambda x: F.gelu(x, approximate="tanh"),
    4: fast_gelu,
    5: F.silu,
}


def apply_activation(x: Tensor, act_type: int) -> Tensor:
    """Apply act_type (0 none, 1 relu, 2 gelu_tanh, 4 fast_gelu, 5 silu) to `x`."""
    return x if act_type == 0 else ACTIVATIONS[act_type](x)
