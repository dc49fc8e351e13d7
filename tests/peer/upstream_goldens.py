"""Upstream's golden formulas for npu_grouped_matmul, written independently of gmmquant's kernels.

Each function states the formula of the op-plugin test it stands for (test/test_custom_ops/
test_npu_grouped_matmul.py, Ascend/op-plugin); the code is ours, in plain torch / numpy.
"""

from __future__ import annotations

import numpy as np
import torch


def float_golden(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`y = x @ w` in the input dtype, then `y += b` in the input dtype (the float tests' golden)."""
    y = (x.double() @ w.double()).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def quant_golden(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, out_dtype) -> torch.Tensor:
    """Per-channel full quant: `(x @ w + b) * scale`; int8 output is rounded half to even and clipped."""
    y = x.double() @ w.double()
    if bias is not None:
        y = y + bias.double()
    y = y * scale.double()
    if out_dtype in (None, torch.int8):
        return torch.round(y).clamp(-128, 127).to(torch.int8)
    return y.to(out_dtype)


def antiquant_golden(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """The A16W4 golden, per group: dequantize in the activation dtype, matmul in float32, add a float32 bias,
    round once. bfloat16: `(w + o) * s` in float32, rounded to bf16. float16: `w.half()`, `+ o`, `* s`, each
    rounded to fp16 (torch half ops, as the golden uses)."""
    if x.dtype == torch.bfloat16:
        wf = q.to(torch.float32)
        if offset is not None:
            wf = wf + offset.to(torch.float32)
        w = (wf * scale.to(torch.float32)).to(torch.bfloat16).to(torch.float32)
    else:
        wh = q.to(torch.float16)
        if offset is not None:
            wh = wh + offset
        w = (wh * scale).to(torch.float32)
    y = x.to(torch.float32) @ w
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def a8w4_golden(x: np.ndarray, q: np.ndarray, scale_bits: np.ndarray, bias: np.ndarray, counts: np.ndarray, per_token: np.ndarray) -> np.ndarray:
    """The A8W4 golden (numpy): each int8 activation becomes two int4 rows, `x // 16` and `(x & 15) - 8`;
    per expert and per quant group the int32 product times the float32 scale (read from the low 32 bits of
    the int64 scale) is added into a float16 accumulator; then `16 * hi + lo + bias`, times the per-token
    scale, rounded to float16.

    Args: x [M, K] int8; q [E, K, N] int values in [-8, 7]; scale_bits [E, G, N] int64; bias [E, N] float32;
    counts [E] rows per expert; per_token [M] or [M, 1] float32.
    """
    m, k = x.shape
    e_count, _, n = q.shape
    groups = scale_bits.shape[1]
    span = k // groups
    scales = (scale_bits.astype(np.int64) & 0xFFFFFFFF).astype(np.uint32).view(np.float32)
    pts = per_token.reshape(-1, 1).astype(np.float32)
    halves = np.stack([np.floor_divide(x, 16), np.bitwise_and(x, 15) - 8], axis=1).astype(np.int32)  # [M, 2, K]
    out, start = [], 0
    for e in range(e_count):
        rows = halves[start:start + counts[e]].reshape(-1, k)  # [2r, K]: hi, lo interleaved per token
        acc = np.zeros((rows.shape[0], n), dtype=np.float16)
        for j in range(groups):
            cols = slice(j * span, (j + 1) * span)
            part = (rows[:, cols] @ q[e, cols].astype(np.int32)).astype(np.float32) * scales[e, j]
            acc = (acc + part.astype(np.float16)).astype(np.float16)
        pair = acc.astype(np.float32).reshape(-1, 2, n)
        y = pair[:, 0] * 16 + pair[:, 1] + bias[e].reshape(1, n)
        out.append(y * pts[start:start + counts[e]])
        start += counts[e]
    return np.concatenate(out).astype(np.float16)
