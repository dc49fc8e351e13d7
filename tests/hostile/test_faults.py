"""Faults: processes killed (SIGKILL) while writing, two writers on one output, concurrent loads, leftovers.

The promise: the previous checkpoint at the output path is intact (or, after a kill between the two renames
of the fallback path, restored by the next run); no partial directory ever validates; the next run cleans
what a killed one left and succeeds. A representative sample runs by default; `-m hostile_full` runs all.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from hostile_util import REPO, TESTS, assert_clear_error, cli, leftovers
from gmmquant import FormatError, load_model
from gmmquant.pack.checkpoint import load_quantized
from gmmquant.pack.safety import MANIFEST, output_lock, scratch_dir

CHILD = Path(__file__).with_name("fault_child.py")
PACK = ["pack", "--scheme", "w4a16-g128"]  # + SRC -o OUT


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def child(point: str, *job, env: dict | None = None, wait: bool = True) -> "subprocess.Popen | subprocess.CompletedProcess":
    command = [sys.executable, str(CHILD), point, *map(str, job)]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), **(env or {})}
    if not wait:
        return subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=300)


def assert_partials_never_validate(parent: Path, name: str) -> None:
    partial = [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-")]
    for path in partial:
        with pytest.raises(FormatError):
            load_quantized(path)


def rerun_pack(capsys, source: Path, out: Path, *extra: str) -> None:
    rc, _, err = cli(capsys, *PACK, source, "-o", out, *extra)
    assert rc == 0, err
    assert leftovers(out.parent) == [], "a killed run's leftovers survived the next run"
    load_quantized(out)


# --- kills ----------------------------------------------------------------------------------------------------


def test_kill_while_overwriting_keeps_the_old_checkpoint(capsys, source, packed_sym, copy_of):
    out = copy_of(packed_sym, "ck")
    before = digest(out)
    result = child("write", "cli", *PACK, source, "-o", out, "--overwrite")
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert digest(out) == before  # untouched
    assert_partials_never_validate(out.parent, "ck")
    assert any(p.startswith(".ck.tmp-") for p in leftovers(out.parent))
    rerun_pack(capsys, source, out, "--overwrite")


def test_kill_between_the_two_renames(capsys, source, packed_sym, copy_of):
    """Where RENAME_EXCHANGE is missing: killed after moving the old output aside; the next run puts it back."""
    out = copy_of(packed_sym, "ck")
    before = digest(out)
    result = child("between-renames", "cli", *PACK, source, "-o", out, "--overwrite")
    assert result.returncode == -signal.SIGKILL, result.stderr
    olds = [p for p in out.parent.iterdir() if p.name.startswith(".ck.old-")]
    assert not out.exists() and len(olds) == 1 and digest(olds[0]) == before
    # The next run, even one that is refused, first restores the previous checkpoint.
    assert_clear_error(capsys, [*PACK, source, "-o", out], "already exists")
    assert digest(out) == before and leftovers(out.parent) == []
    load_quantized(out)
    rerun_pack(capsys, source, out, "--overwrite")


@pytest.mark.hostile_full
def test_kill_right_after_the_swap(capsys, source, packed_sym, copy_of):
    out = copy_of(packed_sym, "ck")
    result = child("after-swap", "cli", *PACK, source, "-o", out, "--overwrite")
    assert result.returncode == -signal.SIGKILL, result.stderr
    ck = load_quantized(out)  # the new checkpoint, complete
    assert next(iter(ck.specs.values())).scheme.name == "w4a16-g128"
    rerun_pack(capsys, source, out, "--overwrite")


@pytest.mark.hostile_full
def test_kill_pack_into_a_new_output(capsys, source, tmp_path):
    out = tmp_path / "fresh"
    result = child("write", "cli", *PACK, source, "-o", out)
    assert result.returncode == -signal.SIGKILL
    assert not out.exists()
    assert_partials_never_validate(tmp_path, "fresh")
    rerun_pack(capsys, source, out)


@pytest.mark.hostile_full
def test_kill_calibrate_cleans_output_and_offload(capsys, source, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "cal"
    result = child("write", "cli", "calibrate", source, "-o", out, "--num-samples", "2", "--seq-len", "32",
                   env={"TMPDIR": str(scratch)})
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not out.exists() and [p.name for p in scratch.iterdir() if p.name.startswith("gmmquant-offload-")]
    assert_partials_never_validate(tmp_path, "cal")
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    rc, _, err = cli(capsys, "calibrate", source, "-o", out, "--num-samples", "2", "--seq-len", "32")
    assert rc == 0, err
    assert not [p for p in scratch.iterdir() if p.name.startswith("gmmquant-offload-")], "stale offload copy kept"
    assert leftovers(tmp_path) == [] and load_quantized(out)


@pytest.mark.hostile_full
def test_kill_save_model(source, packed_sym, copy_of):
    import gmmquant
    import transformers

    out = copy_of(packed_sym, "ck")
    before = digest(out)
    result = child("write", "save_model", source, out, "--overwrite")
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert digest(out) == before
    assert_partials_never_validate(out.parent, "ck")
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    gmmquant.replace_experts(model, "w8a16")
    gmmquant.save_model(model, out, overwrite=True)
    assert leftovers(out.parent) == [] and load_quantized(out)


@pytest.mark.hostile_full
@pytest.mark.parametrize("to", ["ascend", "compressed-tensors"])
def test_kill_export(capsys, packed_sym, tmp_path, to):
    out = tmp_path / "exp"
    result = child("write", "cli", "export", packed_sym, "--to", to, "-o", out)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not out.exists()
    rc, _, err = cli(capsys, "export", packed_sym, "--to", to, "-o", out)
    assert rc == 0, err
    assert leftovers(tmp_path) == [] and load_model(out) is not None


# --- two writers, concurrent readers ---------------------------------------------------------------------------


def test_second_writer_gets_a_clear_error(capsys, source, tmp_path):
    out = tmp_path / "o"
    with output_lock(out.absolute()):  # another process (here: another open file) is writing `out`
        assert_clear_error(capsys, [*PACK, source, "-o", out], "another gmmquant process", str(os.getpid()))
    assert not out.exists()
    rerun_pack(capsys, source, out)


@pytest.mark.hostile_full
def test_two_processes_one_output(capsys, source, tmp_path):
    """A real race: the second `pack` starts while the first is writing; one wins, one gets a clear error."""
    out, ready, release = tmp_path / "o", tmp_path / "ready", tmp_path / "release"
    first = child("hold", "cli", *PACK, source, "-o", out, env={"HOLD_READY": str(ready), "HOLD_UNTIL": str(release)},
                  wait=False)
    try:
        deadline = time.time() + 120
        while not ready.exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "gmmquant", *PACK, str(source), "-o", str(out)], capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    finally:
        release.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    errors = [line for line in second.stderr.splitlines() if " error: " in line]
    assert second.returncode == 2 and len(errors) == 1 and "another gmmquant process" in errors[0]
    load_quantized(out)
    assert leftovers(tmp_path) == []


def test_concurrent_readers(packed_sym):
    """Readers take no lock: several threads validate and verify the same checkpoint at once."""
    from gmmquant.pack.validate import checksum_problems, validate_checkpoint

    results, errors = [], []

    def read():
        try:
            results.append(checksum_problems(validate_checkpoint(packed_sym)))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and all(r == results[0] and not r[2] for r in results)


@pytest.mark.hostile_full
def test_concurrent_loads_in_two_processes(packed_sym):
    """Two processes load the same checkpoint at once and compute the same logits. (Processes, not threads:
    transformers' from_pretrained changes torch's global default dtype while it runs.)"""
    code = (f"import torch, gmmquant; m = gmmquant.load_model({str(packed_sym)!r}); "
            "print(m(torch.tensor([[3, 1, 4, 1, 5]])).logits.double().sum().item())")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert outs[0][0] == outs[1][0]


# --- leftovers, scratch space, permissions, empty directories -------------------------------------------------


def test_stale_leftovers_are_cleaned_by_the_next_run(capsys, source, packed_sym, copy_of):
    out = copy_of(packed_sym, "ck")
    for name in (".ck.tmp-dead1", ".ck.old-dead2"):  # an unfinished output; an old one whose removal was cut short
        (out.parent / name).mkdir()
        (out.parent / name / "model.safetensors").write_bytes(b"partial")
    (out.parent / ".ck.lock").write_text("12345")  # a killed writer's lock file (its flock died with it)
    rerun_pack(capsys, source, out, "--overwrite")


def test_stale_offload_scratch_is_removed_live_one_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / "gmmquant-offload-dead"
    dead.mkdir()
    (dead / ".lock").write_text("")
    (dead / "layer.dat").write_bytes(b"x" * 1000)
    with scratch_dir("gmmquant-offload-") as live:
        assert not dead.exists()
        with scratch_dir("gmmquant-offload-") as other:
            assert Path(live).exists() and other != live
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o077, 0o700)])
def test_output_directory_honours_umask(capsys, source, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        rc, _, err = cli(capsys, *PACK, source, "-o", tmp_path / "o")
    finally:
        os.umask(old)
    assert rc == 0, err
    assert (tmp_path / "o").stat().st_mode & 0o777 == mode


def test_save_model_into_an_existing_empty_directory(source, tmp_path):
    import gmmquant
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    gmmquant.replace_experts(model, "w8a16")
    out = tmp_path / "empty"
    out.mkdir()
    gmmquant.save_model(model, out)
    assert (out / MANIFEST).exists() and load_quantized(out)
    with pytest.raises(FileExistsError, match="already exists"):
        gmmquant.save_model(model, out)
