"""Block-FP8 checkpoints (DeepSeek-V3 / R1, Kimi-K2, Qwen3-*-FP8): `quantization_config.quant_method == "fp8"`.

Layout: every quantized linear stores `X.weight` float8_e4m3fn `[out, in]` (or `[E, out, in]` fused) and
`X.weight_scale_inv` float32 `[ceil(out/b0), ceil(in/b1)]` (`[E, ...]` fused), `weight_block_size = [b0, b1]`
(128 x 128 in every published checkpoint). The float weight is `weight * scale_inv` block by block (the
name says "inverse" because the quantizer divided by it; dequantizing multiplies). Tensors the quantizer left
out (`modules_to_not_convert`: norms, router, embeddings) are stored in float and pass through unchanged.
transformers' own dequantization (integrations/finegrained_fp8.py) is the cross-check in the tests.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from .base import SourceError, SourceFormat, Stored

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn,)
ROWS_ELEMENTS = 2**24  # float64 elements dequantized at once (128 MiB)
RULE = "quant_method fp8 stores weight_scale_inv float32 [ceil(out/b0), ceil(in/b1)] beside each float8_e4m3fn weight"


def parse_block_size(qc: dict[str, Any]) -> tuple[int, int]:
    """`weight_block_size` of a fp8 quantization_config as (b0, b1); SourceError if it is not two positive ints."""
    block = qc.get("weight_block_size", [128, 128])
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise SourceError(f"quantization_config.weight_block_size {block!r}: expected two positive integers such as "
                          "[128, 128] (rule: block FP8 has one scale per b0 x b1 block of each weight); per-tensor FP8 "
                          "(weight_block_size null) is not supported")
    return int(block[0]), int(block[1])


def group(names: Iterable[str]) -> dict[str, Stored]:
    """`X.weight` + `X.weight_scale_inv` -> logical `X.weight`; everything else stands alone."""
    names = set(names)
    out = {}
    for name in names:
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in names:
                raise SourceError(f"{name}: a scale without its weight {name[: -len(SCALE_SUFFIX)]!r} (rule: {RULE})")
            continue
        scale = name + SCALE_SUFFIX
        out[name] = Stored(name, {"scale_inv": scale} if scale in names else {})
    return out


def dequantize_fp8_block(weight: Tensor, scale_inv: Tensor, block: tuple[int, int], dtype: torch.dtype, where: str) -> Tensor:
    """float8 `[..., out, in]` x float32 `[..., ceil(out/b0), ceil(in/b1)]` -> `dtype` `[..., out, in]`.

    Computed in float64 (exact), rounded once to `dtype`."""
    rows, cols = weight.shape[-2:]
    want = (*weight.shape[:-2], -(-rows // block[0]), -(-cols // block[1]))
    if tuple(scale_inv.shape) != want:
        raise SourceError(f"{where}: weight_scale_inv has shape {list(scale_inv.shape)}, expected {list(want)} for a "
                          f"{list(weight.shape)} weight with weight_block_size {list(block)} (rule: {RULE})")
    # float64: a float8 value (4 significant bits) times a float32 scale (24) is exact there, so the result
    # is rounded once, to `dtype` (float32 then bf16 would round twice and differ from a float64 reference).
    # Row blocks at a time: a float64 copy of a whole 16384 x 7168 projection would be 0.9 GiB per temporary.
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    full, rem = divmod(cols, block[1])
    step = block[0] * max(1, ROWS_ELEMENTS // max(1, block[0] * cols * max(1, weight[..., :1, :1].numel())))
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        w = weight[..., r0:r1, :].double()
        s = scale_inv[..., r0 // block[0]: -(-r1 // block[0]), :].double().repeat_interleave(block[0], dim=-2)[..., : r1 - r0, :]
        # scale by a view over column blocks instead of expanding the scales to the weight's full size
        w[..., : full * block[1]].unflatten(-1, (full, block[1])).mul_(s[..., :full, None])
        if rem:
            w[..., full * block[1]:].mul_(s[..., full:])
        out[..., r0:r1, :] = w.to(dtype)
    return out


def make(qc: dict[str, Any]) -> SourceFormat:
    """The SourceFormat of a `quant_method: fp8` quantization_config."""
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise SourceError(f"quantization_config.fmt {fmt!r}: only e4m3 (float8_e4m3fn) block FP8 is supported")
    block = parse_block_size(qc)

    def dequantize(name: str, main: Tensor, companions: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        if main.dtype not in FP8_DTYPES:
            if "scale_inv" in companions:
                raise SourceError(f"{name}: dtype {main.dtype} has a weight_scale_inv but is not float8_e4m3fn (rule: {RULE})")
            return main  # a module the quantizer skipped: stored in float
        if "scale_inv" not in companions:
            raise SourceError(f"{name}: float8 weight without {name + SCALE_SUFFIX!r} (rule: {RULE})")
        return dequantize_fp8_block(main, companions["scale_inv"], block, dtype, name)

    return SourceFormat("fp8-block", group, dequantize, quantized=True)


__all__ = ["dequantize_fp8_block", "group", "make", "parse_block_size"]
