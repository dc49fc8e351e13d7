"""GPTQ (Frantar et al., 2022) for one expert, producing the GMM storage layout of `quantize_weight`.

GPTQ quantizes the K input rows of an expert weight `w` `[K, N]` (y = x @ w) one after another and, after
each row, moves that row's rounding error onto the rows not yet quantized, weighted by the inverse Hessian
`H = 2 X^T X / n` of the expert's calibration inputs X `[n, K]`. That keeps `X @ w_hat` close to `X @ w`
where plain round-to-nearest (RTN) only keeps `w_hat` close to `w`.

Everything about codes (scale / zero point choice, stored-dtype rounding, rounding, clamping, the offset sign)
comes from `gmmquant.pack.primitives`: each code is exactly `quantize(value, scale, zero_point)` for the
parameters that are stored, so the checkpoint dequantizes to the weights GPTQ optimised.

Internally the weight is handled transposed, `W = w.T` `[N, K]`, as in the paper: a GPTQ "column" i is row i
of `w` (input feature i), quantized for all N output channels at once.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Union

import torch
from torch import Tensor

from ..kernels import pack_int4
from ..pack.primitives import (
    QuantizedWeight,
    antiquant_offset,
    minmax,
    quantize,
    quantize_weight,
    stored_qparams,
)
from ..pack.schemes import QuantScheme
from .observers import Observer, get_observer

logger = logging.getLogger(__name__)

# Retries of a failed Cholesky multiply the dampening by 10 this many times. A damp of 0 restarts from
# _RETRY_DAMP_FLOOR (10 x 0 would never help).
_CHOLESKY_RETRIES = 3
_RETRY_DAMP_FLOOR = 1e-3


def accumulate_hessian(h: Optional[Tensor], x: Tensor, n_seen: float, weights: Optional[Tensor] = None) -> tuple[Tensor, float]:
    """Fold a batch of inputs into the running mean `H = 2 X^T X / n` (GPTQ's Hessian of ||X w - X w_hat||^2).

    Args:
        h: `[K, K]` float32 running Hessian, or None before the first batch.
        x: `[M, K]` inputs of one expert (any float dtype; leading dims are flattened, `[..., K]`). M may be 0.
        n_seen: rows folded into `h` so far (0 when h is None); with `weights`, their running sum.
        weights: optional `[M]` non-negative row weights c_i: then H = 2 sum c_i x_i x_i^T / sum c_i, the
            Hessian of the c-weighted squared error (router-weighted calibration passes c = p^2).

    Returns:
        (`[K, K]` float32 Hessian over all n_seen + M rows, n_seen + M, or n_seen + sum(weights)). An empty
        batch returns h unchanged (a zero `[K, K]` tensor if h was None). The input h is not modified.
    """
    k = x.shape[-1]
    x = x.reshape(-1, k)
    if h is None:
        if n_seen:
            raise ValueError(f"accumulate_hessian: h is None but n_seen={n_seen}; start with n_seen=0")
        h = torch.zeros(k, k, dtype=torch.float32, device=x.device)
    elif h.shape != (k, k):
        raise ValueError(f"accumulate_hessian: h has shape {list(h.shape)}, inputs have K={k}; expected [{k}, {k}]")
    m = x.shape[0]
    if m == 0:
        return h, n_seen
    if weights is None:
        total = n_seen + m
        # Running mean: rescale the old mean, add the new rows pre-scaled by sqrt(2 / total) so that the sum
        # is formed in one matmul without ever holding the (large) un-normalised sum.
        xs = x.float() * math.sqrt(2.0 / total)
    else:
        c = weights.reshape(-1).float().to(x.device)
        if c.shape[0] != m or bool((c < 0).any()):
            raise ValueError(f"accumulate_hessian: weights must be [{m}] and non-negative, got {list(c.shape)}")
        total = n_seen + float(c.sum())
        if total <= 0:
            return h, n_seen
        xs = x.float() * (2.0 * c / total).sqrt().unsqueeze(1)
    return h.float() * (n_seen / total) + xs.t() @ xs, total


def gptq_quantize(
    w: Tensor,
    hessian: Optional[Tensor],
    scheme: QuantScheme,
    act_dtype: torch.dtype,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    observer: Union[str, Observer] = "minmax",
    return_loss: bool = False,
) -> Union[QuantizedWeight, tuple[QuantizedWeight, float]]:
    """GPTQ-quantize ONE expert weight into the tensors `quantize_weight` would store for it.

    Args:
        w: `[K, N]` float weight of one expert (canonical layout, y = x @ w).
        hessian: `[K, K]` float Hessian `2 X^T X / n` of the expert's inputs (see `accumulate_hessian`).
            None, or a Hessian with an all-zero diagonal (an expert that saw no calibration tokens), falls
            back to round-to-nearest with the same observer (logged as a warning; loss 0).
        scheme: weight scheme (int8 / int4, per-channel / per-group, sym / asym, W8A8 weight side).
        act_dtype: activation dtype (bfloat16 / float16): decides the stored scale dtype.
        block_size: columns per lazy batch update. Per-group schemes round it up to a multiple of
            group_size so that a group's parameters are chosen on fully updated weights.
        damp: dampening, as a fraction of mean(diag H) added to the diagonal.
        act_order: quantize inputs in order of descending diag(H). Uses static groups: every group's
            parameters come from the original weight (groups stay contiguous in the original K order, as
            the packed layout without g_idx requires).
        observer: name in `OBSERVERS` ("minmax", "mse") or an observer function; chooses the clip range of
            each channel (per-channel, from the original weight) or group (per-group: when the group is
            reached, from its updated rows; with act_order: from the original weight).
        return_loss: also return the GPTQ objective.

    Returns:
        QuantizedWeight with a leading E=1 dim: qweight `[1, K, N]` int8 or `[1, K, N/8]` int32 (int4),
        scale / offset `[1, N]` or `[1, K/g, N]` in the stored dtype (offset None if symmetric). Results of
        several experts concatenate along dim 0 into a module's tensors.
        With return_loss: (QuantizedWeight, loss), loss a float = the sum of GPTQ's per-row losses, which
        equals `0.5 * tr(D^T H_d D)` for `D = w - w_hat` and the dampened Hessian H_d (over the live inputs:
        dead rows are zeroed first and cost nothing), i.e. about `||X w - X w_hat||_F^2 / n` for
        `H = 2 X^T X / n`, plus the dampening term. Summed over an expert's projections it ranks experts and
        layers by how much quantization moved their outputs on the calibration data.

    Raises:
        ValueError: bad shapes / dtypes, or a Hessian that stays non-positive-definite after dampening.
    """
    if w.dim() != 2:
        raise ValueError(f"gptq_quantize takes ONE expert's [K, N] weight, got shape {list(w.shape)}")
    if act_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"act_dtype must be bfloat16 or float16 (the kernel's activation dtypes), got {act_dtype}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    k, n = w.shape
    scheme.check_shape(k, n)
    obs = get_observer(observer) if isinstance(observer, str) else observer
    gs = scheme.group_size

    if hessian is not None and hessian.shape != (k, k):
        raise ValueError(f"hessian has shape {list(hessian.shape)}, expected [{k}, {k}] for a [{k}, {n}] weight")
    if hessian is None or not bool((hessian.diagonal() != 0).any()):
        # An expert no calibration token reached: GPTQ would zero every row (all inputs dead); RTN keeps it.
        logger.warning("gptq_quantize: no calibration inputs for this expert (empty Hessian); using round-to-nearest")
        clip_min, clip_max = obs(w.unsqueeze(0), scheme, act_dtype)
        qw = quantize_weight(w.unsqueeze(0), scheme, act_dtype, clip_min=clip_min, clip_max=clip_max)
        return (qw, 0.0) if return_loss else qw
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian has non-finite entries (inf / nan in the calibration inputs?)")

    W = w.detach().float().t().contiguous()  # [N, K]
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    dev = W.device

    # Static parameters (per-channel, or per-group with act_order): from the original weight, before dead
    # inputs are zeroed, like the reference implementation. row_scale / row_zp give each original row k its
    # parameters `[K, N]` (float32 scale, float32 zero point) so the loop only indexes.
    static = gs is None or act_order
    if static:
        scale_stored, zp_stored = _qparams(w.detach().float().unsqueeze(0), scheme, act_dtype, obs)
        group_of_row = torch.arange(k, device=dev) // gs if gs is not None else torch.zeros(k, dtype=torch.long, device=dev)
        params = scale_stored.float().reshape(-1, n)
        row_scale = params[group_of_row]
        row_zp = None if zp_stored is None else zp_stored.float().reshape(-1, n)[group_of_row]

    dead = H.diagonal() == 0
    H[dead, dead] = 1  # a dead input never reaches the output: any weight is optimal; zero it
    W[:, dead] = 0

    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
        if static:
            row_scale = row_scale[perm]
            row_zp = None if row_zp is None else row_zp[perm]

    Hinv = _upper_cholesky_of_inverse(H, damp)

    if gs is not None and block_size % gs:
        block_size = (block_size // gs + 1) * gs  # whole groups per block: see the docstring
    Q = torch.empty(n, k, dtype=torch.int8, device=dev)
    group_scales: list[Tensor] = []  # dynamic groups: stored-dtype scale [N] per group, in K order
    group_zps: list[Tensor] = []
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static:
                scale, zp = row_scale[col], None if row_zp is None else row_zp[col]
            else:
                if col % gs == 0:  # a new group: its rows [col, col+gs) lie in this block, all updated so far
                    s_g, z_g = _qparams(W1[:, i : i + gs].t().unsqueeze(0), scheme, act_dtype, obs)
                    group_scales.append(s_g.reshape(n))
                    group_zps.append(None if z_g is None else z_g.reshape(n))
                    scale = s_g.reshape(n).float()
                    zp = None if z_g is None else z_g.reshape(n).float()
            wcol = W1[:, i]
            # exactly primitives.quantize on the one-row weight [1, N] (per-channel form: params [N])
            q = quantize(wcol.unsqueeze(0), scale, zp, scheme.weight_bits).reshape(n)
            dq = (q.float() - zp) * scale if zp is not None else q.float() * scale
            Q[:, col] = q
            d = Hinv1[i, i]
            diff = wcol - dq
            loss += (diff.double() ** 2).sum() / (2 * d.double() ** 2)  # OBS cost of fixing this row
            err = diff / d
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # W1 -= err (x) Hinv1[i], no temporary
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the rows after this block

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    q_kn = Q.t().contiguous().unsqueeze(0)  # [1, K, N]
    if not static:
        scale_stored = torch.stack(group_scales).unsqueeze(0)  # [1, K/g, N], stored dtype
        zp_stored = None if group_zps[0] is None else torch.stack(group_zps).unsqueeze(0)
    qweight = pack_int4(q_kn) if scheme.weight_bits == 4 else q_kn
    offset = None if zp_stored is None else antiquant_offset(zp_stored, scale_stored.dtype)
    qw = QuantizedWeight(qweight=qweight, scale=scale_stored, offset=offset, scheme=scheme)
    return (qw, float(loss)) if return_loss else qw


def _qparams(wk: Tensor, scheme: QuantScheme, act_dtype: torch.dtype, obs: Observer) -> tuple[Tensor, Optional[Tensor]]:
    """Stored scale and int32 zero point of a `[1, rows, N]` weight under `scheme`, clip range from `obs`.

    Per-channel: `[1, N]`; per-group: `[1, rows/g, N]` (rows = g for one group). The same steps as
    quantize_weight: observer range (None = min/max), then `stored_qparams`.
    """
    clip_min, clip_max = obs(wk, scheme, act_dtype)
    if clip_min is None or clip_max is None:
        wmin, wmax = minmax(wk, scheme.group_size)
        clip_min = wmin if clip_min is None else clip_min
        clip_max = wmax if clip_max is None else clip_max
    return stored_qparams(clip_min.float(), clip_max.float(), scheme, act_dtype)


def _upper_cholesky_of_inverse(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of `(H + damp * mean(diag H) * I)^-1` (`U^T U`), float32 `[K, K]`.

    If a factorisation fails (H not positive definite after dampening), the dampening is multiplied by 10
    up to `_CHOLESKY_RETRIES` times; then a ValueError says which rule failed and what to do.
    """
    mean_diag = H.diagonal().mean()
    dampings = [damp] + [max(damp, _RETRY_DAMP_FLOOR) * 10**r for r in range(1, _CHOLESKY_RETRIES + 1)]
    for attempt, d in enumerate(dampings):
        Hd = H.clone()
        Hd.diagonal().add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                if attempt:
                    logger.warning("gptq_quantize: Hessian not positive definite with damp=%g; succeeded with damp=%g", damp, d)
                return U
    raise ValueError(
        "gptq_quantize: this expert's Hessian is not positive definite even with dampening "
        f"{dampings[-1]:g} x mean(diag H) (rule: an expert's GPTQ Hessian 2 X^T X / n plus damp * mean(diag H) * I "
        "must be positive definite, and mean(diag H) must be > 0). Give this expert more calibration tokens, "
        "raise damp, or quantize it with round-to-nearest (quantize_weight)."
    )


__all__ = ["accumulate_hessian", "gptq_quantize"]
