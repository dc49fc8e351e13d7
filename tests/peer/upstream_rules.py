"""The pass rules of upstream's npu_grouped_matmul tests, restated (our own code, their semantics).

- `rtol_rule(golden, out, prec, prec16)`: torch_npu's `TestCase.assertRtolEqual`. An output element fails the
  relative check when `|out - golden| / (max(|out|, |golden|) + tiny) > prec` and the absolute check when
  `|out - golden| > prec` (prec16 for float16). The call fails only when more than `size * prec` elements
  fail each check. For float16 outputs with prec16 = 1e-3 that allows 0.1% outliers; for the int8 cases
  upstream passes prec = 1, which accepts every output of the right shape and dtype (vacuous: the port
  adds `exact_or_one_off`).
- `close_fraction_rule(golden, out)`: the A16W4 test's `np.isclose(out, golden, 0.005, 0.005)` on at least
  99.5% of elements.
- `max_abs_rule(golden, out)`: torch_npu's `TestCase.assertEqual` at its default precision, max |diff| <= 1e-5
  (used by the A8W4 test: effectively bit equality for its float16 outputs).
"""

from __future__ import annotations

import numpy as np
import torch


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy() if t.dtype not in (torch.bfloat16,) else t.float().numpy()


def rtol_rule(golden: torch.Tensor, out: torch.Tensor, prec: float = 1e-4, prec16: float = 1e-3) -> None:
    assert golden.shape == out.shape, f"shape error: {tuple(golden.shape)} vs {tuple(out.shape)}"
    assert golden.dtype == out.dtype, f"dtype error: {golden.dtype} vs {out.dtype}"
    g, o = _np(golden).astype(np.float64), _np(out).astype(np.float64)
    half = golden.dtype == torch.float16
    p, tiny = (prec16, 6e-8) if half else (prec, 10e-10)
    diff = np.abs(o - g)
    rel_fail = ~(diff / (np.maximum(np.abs(g), np.abs(o)) + tiny) <= p)
    abs_fail = ~(diff <= p)
    if rel_fail.any() and abs_fail.any():
        assert not (rel_fail.sum() > g.size * p and abs_fail.sum() > g.size * p), (
            f"result error: {rel_fail.sum()} relative and {abs_fail.sum()} absolute failures of {g.size} (allowed {g.size * p:.1f})")


def close_fraction_rule(golden: torch.Tensor, out: torch.Tensor, rtol: float = 0.005, atol: float = 0.005, need: float = 0.995) -> float:
    ok = np.isclose(_np(out).astype(np.float32).ravel(), _np(golden).astype(np.float32).ravel(), rtol, atol, equal_nan=True)
    frac = float(ok.mean())
    assert frac >= need, f"only {frac:.2%} of outputs within rtol={rtol}, atol={atol} (upstream needs {need:.1%})"
    return frac


def max_abs_rule(golden: torch.Tensor, out: torch.Tensor, prec: float = 1e-5) -> None:
    assert golden.shape == out.shape
    err = float((out.double() - golden.double()).abs().max()) if out.numel() else 0.0
    assert err <= prec, f"max |diff| {err} > {prec}"


def exact_or_one_off(golden: torch.Tensor, out: torch.Tensor) -> None:
    """The int8-output cases: upstream's rule is vacuous, so the port asserts round-half-even to within 1."""
    d = (out.long() - golden.long()).abs()
    assert int(d.max()) <= 1, int(d.max())
