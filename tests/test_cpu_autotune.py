"""The cpu backend's per-shape kernel choice: rule, cache, measurement, CLI, and that every candidate keeps
the contract's numerics (docs/KERNELS.md "Numerics")."""

from __future__ import annotations

import json

import pytest
import torch

from gmmquant import cli
from gmmquant.kernels import grouped_matmul, pack_int4
from gmmquant.kernels.backends import cpu as cpu_backend
from gmmquant.kernels.backends import cpu_autotune as at
from numerics_util import assert_within_ulps, ulp


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(at.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(at.AUTOTUNE_ENV, "cache")
    at.reset()
    yield tmp_path / "cpu-kernels.json"
    at.reset()


KEY = at.KernelKey("w4a16", "bfloat16", 1, 256, 64, 2)


def test_rows_bucket():
    assert [at.rows_bucket(r) for r in (1, 2, 3, 4, 5, 31, 32, 33, 4096)] == [1, 2, 4, 4, 8, 32, 32, 64, 4096]


def test_builtin_rule_when_off_or_missing(cache, monkeypatch):
    assert at.choose(KEY) == at.FUSED
    assert at.choose(at.KernelKey("w4a16", "bfloat16", 64, 256, 64, 2)) == at.DEQUANT
    monkeypatch.setenv(at.AUTOTUNE_ENV, "off")
    assert at.choose(KEY) == at.FUSED
    assert not cache.exists()


def test_cached_entry_wins_and_corrupt_cache_reads_empty(cache):
    cache.write_text(json.dumps({at.machine_signature(): {KEY.text(): {"choice": at.DEQUANT, "ms": {}}}}))
    at.reset()
    assert at.choose(KEY) == at.DEQUANT
    cache.write_text("{not json")
    at.reset()
    assert at.choose(KEY) == at.FUSED


def test_bad_mode_is_an_error(monkeypatch):
    monkeypatch.setenv(at.AUTOTUNE_ENV, "sometimes")
    with pytest.raises(ValueError, match="GMMQUANT_AUTOTUNE"):
        at.mode()


def test_on_measures_and_persists(cache, monkeypatch, one_thread):
    monkeypatch.setenv(at.AUTOTUNE_ENV, "on")
    choice = at.choose(KEY)
    assert choice in at.CANDIDATES
    data = json.loads(cache.read_text())
    entry = data[at.machine_signature()][KEY.text()]
    assert entry["choice"] == choice and set(entry["ms"]) == set(at.CANDIDATES)
    assert all(v > 0 for v in entry["ms"].values())


def test_npu_numerics_allow_only_the_exact_kernel(cache, monkeypatch):
    cache.write_text(json.dumps({at.machine_signature(): {KEY.text(): {"choice": at.FUSED, "ms": {}}}}))
    at.reset()
    monkeypatch.setenv(cpu_backend.NUMERICS_ENV, "npu")
    call = _call(rows=[1, 0])
    with pytest.MonkeyPatch.context() as m:
        seen = []
        real = cpu_backend._weight_only_exact
        m.setattr(cpu_backend, "_weight_only_exact", lambda plan, op: seen.append(1) or real(plan, op))
        grouped_matmul(backend="cpu", **call)
    assert seen


def _call(rows, groups=2, k=256, n=64, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(7)
    q = torch.randint(-8, 8, (len(rows), k, n), generator=gen, dtype=torch.int8)
    return dict(x=[torch.randn(sum(rows), k, generator=gen).to(dtype)], weight=[pack_int4(q)],
                antiquant_scale=[(torch.rand(len(rows), groups, n, generator=gen) * 0.02).to(dtype)],
                antiquant_offset=[torch.randn(len(rows), groups, n, generator=gen).to(dtype)],
                group_list=torch.tensor(rows), group_list_type=1, group_type=0, split_item=2)


@pytest.mark.parametrize("rows", [[1, 0, 3], [40, 0, 70]])
def test_every_candidate_keeps_the_contract(rows, one_thread):
    """dequant_gemm equals reference to one ulp; fused stays within the weight-rounding bound."""
    call = _call(rows)
    ref = grouped_matmul(backend="reference", **call)[0]
    for choice in at.CANDIDATES:
        cpu_backend._forced.choice = choice
        try:
            got = grouped_matmul(backend="cpu", **call)[0]
        finally:
            cpu_backend._forced.choice = None
        if choice == at.DEQUANT:
            assert_within_ulps(got, ref, 1.0, choice)
        else:
            from gmmquant.kernels.antiquant import npu_antiquant_weight

            w16 = npu_antiquant_weight(call["weight"][0], call["antiquant_scale"][0], call["antiquant_offset"][0], torch.bfloat16)
            half = ulp(w16.double(), torch.bfloat16) / 2
            expert = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(rows))
            x = call["x"][0].double().abs()
            bound = torch.stack([x[i] @ half[expert[i]] for i in range(x.shape[0])]) + ulp(ref.double(), torch.bfloat16)
            assert bool(((got.double() - ref.double()).abs() <= bound).all()), choice


def test_cli_tune_and_show(cache, capsys, one_thread):
    assert cli.main(["tune", "--shapes", "256x64", "--scheme", "w4a16-g128,w8a16", "--rows", "1,40", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "w4a16/bfloat16/rows1/k256/n64/g2" in out and "w8a16/bfloat16/rows64/k256/n64/g1" in out
    assert cli.main(["tune", "--show"]) == 0
    assert "4 measured shape(s)" in capsys.readouterr().out


def test_cli_tune_reads_the_builtin_models_shapes(cache, capsys, one_thread):
    assert cli.main(["tune", "--scheme", "w8a16", "--rows", "1", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("w8a16/bfloat16/rows1") == 2  # gate_up and down of the built-in model


@pytest.mark.parametrize("argv,msg", [(["tune", "--shapes", "12by4"], "--shapes must look like"),
                                      (["tune", "--shapes", "256x64", "--scheme", "w8a8-dynamic"], "only weight-only schemes")])
def test_cli_tune_errors(cache, capsys, argv, msg):
    assert cli.main(argv) == 2
    assert msg in capsys.readouterr().err
