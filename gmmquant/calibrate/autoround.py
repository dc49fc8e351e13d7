"""Learned rounding and clipping for one expert (the idea of Cheng et al., 2023, "Optimize Weight Rounding via
Signed Gradient Descent"), written for gmmquant's storage layout.

Round-to-nearest picks each code independently; what matters is the expert's output. Here, per expert, a
rounding offset `V` `[K, N]` in [-0.5, 0.5] (code = round(w / s + V)) and clip factors `alpha` (on the range's
max) and `beta` (on its min) `[G, N]` in [min_clip, 1] per group / channel are learned for ALL the expert's
projections together, minimising the mean squared error of the expert's output on its routed tokens:

    || act(x_q @ Wq_1 + b_1) ... @ Wq_2 + b_2  -  (the same in float) ||^2

through the model's real gate / activation. `round` passes gradients straight through (STE); the step is
signed gradient descent `p -= lr_t * sign(grad)` with `lr_t` decaying linearly from `lr` to 0, and the
parameters with the lowest loss seen are kept. For W4A8 (dynamic per-token int8 activations) the inputs of
each projection are fake-quantized per token in the loop (STE), as the kernel will see them.

Scale and zero point in the loop are the stored ones (`pack.primitives.stored_scale`, `zero_point_for`, with
the stored-dtype rounding passed straight through), and the final codes come from `primitives.quantize` on
`w + V * scale`: the checkpoint dequantizes exactly to the weights whose loss was measured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..kernels import pack_int4
from ..pack.primitives import (
    QuantizedWeight,
    antiquant_offset,
    minmax,
    quant_range,
    quantize,
    stored_qparams,
    stored_scale,
    zero_point_for,
)
from ..pack.schemes import QuantScheme

logger = logging.getLogger(__name__)

Act = Callable[[Tensor], Tensor]


@dataclass
class ARLayer:
    """One projection of an expert, as the loop sees it.

    Attributes:
        w: `[K, N]` float32 base weight (y = x @ w): the float weight, or a GPTQ-dequantized start.
        bias: `[N]` float32 or None.
    """

    w: Tensor
    bias: Optional[Tensor] = None


def _ste_round(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quant_tokens(x: Tensor) -> Tensor:
    """Symmetric int8 per-token fake quantization of `[M, K]` activations (dynamic_quant's rule: scale =
    max|x| / 127 per row), gradients passed straight through."""
    scale = (x.detach().abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(1e-12)
    return x + (torch.clamp(torch.round(x.detach() / scale), -127, 127) * scale - x.detach())


def _base_range(w: Tensor, gs: Optional[int]) -> tuple[Tensor, Tensor]:
    """`[G, N]` range of w that always holds 0 (as choose_qparams widens it): G = 1 per-channel, K/g per-group."""
    wmin, wmax = minmax(w.unsqueeze(0), gs)
    wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
    return wmin.reshape(-1, w.shape[1]), wmax.reshape(-1, w.shape[1])


def _qparams(wmin: Tensor, wmax: Tensor, scheme: QuantScheme, act_dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor]]:
    """Differentiable stored scale (float32 `[G, N]`) and float zero point (or None): choose_qparams +
    stored_qparams, with the stored-dtype rounding and the zero point's round passed straight through."""
    qmin, qmax = quant_range(scheme.weight_bits, scheme.symmetric)
    tiny = torch.finfo(torch.float32).tiny
    if scheme.symmetric:
        scale = torch.maximum(-wmin, wmax) / qmax
    else:
        scale = (wmax - wmin) / (qmax - qmin)
    scale = torch.where(scale.detach() > tiny, scale, torch.ones_like(scale))
    stored = stored_scale(scale.detach(), scheme, act_dtype).float()
    scale = scale + (stored - scale).detach()
    if scheme.symmetric:
        return scale, None
    zp = zero_point_for(wmin.detach(), stored, scheme.weight_bits).float()
    # straight-through for the zero point: its value is the stored one, its gradient that of qmin - wmin / s
    soft = qmin - wmin / scale
    return scale, soft + (zp - soft).detach()


def _fake_quant(w: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, wmin: Tensor, wmax: Tensor, scheme: QuantScheme,
                act_dtype: torch.dtype) -> Tensor:
    """`[K, N]` dequantized weight for rounding offset v `[K, N]` and clip factors alpha / beta `[G, N]`."""
    gs = scheme.group_size
    qmin, qmax = quant_range(scheme.weight_bits, scheme.symmetric)
    scale, zp = _qparams(wmin * beta, wmax * alpha, scheme, act_dtype)
    k, n = w.shape
    g = w.reshape(-1, gs, n) if gs else w.reshape(1, k, n)
    vg = v.reshape(g.shape)
    s = scale.unsqueeze(1)
    # the same expression the final quantize() evaluates: round((w + v * s) / s) (+ zp), clamped
    q = _ste_round((g + vg * s) / s)
    if zp is not None:
        q = q + zp.unsqueeze(1)
    q = torch.clamp(q, qmin, qmax)
    dq = (q - zp.unsqueeze(1)) * s if zp is not None else q * s
    return dq.reshape(k, n)


def final_quantize(w: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, scheme: QuantScheme,
                   act_dtype: torch.dtype) -> QuantizedWeight:
    """The stored tensors for learned (v, alpha, beta), all from `pack.primitives`.

    Args:
        w: `[K, N]` float32 base weight; v: `[K, N]` float32 rounding offsets; alpha, beta: `[G, N]` clip
            factors on max / min (G = 1 per-channel, K/g per-group).

    Returns:
        QuantizedWeight with a leading E=1 dim, as `quantize_weight` returns it.
    """
    gs = scheme.group_size
    wmin, wmax = _base_range(w, gs)
    lo, hi = wmin * beta, wmax * alpha
    shape = (1, -1, w.shape[1]) if gs else (1, w.shape[1])
    scale, zp = stored_qparams(lo.reshape(shape), hi.reshape(shape), scheme, act_dtype)
    s_full = scale.float().reshape(-1, w.shape[1]).repeat_interleave(gs if gs else w.shape[0], dim=0)
    shifted = (w + v * s_full).unsqueeze(0)  # round((w + v s) / s) = round(w / s + v)
    q = quantize(shifted, scale.float(), zp, scheme.weight_bits, gs)
    qweight = pack_int4(q) if scheme.weight_bits == 4 else q
    offset = None if zp is None else antiquant_offset(zp, scale.dtype)
    return QuantizedWeight(qweight=qweight, scale=scale, offset=offset, scheme=scheme)


def _forward(x: Tensor, layers: list[ARLayer], weights: list[Tensor], act: Optional[Act], quant_act: bool) -> Tensor:
    h = x
    for i, (layer, w) in enumerate(zip(layers, weights)):
        if i:
            h = act(h)
        if quant_act:
            h = fake_quant_tokens(h)
        h = h @ w
        if layer.bias is not None:
            h = h + layer.bias
    return h


@dataclass
class AutoRoundResult:
    """Per projection: the stored tensors; the loss (mean squared output error) at the start (RTN of the
    base weights) and of the kept parameters."""

    quantized: list[QuantizedWeight]
    loss_start: float
    loss_best: float


def autoround_expert(
    x: Tensor,
    layers: list[ARLayer],
    act: Optional[Act],
    scheme: QuantScheme,
    act_dtype: torch.dtype,
    *,
    target: Optional[list[Tensor]] = None,
    iters: int = 200,
    lr: Optional[float] = None,
    min_clip: float = 0.5,
    learn_clip: bool = True,
    quant_act: bool = False,
    batch_rows: int = 0,
    row_weights: Optional[Tensor] = None,
    target_inputs: Optional[Tensor] = None,
) -> AutoRoundResult:
    """Learn rounding and clipping of one expert's projections together.

    Args:
        x: `[M, K0]` float inputs of the first projection (the expert's routed tokens, M >= 1).
        layers: the projections in order (gate_up / up, then down), `act` applied between consecutive ones.
        act: the expert's gate / activation on the canonical `[M, N]` intermediate (None with one layer).
        scheme, act_dtype: the weight scheme and the model's activation dtype (decides stored scale dtypes).
        target: float weights `[K, N]` whose output is the reference (default: the layers' own `w`; with a
            GPTQ start the base differs from the float weights).
        iters: signed-gradient steps; lr: initial step (default 1 / iters), decayed linearly to 0.
        min_clip: lower bound of the clip factors alpha, beta (1 = no clipping learned).
        learn_clip: learn alpha / beta (else fixed at 1: rounding only).
        quant_act: fake-quantize each projection's input per token int8 (W4A8 / W8A8 dynamic).
        batch_rows: rows per step (0 = all): step t uses the t-th slice of x, cycling (cost per step
            scales with the rows; the best parameters are picked by the loss of their step's rows).
        row_weights: optional `[M]` non-negative weights c of the rows: the loss is then the c-weighted mean
            of the rows' squared errors (router-weighted calibration passes c = p^2, p the router weight).
        target_inputs: optional `[M, K0]` inputs of the reference: the same tokens in the float model
            (float-stream targets). The quantized expert on `x` then learns to give the float model's
            output, absorbing the error earlier quantized layers left in its inputs. Default: `x`.

    Returns:
        AutoRoundResult; the kept parameters are never worse on all of x than the start (RTN of the base
        weights): a final check on every row keeps the start otherwise.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"autoround_expert needs [M, K] inputs with M >= 1, got {list(x.shape)}")
    if len(layers) > 1 and act is None:
        raise ValueError("autoround_expert: several projections need the activation between them")
    lr = 1.0 / max(iters, 1) if lr is None else lr
    x = x.float()
    if row_weights is not None:
        row_weights = row_weights.float().reshape(-1).to(x.device)
        if row_weights.shape[0] != x.shape[0] or bool((row_weights < 0).any()) or float(row_weights.sum()) <= 0:
            raise ValueError(f"autoround_expert: row_weights must be [{x.shape[0]}], non-negative, not all zero")
    gs = scheme.group_size
    ref_w = [t.float() for t in target] if target is not None else [layer.w for layer in layers]
    if target_inputs is not None and target_inputs.shape != x.shape:
        raise ValueError(f"autoround_expert: target_inputs must match x {list(x.shape)}, got {list(target_inputs.shape)}")
    with torch.no_grad():  # the float expert (activations unquantized), on the float stream's rows if given
        ref = _forward(x if target_inputs is None else target_inputs.float().to(x.device), layers, ref_w, act, False)
    ranges = [_base_range(layer.w, gs) for layer in layers]
    vs = [torch.zeros_like(layer.w, requires_grad=True) for layer in layers]
    alphas = [torch.ones_like(r[0], requires_grad=learn_clip) for r in ranges]
    betas = [torch.ones_like(r[0], requires_grad=learn_clip) for r in ranges]
    params = vs + (alphas + betas if learn_clip else [])
    m = x.shape[0]
    rows = m if batch_rows <= 0 else min(batch_rows, m)
    starts = list(range(0, m - rows + 1, rows)) or [0]

    def loss_of(state: list[Tensor], xb: Tensor, refb: Tensor, cb: Optional[Tensor]) -> Tensor:
        n = len(layers)
        weights = [_fake_quant(layer.w, v, a, b, lo, hi, scheme, act_dtype)
                   for layer, v, a, b, (lo, hi) in zip(layers, state[:n], state[n : 2 * n], state[2 * n :], ranges)]
        err = (_forward(xb, layers, weights, act, quant_act) - refb).pow(2)
        if cb is None:
            return err.mean()
        return (err.mean(dim=-1) * cb).sum() / cb.sum().clamp_min(1e-30)

    def weights_of(s0: int, count: int) -> Optional[Tensor]:
        return None if row_weights is None else row_weights[s0 : s0 + count]

    start_state = [p.detach().clone() for p in vs + alphas + betas]
    best, best_value = start_state, float("inf")
    for step in range(iters + 1):  # step `iters` only evaluates the last update
        s0 = starts[step % len(starts)]
        loss = loss_of(vs + alphas + betas, x[s0 : s0 + rows], ref[s0 : s0 + rows], weights_of(s0, rows))
        value = float(loss.detach())
        if value < best_value:  # strict: ties keep the earlier (RTN first) parameters
            best_value, best = value, [p.detach().clone() for p in vs + alphas + betas]
        if step == iters:
            break
        grads = torch.autograd.grad(loss, params)
        step_lr = lr * (1.0 - step / iters)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(step_lr * torch.sign(g))
            for v in vs:
                v.clamp_(-0.5, 0.5)
            if learn_clip:
                for p in alphas + betas:
                    p.clamp_(min_clip, 1.0)
    with torch.no_grad():  # judge on every row: a minibatch's best may not be the best overall
        loss_start = float(loss_of(start_state, x, ref, row_weights))
        loss_best = float(loss_of(best, x, ref, row_weights)) if best is not start_state else loss_start
    if loss_best > loss_start:
        best, loss_best = start_state, loss_start
    n = len(layers)
    vs_b, al_b, be_b = best[:n], best[n : 2 * n], best[2 * n :]
    quantized = [final_quantize(layer.w, v, a, b, scheme, act_dtype) for layer, v, a, b in zip(layers, vs_b, al_b, be_b)]
    return AutoRoundResult(quantized, loss_start, loss_best)


def _sample_index(m: int, max_rows: int, seed: int, device) -> Tensor:
    """int64 indices of at most `max_rows` of `m` rows, chosen by a seeded generator (deterministic), sorted;
    the rows, their router weights and their float-stream twins are all taken with them."""
    if m <= max_rows:
        return torch.arange(m, device=device)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(m, generator=gen)[:max_rows].sort().values.to(device)




# --- one experts module -------------------------------------------------------------------------------------

def expert_activation(module, info) -> Optional[Act]:
    """The activation between an experts module's first projection and down_proj, on the CANONICAL (gate then
    up) intermediate: the model's own gate, re-interleaved for GPT-OSS-style interleaved gate_up; None when the
    module is not a (gate_up | up) -> down pair with a known activation."""
    from ..runtime.experts import gate_function

    projs = list(info.projections)
    if len(projs) != 2 or projs[1] != "down_proj":
        return None
    if projs[0] == "gate_up_proj":
        fn = gate_function(module)
        if fn is None or info.is_concatenated:
            return fn

        def interleaved(h: Tensor) -> Tensor:  # canonical gate|up -> the g0 u0 g1 u1 ... order fn expects
            half = h.shape[-1] // 2
            return fn(torch.stack([h[..., :half], h[..., half:]], dim=-1).reshape(h.shape))
        return interleaved
    return getattr(module, "act_fn", None)


def autoround_module(module, info, stats, recipe, act_dtype: torch.dtype, fallback: list[bool], *,
                     path: str) -> dict[str, list[Optional[QuantizedWeight]]]:
    """Learned rounding for every expert of one experts module that has calibration rows.

    Args:
        module, info: the float experts module and its layout.
        stats: `ExpertsStats` with sampled first-projection rows (`InputStats.samples`) and, for
            `autoround.init: gptq`, Hessians (consumed here).
        recipe: the recipe (`autoround` and `gptq` sections, the scheme).
        fallback: per expert, True where it saw too few tokens: left to RTN (None in the result).

    Returns:
        projection -> per-expert QuantizedWeight (E=1 each) or None (the caller rounds that one to nearest).
    """
    from ..pack.layouts import expert_bias, expert_weight
    from .gptq import gptq_quantize

    scheme = recipe.quant_scheme()
    s = recipe.autoround
    projs = list(info.projections)
    act = expert_activation(module, info)
    chains = [projs] if act is not None else [[p] for p in projs]  # no known activation: each projection alone
    weights = {p: expert_weight(module, info, p) for p in projs}
    biases = {p: expert_bias(module, info, p) for p in projs}
    out: dict[str, list[Optional[QuantizedWeight]]] = {p: [None] * info.num_experts for p in projs}
    quant_act = scheme.activation == "dynamic"
    for e in range(info.num_experts):
        if fallback[e]:
            continue
        for chain in chains:
            x = stats.inputs[chain[0]][e].samples
            if x is None or x.shape[0] == 0:
                logger.warning("%s[%d].%s: no sampled rows for learned rounding; round-to-nearest", path, e, chain[0])
                continue
            layers, target = [], []
            for p in chain:
                w = weights[p][e].detach().float()
                b = None if biases[p] is None else biases[p][e].detach().float()
                base = w
                if s.init == "gptq":
                    g = recipe.gptq
                    h = stats.inputs[p][e].hessian
                    qw = gptq_quantize(w, h, scheme, act_dtype, block_size=g.block_size, damp=g.damp,
                                       act_order=g.act_order, observer=recipe.observer)
                    base = qw.dequantize()[0]
                    stats.inputs[p][e].hessian = None
                layers.append(ARLayer(base, b))
                target.append(w)
            st = stats.inputs[chain[0]][e]
            p, twin = st.sample_weights, st.sample_targets  # router weights, float-stream rows (if collected)
            st.samples = st.sample_weights = st.sample_targets = None  # freed with this expert
            keep = _sample_index(x.shape[0], s.max_rows, s.seed, weights[chain[0]].device)
            x = x.to(weights[chain[0]].device)[keep]
            twin = None if twin is None else twin.to(keep.device)[keep]
            c = None if p is None else p.to(keep.device)[keep].pow(2)
            if c is not None and float(c.sum()) <= 0:
                c = None  # every kept token had router weight 0: nothing to weigh by, fit them equally
            result = autoround_expert(x, layers, act if len(chain) > 1 else None, scheme, act_dtype, target=target,
                                      iters=s.iters, lr=s.lr, min_clip=s.min_clip, learn_clip=s.learn_clip,
                                      quant_act=quant_act, batch_rows=s.batch_rows, row_weights=c, target_inputs=twin)
            logger.info("%s[%d] %s: learned rounding loss %.4g -> %.4g", path, e, "+".join(chain), result.loss_start,
                        result.loss_best)
            for p, qw in zip(chain, result.quantized):
                out[p][e] = qw
    return out


__all__ = ["ARLayer", "AutoRoundResult", "autoround_expert", "autoround_module", "expert_activation",
           "fake_quant_tokens", "final_quantize"]
