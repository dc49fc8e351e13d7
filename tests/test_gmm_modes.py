"""Every scenario and dtype row of npu_grouped_matmul, on every CPU-runnable backend, against float64.

Each case states the output dtype the spec's tables require; the float64 oracle (tests/gmm_oracle.py) is
independent of gmmquant's code. Every grouped case has at least one empty group.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

from gmm_oracle import assert_matches, oracle_gmm
from gmmquant.kernels import grouped_matmul, pack_int4, trans_quant_param

BACKENDS = ["reference", "cpu"]
K, N = 64, 48
COUNTS = [5, 0, 9, 3, 0, 7]  # six experts, two of them empty
M = sum(COUNTS)
E = len(COUNTS)


@dataclass
class Case:
    name: str
    build: Callable[[torch.Generator], dict[str, Any]]
    out_dtype: torch.dtype
    tags: set = field(default_factory=set)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def rand_int8(g, *shape):
    return torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)


def rand_int4(g, *shape):
    return torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)


def group_list_for(counts, kind):
    """counts -> the group_list argument: 'list' (List[int] cumsum), 0 (cumsum), 1 (counts), 2 (pairs)."""
    cumsum = torch.tensor(counts).cumsum(0).tolist()
    if kind == "list":
        return cumsum
    if kind == 0:
        return torch.tensor(cumsum, dtype=torch.int64)
    if kind == 1:
        return torch.tensor(counts, dtype=torch.int64)
    # pairs: only the non-empty experts, in a shuffled order, then a (0, 0) terminator
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------- float

def float_sss(dtype, glt, bias):
    def build(g):
        bias_dtype = torch.float16 if dtype == torch.float16 else torch.float32
        return dict(
            x=[randn(g, M, K, dtype=dtype)], weight=[randn(g, E, K, N, dtype=dtype, scale=K**-0.5)],
            bias=[randn(g, E, N, dtype=bias_dtype)] if bias else None,
            group_list=group_list_for(COUNTS, glt), group_list_type=glt, group_type=0, split_item=2,
        )
    return Case(f"float-sss-{dtype}-glt{glt}-bias{int(bias)}", build, dtype, {"cpu_fast"})


def float_single_multi_single(dtype, api):
    def build(g):
        ws = [randn(g, K, N, dtype=dtype, scale=K**-0.5) for _ in COUNTS]
        kw = dict(x=[randn(g, M, K, dtype=dtype)], weight=ws, split_item=3)
        if api == "list":
            kw.update(group_list=group_list_for(COUNTS, "list"))
        else:
            kw.update(group_list=group_list_for(COUNTS, 1), group_list_type=1, group_type=0)
        return kw
    return Case(f"float-single-multi-single-{api}-{dtype}", build, dtype)


def float_single_multi_multi(dtype):
    def build(g):
        ns = [N, 16, 32, N, 8, 24]
        ws = [randn(g, K, n, dtype=dtype, scale=K**-0.5) for n in ns]
        return dict(x=[randn(g, M, K, dtype=dtype)], weight=ws, group_list=group_list_for(COUNTS, "list"), split_item=1)
    return Case(f"float-single-multi-multi-list-{dtype}", build, dtype, {"multi_out"})


def float_multi_multi_single(dtype, api):
    def build(g):
        xs = [randn(g, c, K, dtype=dtype) for c in COUNTS]
        ws = [randn(g, K, N, dtype=dtype, scale=K**-0.5) for _ in COUNTS]
        kw = dict(x=xs, weight=ws, split_item=2)
        if api == "list":
            kw.update(group_list=group_list_for(COUNTS, "list"))
        else:
            kw.update(group_list=group_list_for(COUNTS, 0), group_list_type=0, group_type=0)
        return kw
    return Case(f"float-multi-multi-single-{api}-{dtype}", build, dtype)


def float_multi_multi_multi(dtype, api, rank):
    def build(g):
        lead = [(3, 2), (1, 4), (2, 0)] if rank == 3 else [(6,), (0,), (4,)]
        ns = [N, 16, 8]
        xs = [randn(g, *ld, K, dtype=dtype) for ld in lead]
        ws = [randn(g, K, n, dtype=dtype, scale=K**-0.5) for n in ns]
        kw = dict(x=xs, weight=ws, split_item=0)
        if api == "tensor":
            kw.update(group_type=-1)
        return kw
    return Case(f"float-multi-multi-multi-{api}-{rank}d-{dtype}", build, dtype, {"multi_out"})


def float_k_split(dtype, glt):
    def build(g):
        counts = [16, 0, 24, 8, 0, 16]
        kk = sum(counts)
        xt = randn(g, kk, 12, dtype=dtype)  # stored [K, M]; passed as the transposed view [M, K]
        return dict(x=[xt.t()], weight=[randn(g, kk, N, dtype=dtype, scale=kk**-0.5)],
                    group_list=group_list_for(counts, glt), group_list_type=glt, group_type=2, split_item=2)
    return Case(f"float-ksplit-{dtype}-glt{glt}", build, dtype)


# ------------------------------------------------------------------------------------ int8 full quant

def quant_per_channel(scale_dtype, api, bias_kind):
    out = {torch.int64: torch.int8, torch.bfloat16: torch.bfloat16, torch.float32: torch.float16}[scale_dtype]

    def build(g):
        x = rand_int8(g, M, K)
        raw_scale = torch.rand(E, N, generator=g) * 0.5 / (127 * K**0.5) + 1e-4
        if scale_dtype == torch.int64:
            raw_scale = raw_scale * 200
            scale = trans_quant_param(raw_scale.reshape(-1)).reshape(E, N)
        else:
            scale = raw_scale.to(scale_dtype)
        if bias_kind == "int32":
            bias = torch.randint(-5000, 5000, (E, N), generator=g, dtype=torch.int32)
        elif bias_kind == "float":
            bias = randn(g, E, N, dtype=torch.float32)
        else:
            bias = None
        kw = dict(x=[x], split_item=2, bias=None if bias is None else [bias],
                  output_dtype=None if out == torch.int8 else out)
        if api == "list":
            kw.update(weight=[rand_int8(g, K, N) for _ in COUNTS], scale=list(scale.unbind(0)),
                      group_list=group_list_for(COUNTS, "list"))
            if bias is not None:
                kw["bias"] = list(bias.unbind(0))
        else:
            kw.update(weight=[rand_int8(g, E, K, N)], scale=[scale], group_list=group_list_for(COUNTS, 1),
                      group_list_type=1, group_type=0)
        return kw
    return Case(f"quant-per-channel-{scale_dtype}-{api}-bias_{bias_kind}", build, out, {"cpu_fast"})


def quant_per_token(scale_dtype, act_type, bias_kind, glt=1):
    out = {torch.bfloat16: torch.bfloat16, torch.float32: torch.float16}[scale_dtype]

    def build(g):
        x = rand_int8(g, M, K)
        scale = (torch.rand(E, N, generator=g) * 2 / (127 * K**0.5) + 1e-3).to(scale_dtype)
        pts = torch.rand(M, generator=g) / 127 + 1e-3
        bias = None
        if bias_kind == "int32":
            bias = [torch.randint(-3000, 3000, (E, N), generator=g, dtype=torch.int32)]
        elif bias_kind == "float":
            bias = [randn(g, E, N, dtype=torch.float32)]
        if glt == 2:
            nonempty = [(e, c) for e, c in enumerate(COUNTS) if c]
            order = torch.randperm(len(nonempty), generator=g).tolist()
            pairs = [list(nonempty[i]) for i in order] + [[0, 0], [3, 4]]  # rows after (0, 0) are ignored
            group_list = torch.tensor(pairs, dtype=torch.int64)
        else:
            group_list = group_list_for(COUNTS, glt)
        return dict(x=[x], weight=[rand_int8(g, E, K, N)], scale=[scale], per_token_scale=[pts], bias=bias,
                    group_list=group_list, group_list_type=glt, group_type=0, split_item=2,
                    act_type=act_type, output_dtype=out)
    return Case(f"quant-per-token-{scale_dtype}-act{act_type}-bias_{bias_kind}-glt{glt}", build, out, {"cpu_fast"})


def quant_int32_out():
    def build(g):
        return dict(x=[rand_int8(g, M, K)], weight=[rand_int8(g, E, K, N)], group_list=group_list_for(COUNTS, 0),
                    group_list_type=0, group_type=0, split_item=3, output_dtype=torch.int32)
    return Case("quant-int32-out", build, torch.int32, {"cpu_fast"})


# ------------------------------------------------------------------------------------ weight-only

def antiquant(bits, dtype, granularity, asym, scenario, bias=False, group_size=32):
    groups = K // group_size if granularity == "group" else None

    def params(g, lead):
        shape = lead + ((groups,) if groups else ()) + (N,)
        s = (torch.rand(*shape, generator=g) * 0.02 + 0.005).to(dtype)
        o = randn(g, *shape, dtype=dtype, scale=2.0) if asym else None
        return s, o

    def weight(g, lead):
        if bits == 8:
            return rand_int8(g, *lead, K, N)
        return pack_int4(rand_int4(g, *lead, K, N))

    def build(g):
        bias_dtype = torch.float16 if dtype == torch.float16 else torch.float32
        if scenario == "sss":
            s, o = params(g, (E,))
            kw = dict(x=[randn(g, M, K, dtype=dtype)], weight=[weight(g, (E,))], antiquant_scale=[s],
                      group_list=group_list_for(COUNTS, 1), group_list_type=1, group_type=0, split_item=2)
            if bias:
                kw["bias"] = [randn(g, E, N, dtype=bias_dtype)]
            kw["antiquant_offset"] = None if o is None else [o]
            return kw
        ws, ss, os_ = [], [], []
        for _ in COUNTS:
            ws.append(weight(g, ()))
            s, o = params(g, ())
            ss.append(s)
            os_.append(o)
        kw = dict(x=[randn(g, M, K, dtype=dtype)], weight=ws, antiquant_scale=ss,
                  antiquant_offset=os_ if asym else None, split_item=2)
        if scenario == "list":
            kw.update(group_list=group_list_for(COUNTS, "list"))
        else:
            kw.update(group_list=group_list_for(COUNTS, 0), group_list_type=0, group_type=0)
        if bias:
            kw["bias"] = [randn(g, N, dtype=bias_dtype) for _ in COUNTS]
        return kw
    name = f"antiquant-int{bits}-{dtype}-{granularity}{group_size if groups else ''}-{'asym' if asym else 'sym'}-{scenario}-bias{int(bias)}"
    # The CPU int4 kernel takes group sizes 32..256 and N % 16 == 0; smaller groups use the reference math.
    fast = bits == 8 or group_size >= 32
    return Case(name, build, dtype, {"cpu_fast"} if fast else set())


CASES: list[Case] = []
for dt in (torch.float16, torch.bfloat16, torch.float32):
    for glt in (0, 1):
        CASES.append(float_sss(dt, glt, bias=glt == 1))
    for api in ("list", "tensor"):
        if not (dt == torch.float32 and api == "tensor"):
            CASES.append(float_single_multi_single(dt, api))
            CASES.append(float_multi_multi_single(dt, api))
            CASES.append(float_multi_multi_multi(dt, api, rank=3))
    CASES.append(float_single_multi_multi(dt))
    CASES.append(float_multi_multi_multi(dt, "list", rank=2))
    CASES.append(float_k_split(dt, glt=1 if dt == torch.bfloat16 else 0))
for sd in (torch.int64, torch.bfloat16, torch.float32):
    CASES.append(quant_per_channel(sd, "tensor", "int32"))
    if sd != torch.int64:
        CASES.append(quant_per_channel(sd, "tensor", "float"))
        CASES.append(quant_per_channel(sd, "tensor", "none"))
CASES.append(quant_per_channel(torch.int64, "list", "int32"))
CASES.append(quant_per_channel(torch.int64, "list", "none"))
for sd in (torch.bfloat16, torch.float32):
    for act in (0, 1, 2, 4, 5):
        CASES.append(quant_per_token(sd, act, "int32" if act % 2 else "none"))
    CASES.append(quant_per_token(sd, 0, "float"))
    CASES.append(quant_per_token(sd, 5, "none", glt=2))
    CASES.append(quant_per_token(sd, 0, "none", glt=0))
CASES.append(quant_int32_out())
for dt in (torch.float16, torch.bfloat16):
    for asym in (False, True):
        CASES.append(antiquant(8, dt, "channel", asym, "sss", bias=asym))
        CASES.append(antiquant(8, dt, "channel", asym, "list"))
        CASES.append(antiquant(4, dt, "channel", asym, "sss"))
        CASES.append(antiquant(4, dt, "group", asym, "sss", bias=not asym))
        CASES.append(antiquant(4, dt, "group", asym, "single-multi"))
    CASES.append(antiquant(4, dt, "group", True, "sss", group_size=16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_mode_matches_float64(case: Case, backend: str):
    kwargs = case.build(gen(zlib.crc32(case.name.encode())))
    outs = grouped_matmul(backend=backend, **kwargs)
    oracle_kwargs = {k: v for k, v in kwargs.items() if k not in ("output_dtype",)}
    refs = oracle_gmm(**oracle_kwargs)
    assert len(outs) == len(refs)
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert_matches(out, ref, case.out_dtype, f"{case.name}[{i}] on {backend}")


@pytest.mark.parametrize("case", [c for c in CASES if "cpu_fast" in c.tags], ids=lambda c: c.name)
def test_cpu_backend_uses_its_fast_kernels(case: Case, monkeypatch):
    """The cpu backend must not quietly fall back to the reference formulas where a fast kernel fits."""
    from gmmquant.kernels.backends import cpu

    def no_fallback(*args, **kwargs):
        raise AssertionError("cpu backend fell back to reference.compute_group")

    monkeypatch.setattr(cpu.reference, "compute_group", no_fallback)
    kwargs = case.build(gen(zlib.crc32(case.name.encode())))
    outs = grouped_matmul(backend="cpu", **kwargs)
    refs = oracle_gmm(**{k: v for k, v in kwargs.items() if k != "output_dtype"})
    for out, ref in zip(outs, refs):
        assert_matches(out, ref, case.out_dtype, case.name)


def test_every_case_has_random_nonzero_data():
    """Guard against a case that silently multiplies zeros (the tests would then prove nothing)."""
    for case in CASES:
        refs = oracle_gmm(**{k: v for k, v in case.build(gen(1)).items() if k != "output_dtype"})
        assert any(r.abs().sum() > 0 for r in refs), case.name


def test_empty_groups_give_empty_blocks_and_all_empty_call():
    g = gen(3)
    x = randn(g, 0, K, dtype=torch.bfloat16)
    w = randn(g, E, K, N, dtype=torch.bfloat16)
    for backend in BACKENDS:
        (y,) = grouped_matmul([x], [w], group_list=torch.zeros(E, dtype=torch.int64), group_list_type=1,
                              group_type=0, split_item=2, backend=backend)
        assert y.shape == (0, N) and y.dtype == torch.bfloat16


@pytest.mark.parametrize("case", [c for c in CASES if c.name.startswith(("float-sss", "antiquant-int4", "quant-per-token"))][:8], ids=lambda c: c.name)
def test_cuda_backend_logic(case: Case):
    """The cuda backend's dispatch, run on CPU tensors (no GPU here): same results as the oracle."""
    from gmmquant.kernels import check_grouped_matmul
    from gmmquant.kernels.backends import cuda

    kwargs = case.build(gen(5))
    outs = cuda.run(check_grouped_matmul(**kwargs))
    refs = oracle_gmm(**{k: v for k, v in kwargs.items() if k != "output_dtype"})
    for out, ref in zip(outs, refs):
        assert_matches(out, ref, case.out_dtype, case.name)
