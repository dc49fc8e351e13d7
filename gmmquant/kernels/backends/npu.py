"""The npu backend: `torch_npu.npu_grouped_matmul` with the caller's arguments, unchanged.

torch_npu is imported here, lazily, on the first call that has tensors on an NPU; importing gmmquant
never imports it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def run(x: list[Tensor], weight: list[Tensor], **kwargs: Any) -> list[Tensor]:
    """Forward every argument of the call to the NPU kernel as given."""
    import torch_npu  # noqa: PLC0415 - importable only on Ascend machines

    return torch_npu.npu_grouped_matmul(x, weight, **kwargs)
