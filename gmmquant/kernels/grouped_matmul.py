"""`grouped_matmul`: npu_grouped_matmul's signature and semantics on every device."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .backends import BACKENDS
from .contract import check_grouped_matmul
from .errors import GMMContractError

ENV_BACKEND = "GMMQUANT_BACKEND"


def select_backend(x: Any, backend: Optional[str] = None) -> str:
    """The backend a call runs on: `backend`, else $GMMQUANT_BACKEND, else by the device of x[0]."""
    name = backend or os.environ.get(ENV_BACKEND) or None
    device = x[0].device.type if isinstance(x, (list, tuple)) and x and isinstance(x[0], Tensor) else "cpu"
    if name is None:
        name = {"npu": "npu", "cpu": "cpu", "cuda": "cuda"}.get(device, "reference")
    if name not in BACKENDS:
        raise ValueError(f"unknown grouped_matmul backend {name!r}; choose one of {list(BACKENDS)} (argument backend= or ${ENV_BACKEND})")
    # An explicit backend="npu" is passed through whatever the device: torch_npu decides (and raises for
    # host tensors on a real NPU stack; a stand-in torch_npu in tests records the call).
    if name in ("cpu", "cuda") and device != name:
        raise ValueError(f"backend {name!r} needs tensors on a {name} device, but x[0] is on {device}; use backend='reference' or move the tensors")
    return name


def grouped_matmul(
    x: Sequence[Tensor],
    weight: Sequence[Tensor],
    *,
    bias: Optional[Sequence[Tensor]] = None,
    scale: Optional[Sequence[Tensor]] = None,
    offset: Optional[Sequence[Tensor]] = None,
    antiquant_scale: Optional[Sequence[Tensor]] = None,
    antiquant_offset: Optional[Sequence[Tensor]] = None,
    per_token_scale: Optional[Sequence[Tensor]] = None,
    group_list: Optional[Sequence[int] | Tensor] = None,
    activation_input: Optional[Sequence[Tensor]] = None,
    activation_quant_scale: Optional[Sequence[Tensor]] = None,
    activation_quant_offset: Optional[Sequence[Tensor]] = None,
    split_item: int = 0,
    group_type: Optional[int] = None,
    group_list_type: int = 0,
    act_type: int = 0,
    output_dtype: Optional[torch.dtype] = None,
    tuning_config: Optional[Sequence[int]] = None,
    backend: Optional[str] = None,
) -> list[Tensor]:
    """Grouped matmul with the signature and semantics of `torch_npu.npu_grouped_matmul` (Atlas A2/A3).

    The common MoE call (single tensors, M-axis grouping):

        y, = grouped_matmul([x], [w], group_list=counts, group_list_type=1, group_type=0, split_item=2)

    with x `[M, K]`, w `[E, K, N]` (float, int8, or int32 `[E, K, N/8]` packed int4), counts `[E]` int64;
    y is `[M, N]` and rows `sum(counts[:e]):sum(counts[:e+1])` of x are multiplied by `w[e]`.

    Formulas (DESIGN.md section 3), per group i:
      - float: `y = x @ w + bias`
      - per-channel full quant (int8 x, int8 w): `y = (x @ w + bias) * scale`, int64 scale -> int8 y
      - per-token full quant: `y = (x @ w + bias) * scale * per_token_scale`, then act_type
      - weight-only: `y = x @ ((w + antiquant_offset) * antiquant_scale) + bias`, the weight rounded to x's dtype
      - A8W4 (int8 x, int32-packed int4 w, int64 scale): `y = ((x - 8) @ (w * scale) + bias) * per_token_scale`,
        with bias = `a8w4_scale_bias(w, scale)` giving `x @ (w * scale)`
    The order of operations and roundings of each mode is docs/KERNELS.md "Numerics".

    Arguments are checked against the spec first (`GMMContractError` names the broken rule), then the call
    runs on `backend`: "npu" (torch_npu, arguments unchanged), "cpu" (fast CPU kernels), "cuda"
    (grouped_mm for floats) or "reference" (the plain formulas). Default: $GMMQUANT_BACKEND, else chosen by
    the device of `x[0]`.

    Returns:
        split_item 0/1: one tensor per weight; 2/3: a single tensor (`[G, M, N]` for group_type 2).
    """
    name = select_backend(x, backend)
    kwargs = dict(
        bias=bias, scale=scale, offset=offset, antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
        per_token_scale=per_token_scale, group_list=group_list, activation_input=activation_input,
        activation_quant_scale=activation_quant_scale, activation_quant_offset=activation_quant_offset,
        split_item=split_item, group_type=group_type, group_list_type=group_list_type, act_type=act_type,
        output_dtype=output_dtype, tuning_config=tuning_config,
    )
    plan = check_grouped_matmul(x, weight, read_group_list=name != "npu", **kwargs)
    if name == "npu":
        from .backends import npu

        return npu.run(x, weight, **kwargs)
    if name == "cpu":
        from .backends import cpu

        return cpu.run(plan)
    if name == "cuda":
        from .backends import cuda

        return cuda.run(plan)
    from .backends import reference

    return reference.run(plan)


__all__ = ["grouped_matmul", "select_backend", "GMMContractError", "ENV_BACKEND"]
