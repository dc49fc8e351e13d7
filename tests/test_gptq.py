"""GPTQ: the running Hessian, bit-exact RTN when H is diagonal, lower output error than RTN on correlated
inputs, the stored layout of quantize_weight, dead inputs, and the non-positive-definite path."""

from __future__ import annotations

import logging

import pytest
import torch

from gmmquant.calibrate.gptq import accumulate_hessian, gptq_quantize
from gmmquant.calibrate.observers import mse_clip_range
from gmmquant.kernels import unpack_int4
from gmmquant.pack import get_scheme, minmax, quant_range, quantize, quantize_weight
from gmmquant.pack.primitives import stored_qparams

from gmm_oracle import dequant_stacked

K, N, M = 128, 64, 512
BF16 = torch.bfloat16

SCHEMES = {
    "w8a16": get_scheme("w8a16"),
    "w4a16": get_scheme("w4a16"),  # per-channel asym
    "w4a16-g32": get_scheme("w4a16-g32"),
    "w4a16-g32-sym": get_scheme("w4a16-g32", symmetric=True),
    "w8a8-dynamic": get_scheme("w8a8-dynamic"),
}


def weight(seed: int = 0, k: int = K) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, N, generator=g) * 0.05


def correlated_inputs(seed: int = 0, m: int = M) -> torch.Tensor:
    """X = Z @ A with a random mixing A (correlated features) and a few outlier features scaled up."""
    g = torch.Generator().manual_seed(seed + 100)
    a = torch.randn(K, K, generator=g) / K**0.5
    x = torch.randn(m, K, generator=g) @ a
    x[:, [3, 50, 77]] *= 8
    return x


def codes(qw) -> torch.Tensor:
    """`[E, K, N]` int64 codes of a QuantizedWeight (int4 unpacked)."""
    q = qw.qweight
    return (unpack_int4(q) if q.dtype == torch.int32 else q).to(torch.int64)


def assert_same_tensors(a, b):
    assert a.qweight.dtype == b.qweight.dtype and torch.equal(a.qweight, b.qweight)
    assert a.scale.dtype == b.scale.dtype and torch.equal(a.scale, b.scale)
    assert (a.offset is None) == (b.offset is None)
    if a.offset is not None:
        assert a.offset.dtype == b.offset.dtype and torch.equal(a.offset, b.offset)


def output_error(x: torch.Tensor, w: torch.Tensor, qw) -> float:
    """float64 ||X w - X w_hat||_F for one expert."""
    return float((x.double() @ (w.double() - qw.dequantize(torch.float64)[0])).norm())


pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- accumulate_hessian


def test_accumulate_hessian_matches_float64_in_chunks():
    x = correlated_inputs(1, m=300)
    ref = 2 * x.double().t() @ x.double() / x.shape[0]
    h, n = accumulate_hessian(None, x, 0)
    assert n == 300 and h.dtype == torch.float32 and h.shape == (K, K)
    assert float((h.double() - ref).norm() / ref.norm()) < 1e-5
    h, n = None, 0
    for chunk in (x[:7], x[7:7], x[7:200].to(BF16).float(), x[200:]):  # an empty chunk; any row count
        h, n = accumulate_hessian(h, chunk, n)
    # the bf16 round trip is exact only for bf16 inputs: rebuild the float64 reference from what was fed
    fed = torch.cat([x[:7], x[7:200].to(BF16).float(), x[200:]]).double()
    ref = 2 * fed.t() @ fed / fed.shape[0]
    assert n == 300
    assert float((h.double() - ref).norm() / ref.norm()) < 1e-5


def test_accumulate_hessian_empty_and_errors():
    h, n = accumulate_hessian(None, torch.zeros(0, K), 0)
    assert n == 0 and h.shape == (K, K) and not h.any()
    x = correlated_inputs(2, m=16)
    h1, n1 = accumulate_hessian(None, x, 0)
    h2, n2 = accumulate_hessian(h1, x[:0], n1)
    assert n2 == n1 and torch.equal(h1, h2)
    # leading dims are rows: [B, S, K] equals the flattened [B*S, K]
    h3, n3 = accumulate_hessian(None, x.reshape(4, 4, K), 0)
    assert n3 == 16 and torch.allclose(h3, h1, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="expected"):
        accumulate_hessian(h1, torch.zeros(3, K + 1), n1)


# ---------------------------------------------------------------- diagonal H: exactly RTN


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["w8a16", "w4a16", "w4a16-g32", "w4a16-g32-sym", "w8a8-dynamic"])
def test_identity_hessian_is_rtn_bit_exact(name, act_order):
    scheme, w = SCHEMES[name], weight(3)
    rtn = quantize_weight(w.unsqueeze(0), scheme, BF16)
    got = gptq_quantize(w, 3.0 * torch.eye(K), scheme, BF16, act_order=act_order)
    assert_same_tensors(got, rtn)


def test_diagonal_hessian_is_rtn_bit_exact_with_permutation_fp16_and_odd_block():
    # a non-constant diagonal: act_order really permutes, errors still do not propagate (H^-1 is diagonal)
    g = torch.Generator().manual_seed(4)
    h = torch.diag(torch.rand(K, generator=g) + 0.1)
    w = weight(4)
    for name in ("w4a16", "w4a16-g32"):
        scheme = SCHEMES[name]
        rtn = quantize_weight(w.unsqueeze(0), scheme, torch.float16)
        for act_order in (False, True):
            # block_size 48 is not a multiple of 32: rounded up to whole groups
            got = gptq_quantize(w, h, scheme, torch.float16, act_order=act_order, block_size=48)
            assert_same_tensors(got, rtn)


@pytest.mark.parametrize("name", ["w4a16", "w4a16-g32"])
def test_identity_hessian_with_mse_observer_is_mse_rtn(name):
    # per-channel: params from the whole weight; per-group: each group's search on its own rows (unchanged
    # by GPTQ when H is diagonal) = the vectorised search over all groups
    scheme, w = SCHEMES[name], weight(5)
    lo, hi = mse_clip_range(w.unsqueeze(0), scheme, BF16)  # the observer's defaults, as gptq_quantize uses them
    rtn = quantize_weight(w.unsqueeze(0), scheme, BF16, clip_min=lo, clip_max=hi)
    got = gptq_quantize(w, torch.eye(K), scheme, BF16, observer="mse")
    assert_same_tensors(got, rtn)


# ---------------------------------------------------------------- correlated inputs: better than RTN


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["w4a16", "w4a16-g32", "w8a16"])
def test_gptq_output_error_below_rtn(name, act_order):
    scheme, w, x = SCHEMES[name], weight(6), correlated_inputs(6)
    h, _ = accumulate_hessian(None, x, 0)
    qw, loss = gptq_quantize(w, h, scheme, BF16, act_order=act_order, return_loss=True)
    rtn = quantize_weight(w.unsqueeze(0), scheme, BF16)
    ratio = output_error(x, w, qw) / output_error(x, w, rtn)
    assert ratio < 0.9, f"GPTQ/RTN output error {ratio:.3f}"
    # the reported loss is the GPTQ objective 0.5 tr(D^T H_d D), D = w - w_hat, H_d the dampened H
    d = w.double() - qw.dequantize(torch.float64)[0]
    hd = h.double() + 0.01 * h.diagonal().double().mean() * torch.eye(K, dtype=torch.float64)
    objective = 0.5 * float((d * (hd @ d)).sum())
    assert loss == pytest.approx(objective, rel=1e-3)


def test_gptq_with_mse_observer_below_rtn():
    scheme, w, x = SCHEMES["w4a16-g32"], weight(7), correlated_inputs(7)
    h, _ = accumulate_hessian(None, x, 0)
    rtn = quantize_weight(w.unsqueeze(0), scheme, BF16)
    for act_order in (False, True):
        qw = gptq_quantize(w, h, scheme, BF16, act_order=act_order, observer="mse")
        assert output_error(x, w, qw) < 0.9 * output_error(x, w, rtn)


# ---------------------------------------------------------------- against a textbook float64 GPTQ


def reference_gptq(w, h, scheme, act_dtype, *, act_order=False, damp=0.01):
    """Unblocked GPTQ in float64 (every remaining column updated after each one), as in the paper.

    Per-group without act_order: a group's parameters from its rows as updated when the group is reached;
    per-channel or act_order: from the original weight (static groups). Returns (`[K, N]` int64 codes,
    stored scale `[N]` / `[K/g, N]`).
    """
    k, n = w.shape
    gs = scheme.group_size
    static = gs is None or act_order
    if static:
        lo, hi = minmax(w.unsqueeze(0), gs)
        s_all, z_all = stored_qparams(lo, hi, scheme, act_dtype)
        s_all, z_all = s_all[0], None if z_all is None else z_all[0]
        grp = torch.arange(k) // gs if gs is not None else torch.zeros(k, dtype=torch.long)
    H = h.double().clone()
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(k)
    W = w.double().t()[:, perm].clone()
    H = H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.empty(n, k, dtype=torch.int64)
    scales = []
    for i in range(k):
        if static:
            sf = s_all.reshape(-1, n)[grp[perm[i]]].float()
            zf = None if z_all is None else z_all.reshape(-1, n)[grp[perm[i]]].float()
        elif i % gs == 0:
            lo, hi = minmax(W[:, i : i + gs].t().unsqueeze(0).float(), gs)
            s_g, z_g = stored_qparams(lo, hi, scheme, act_dtype)
            scales.append(s_g.reshape(n))
            sf, zf = s_g.reshape(n).float(), None if z_g is None else z_g.reshape(n).float()
        q = quantize(W[:, i].float().unsqueeze(0), sf, zf, scheme.weight_bits).reshape(n)
        dq = ((q.float() - zf) * sf if zf is not None else q.float() * sf).double()
        Q[:, i] = q
        err = (W[:, i] - dq) / U[i, i]
        W[:, i:] -= err.unsqueeze(1) * U[i, i:].unsqueeze(0)
    Q = Q[:, torch.argsort(perm)]
    return Q.t(), (s_all if static else torch.stack(scales))


@pytest.mark.parametrize(
    "name,act_order,block_size",
    [("w4a16-g32", False, 128), ("w4a16-g32", False, 32), ("w4a16-g32-sym", False, 64), ("w4a16-g32", True, 32),
     ("w4a16", False, 32), ("w4a16", True, 128), ("w8a16", True, 32)],
)
def test_matches_float64_textbook_gptq(name, act_order, block_size):
    # Blocked lazy updates in float32 vs unblocked float64: the same codes and group parameters (a code
    # on a rounding boundary may flip between the two precisions: allow 1%). A group's parameters taken
    # from stale (not yet updated) rows would make about 70% of the codes and 30% of the scales agree.
    scheme, w, x = SCHEMES[name], weight(17), correlated_inputs(17)
    h, _ = accumulate_hessian(None, x, 0)
    qw = gptq_quantize(w, h, scheme, BF16, act_order=act_order, block_size=block_size)
    q_ref, s_ref = reference_gptq(w, h, scheme, BF16, act_order=act_order)
    assert (codes(qw)[0] == q_ref).double().mean() >= 0.99
    assert qw.scale[0].dtype == s_ref.dtype
    assert (qw.scale[0] == s_ref).double().mean() >= 0.99


# ---------------------------------------------------------------- stored tensors


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_codes_in_range_and_dequantize_exactly(name, act_order):
    scheme, w, x = SCHEMES[name], weight(8), correlated_inputs(8)
    h, _ = accumulate_hessian(None, x, 0)
    qw = gptq_quantize(w, h, scheme, BF16, act_order=act_order)
    stored = BF16
    assert qw.scale.dtype == stored and (qw.offset is None or qw.offset.dtype == stored)
    q = codes(qw)
    qmin, qmax = quant_range(scheme.weight_bits, scheme.symmetric)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    # (q - zero_point) * scale in float64 from the stored tensors == the kernel-side dequantization
    ref = dequant_stacked(qw)
    assert torch.equal(qw.dequantize(torch.float32).double(), ref)
    assert torch.equal(qw.dequantize(torch.float64), ref)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["w8a16", "w4a16", "w4a16-g32", "w8a8-dynamic"])
def test_concatenated_experts_match_quantize_weight_layout(name, act_order):
    scheme = SCHEMES[name]
    ws = [weight(9), weight(10)]
    hs = [accumulate_hessian(None, correlated_inputs(s), 0)[0] for s in (9, 10)]
    for act_dtype in (BF16, torch.float16):
        parts = [gptq_quantize(w, h, scheme, act_dtype, act_order=act_order) for w, h in zip(ws, hs)]
        ref = quantize_weight(torch.stack(ws), scheme, act_dtype)
        qweight = torch.cat([p.qweight for p in parts])
        scale = torch.cat([p.scale for p in parts])
        assert qweight.shape == ref.qweight.shape and qweight.dtype == ref.qweight.dtype
        assert scale.shape == ref.scale.shape and scale.dtype == ref.scale.dtype
        if ref.offset is None:
            assert all(p.offset is None for p in parts)
        else:
            offset = torch.cat([p.offset for p in parts])
            assert offset.shape == ref.offset.shape and offset.dtype == ref.offset.dtype


# ---------------------------------------------------------------- dead inputs, empty experts, bad Hessians


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["w4a16", "w4a16-g32", "w8a16"])
def test_dead_inputs_zeroed_and_rest_still_better(name, act_order):
    scheme, w, x = SCHEMES[name], weight(11), correlated_inputs(11)
    dead = [0, 17, 40, 41, 100]
    x[:, dead] = 0
    h, _ = accumulate_hessian(None, x, 0)
    assert (h.diagonal()[dead] == 0).all()
    qw = gptq_quantize(w, h, scheme, BF16, act_order=act_order)
    dq = qw.dequantize()[0]
    assert torch.isfinite(dq).all()
    assert (dq[dead] == 0).all()  # a dead input's row is zeroed, and zero is exact (q == zero point)
    rtn = quantize_weight(w.unsqueeze(0), scheme, BF16)
    assert output_error(x, w, qw) < 0.9 * output_error(x, w, rtn)


@pytest.mark.parametrize("hessian", ["none", "zeros"])
def test_expert_without_tokens_falls_back_to_rtn(hessian, caplog):
    scheme, w = SCHEMES["w4a16-g32"], weight(12)
    h = None if hessian == "none" else torch.zeros(K, K)
    with caplog.at_level(logging.WARNING, logger="gmmquant.calibrate.gptq"):
        qw, loss = gptq_quantize(w, h, scheme, BF16, return_loss=True)
    assert "round-to-nearest" in caplog.text
    assert loss == 0.0
    assert_same_tensors(qw, quantize_weight(w.unsqueeze(0), scheme, BF16))


def test_indefinite_hessian_retried_with_more_damping(caplog):
    # one negative curvature: fails with damp 0 and 0.01, succeeds at 0.1 x mean(diag)
    h = torch.eye(K)
    h[5, 5] = -0.05
    w = weight(13)
    with caplog.at_level(logging.WARNING, logger="gmmquant.calibrate.gptq"):
        qw = gptq_quantize(w, h, SCHEMES["w4a16"], BF16, damp=0.0)
    assert "succeeded with damp=0.1" in caplog.text
    assert torch.isfinite(qw.dequantize()).all()


def test_hessian_never_positive_definite_raises():
    with pytest.raises(ValueError, match=r"not positive definite.*round-to-nearest"):
        gptq_quantize(weight(14), -torch.eye(K), SCHEMES["w4a16"], BF16)


def test_rank_deficient_hessian_without_damping():
    # 16 tokens for 128 inputs: H has rank 16. With damp=0 the factorisation either fails and is retried
    # with more damping, or raises the documented error; it never returns non-finite weights.
    x = correlated_inputs(15, m=16)
    h, _ = accumulate_hessian(None, x, 0)
    w = weight(15)
    try:
        qw = gptq_quantize(w, h, SCHEMES["w4a16-g32"], BF16, damp=0.0)
    except ValueError as exc:
        assert "positive definite" in str(exc)
    else:
        assert torch.isfinite(qw.dequantize()).all()
        q = codes(qw)
        assert int(q.min()) >= -8 and int(q.max()) <= 7


def test_argument_errors():
    w, h = weight(16), torch.eye(K)
    with pytest.raises(ValueError, match=r"ONE expert's \[K, N\]"):
        gptq_quantize(w.unsqueeze(0), h, SCHEMES["w8a16"], BF16)
    with pytest.raises(ValueError, match="expected"):
        gptq_quantize(w, torch.eye(K + 1), SCHEMES["w8a16"], BF16)
    with pytest.raises(ValueError, match="act_dtype"):
        gptq_quantize(w, h, SCHEMES["w8a16"], torch.float32)
    with pytest.raises(ValueError, match="non-finite"):
        bad = h.clone()
        bad[1, 2] = float("nan")
        gptq_quantize(w, bad, SCHEMES["w8a16"], BF16)
    with pytest.raises(ValueError, match="unknown observer"):
        gptq_quantize(w, h, SCHEMES["w8a16"], BF16, observer="nope")
