"""What every source format shares: the error type, the format record, and block-scale expansion.

A source format says how the tensors a checkpoint stores become the float tensors the model names
(its "logical" tensors): block FP8 stores `X.weight` float8 plus `X.weight_scale_inv`; MXFP4 stores
`X_blocks` plus `X_scales` for the model's `X`; a float checkpoint stores the logical tensors themselves.
`group` maps logical names to their stored parts, `dequantize` turns the parts of one tensor (or of one
expert's slice of it) into floats. Nothing here reads files: `store.TensorStore` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor


class SourceError(ValueError):
    """A source checkpoint gmmquant cannot read as it claims to be: unknown quant_method, a block size or
    scale shape that breaks the format's rule, a missing scale tensor. The message names the rule."""


@dataclass(frozen=True)
class Stored:
    """Where one logical tensor lives: its main stored tensor and its companions by role (`scale_inv`,
    `scales`, `weight_scale`)."""

    main: str
    companions: dict[str, str] = field(default_factory=dict)


Group = Callable[[Iterable[str]], dict[str, Stored]]
Dequantize = Callable[[str, Tensor, dict[str, Tensor], torch.dtype], Tensor]


def plain_group(names: Iterable[str]) -> dict[str, Stored]:
    """Every stored tensor is its own logical tensor (float checkpoints)."""
    return {n: Stored(n) for n in names}


def plain_dequantize(name: str, main: Tensor, companions: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
    return main


@dataclass(frozen=True)
class SourceFormat:
    """How one checkpoint format stores its tensors (see the module docstring).

    Attributes:
        name: "float", "fp8-block", "mxfp4", "compressed-tensors-fp8".
        group: stored names -> {logical name: Stored}; raises SourceError for an orphan companion.
        dequantize: `(logical name, main, companions, dtype) -> float tensor` in the layout the model's
            parameter has (for one expert: the same with the leading expert axis indexed away).
        quantized: whether any tensor needs dequantizing (False for plain float checkpoints).
    """

    name: str
    group: Group = plain_group
    dequantize: Dequantize = plain_dequantize
    quantized: bool = False


FLOAT = SourceFormat("float")


def expand_blocks(scale: Tensor, rows: int, cols: int, where: str, rule: str) -> Tensor:
    """A block-scale grid `[..., R, C]` float -> `[..., rows, cols]`, each scale repeated over its block.

    Block sizes are `ceil(rows / R)` x `ceil(cols / C)`; the last block of an axis may be partial (DeepSeek-V3
    stores `ceil(out/128)` x `ceil(in/128)` scales for shapes that 128 does not divide). A grid that no block
    size fits (R blocks of that size would not cover `rows` exactly) breaks `rule` and is refused.
    """
    r, c = scale.shape[-2:]
    if r == 0 or c == 0:
        raise SourceError(f"{where}: empty scale grid {list(scale.shape)} (rule: {rule})")
    br, bc = -(-rows // r), -(-cols // c)
    if -(-rows // br) != r or -(-cols // bc) != c:
        raise SourceError(f"{where}: scale grid {list(scale.shape[-2:])} does not tile a [{rows}, {cols}] weight "
                          f"(rule: {rule})")
    return scale.repeat_interleave(br, dim=-2)[..., :rows, :].repeat_interleave(bc, dim=-1)[..., :cols]


__all__ = ["FLOAT", "SourceError", "SourceFormat", "Stored", "expand_blocks", "plain_dequantize", "plain_group"]
