"""Hostile inputs to calibrate / pack / export / eval: each is refused with one clear line on stderr and a
non-zero exit (or handled correctly), and nothing is written half-way."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from hostile_util import REPO, assert_clear_error, cli, edit_config, edit_tensors, leftovers


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """A tiny model without experts (Qwen3 dense)."""
    path = tmp_path_factory.mktemp("dense") / "dense"
    config = transformers.Qwen3Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture
def src_copy(tmp_path, source) -> Path:
    return Path(shutil.copytree(source, tmp_path / "src"))


# --- models and data ---------------------------------------------------------------------------------------


def test_pack_a_model_without_experts(capsys, dense, tmp_path):
    assert_clear_error(capsys, ["pack", dense, "-o", tmp_path / "o"], "no fused MoE experts modules")
    assert not (tmp_path / "o").exists()


def test_calibrate_a_model_without_experts(capsys, dense, tmp_path):
    assert_clear_error(capsys, ["calibrate", dense, "-o", tmp_path / "o"], "no MoE experts modules")


def test_calibrate_empty_dataset(capsys, source, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    assert_clear_error(capsys, ["calibrate", source, "-o", tmp_path / "o", "--dataset", tmp_path / "empty.txt"], "is empty")


def test_calibrate_malformed_jsonl(capsys, source, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    assert_clear_error(capsys, ["calibrate", source, "-o", tmp_path / "o", "--dataset", tmp_path / "d.jsonl"],
                       "d.jsonl:2: not valid JSON")


def test_calibrate_jsonl_without_text_field(capsys, source, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"content": "no text key"}\n')
    assert_clear_error(capsys, ["calibrate", source, "-o", tmp_path / "o", "--dataset", tmp_path / "d.jsonl"],
                       'd.jsonl:1', '"text" field')


def test_calibrate_dataset_bad_utf8(capsys, source, tmp_path):
    (tmp_path / "d.txt").write_bytes(b"hello \xff\xfe world")
    assert_clear_error(capsys, ["calibrate", source, "-o", tmp_path / "o", "--dataset", tmp_path / "d.txt"],
                       "d.txt", "not UTF-8")


@pytest.mark.parametrize("flag,value,rule", [
    ("--num-samples", "0", "calibration.num_samples: must be > 0"),
    ("--num-samples", "-3", "calibration.num_samples: must be > 0"),
    ("--seq-len", "0", "calibration.seq_len: must be > 0"),
    ("--seq-len", "100000", "exceeds the model's max_position_embeddings 512"),
    ("--min-tokens", "-1", "calibration.min_tokens"),
])
def test_calibrate_bad_numbers(capsys, source, tmp_path, flag, value, rule):
    assert_clear_error(capsys, ["calibrate", source, "-o", tmp_path / "o", flag, value], rule)
    assert not (tmp_path / "o").exists()


def test_calibrate_sequence_length_one_works(capsys, source, tmp_path):
    """One token per sample is a legal (if weak) calibration: it runs and writes a valid checkpoint."""
    rc, _, _ = cli(capsys, "calibrate", source, "-o", tmp_path / "o", "--seq-len", "1", "--num-samples", "2")
    assert rc == 0
    rc, out, _ = cli(capsys, "inspect", tmp_path / "o")
    assert rc == 0 and "validation: OK" in out


@pytest.mark.parametrize("args,rule", [
    (["--seq-len", "1"], "--seq-len 1: must be >= 2"),
    (["--seq-len", "1000000"], "exceeds the model's max_position_embeddings 512"),
    (["--max-windows", "0"], "--max-windows 0: must be >= 1"),
])
def test_eval_bad_numbers(capsys, source, args, rule):
    assert_clear_error(capsys, ["eval", source, *args], rule)


def test_eval_nonexistent(capsys):
    assert_clear_error(capsys, ["eval", "/nonexistent/model"], "/nonexistent/model: no such model directory")


def test_eval_autoround_checkpoint(capsys, src_copy):
    edit_config(src_copy, lambda c: c.update(quantization_config={"quant_method": "auto-round", "bits": 4, "group_size": 128}))
    assert_clear_error(capsys, ["eval", src_copy, "--max-windows", "1", "--seq-len", "16"], "'auto-round'",
                       "gmmquant itself runs gmmquant, compressed-tensors and AscendV1")


def test_pack_nonexistent_source(capsys, tmp_path):
    assert_clear_error(capsys, ["pack", tmp_path / "nothing", "-o", tmp_path / "o"], "no config.json")


def test_mixtral_with_negative_expert_count(capsys, tmp_path):
    config = transformers.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
    src = tmp_path / "mixtral"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(src)
    edit_config(src, lambda c: c.update(num_local_experts=-8))
    assert_clear_error(capsys, ["pack", src, "-o", tmp_path / "o"], "num_local_experts is -8", "must not be negative")
    assert_clear_error(capsys, ["calibrate", src, "-o", tmp_path / "o"], "num_local_experts is -8")
    assert not (tmp_path / "o").exists()


def test_pack_source_with_a_nan_weight(capsys, src_copy, tmp_path):
    name = "model.layers.1.mlp.experts.3.down_proj.weight"  # per-expert on disk, as transformers saves Qwen3-MoE

    def poison(t):
        w = t[name].clone()
        w[0, 5] = float("nan")
        t[name] = w
    edit_tensors(src_copy, poison)
    assert_clear_error(capsys, ["pack", src_copy, "-o", tmp_path / "o"], "model.layers.1.mlp.experts.down_proj: expert 3",
                       "NaN or inf")
    assert not (tmp_path / "o").exists()


# --- the source directory ------------------------------------------------------------------------------------


@pytest.mark.parametrize("content,rule", [(b"[1, 2, 3]", "must hold a JSON object"), (b"\xff{}", "not UTF-8")])
def test_pack_garbage_source_config(capsys, src_copy, tmp_path, content, rule):
    (src_copy / "config.json").write_bytes(content)
    assert_clear_error(capsys, ["pack", src_copy, "-o", tmp_path / "o"], "config.json", rule)


def test_pack_source_index_weight_map_list(capsys, src_copy, tmp_path):
    (src_copy / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    assert_clear_error(capsys, ["pack", src_copy, "-o", tmp_path / "o"], "'weight_map' must be an object")


def test_pack_fifo_in_the_source(capsys, src_copy, tmp_path):
    os.mkfifo(src_copy / "special_tokens_map.json")
    assert_clear_error(capsys, ["pack", src_copy, "-o", tmp_path / "o"], "special_tokens_map.json", "FIFOs, devices")
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("command", ["calibrate", "eval"])
def test_fifo_tokenizer_does_not_hang(capsys, src_copy, tmp_path, command):
    (src_copy / "tokenizer.json").unlink()
    os.mkfifo(src_copy / "tokenizer.json")
    args = ["-o", tmp_path / "o"] if command == "calibrate" else ["--max-windows", "1"]
    assert_clear_error(capsys, [command, src_copy, *args], "tokenizer.json", "FIFOs, devices or sockets")


def test_pack_side_file_linked_to_dev_zero(capsys, src_copy, tmp_path):
    (src_copy / "merges.txt").symlink_to("/dev/zero")
    assert_clear_error(capsys, ["pack", src_copy, "-o", tmp_path / "o"], "merges.txt", "FIFOs, devices")
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_save_model_source_dir_with_a_fifo(source, tmp_path):
    """save_model copies side files itself (no config read first): the copy refuses the FIFO, nothing appears."""
    import gmmquant

    side = tmp_path / "side"
    side.mkdir()
    os.mkfifo(side / "vocab.txt")
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    gmmquant.replace_experts(model, "w8a16")
    with pytest.raises(ValueError, match="vocab.txt: side file is a FIFO"):
        gmmquant.save_model(model, tmp_path / "o", source_dir=side)
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_pack_side_directory_linked_outside(capsys, src_copy, tmp_path):
    (src_copy / "assets").symlink_to("/")
    assert_clear_error(capsys, ["pack", src_copy, "-o", tmp_path / "o"], "assets", "a directory")


def test_pack_ignore_everything(capsys, source, tmp_path):
    assert_clear_error(capsys, ["pack", source, "-o", tmp_path / "o", "--ignore", "*"], "matches every experts module")
    assert not (tmp_path / "o").exists()


# --- the output directory -----------------------------------------------------------------------------------


def test_pack_output_is_the_source(capsys, src_copy):
    before = digest(src_copy)
    assert_clear_error(capsys, ["pack", src_copy, "-o", src_copy, "--overwrite"], "would destroy the source")
    assert digest(src_copy) == before


def test_pack_output_holds_the_source(capsys, src_copy):
    before = digest(src_copy)
    assert_clear_error(capsys, ["pack", src_copy, "-o", src_copy.parent, "--overwrite"], "a directory holding the source")
    assert digest(src_copy) == before


def test_calibrate_output_is_the_source(capsys, src_copy):
    before = digest(src_copy)
    assert_clear_error(capsys, ["calibrate", src_copy, "-o", src_copy, "--overwrite"], "would destroy the source")
    assert digest(src_copy) == before


def test_export_output_is_the_checkpoint(capsys, packed_sym, copy_of):
    ck = copy_of(packed_sym)
    before = digest(ck)
    assert_clear_error(capsys, ["export", ck, "--to", "compressed-tensors", "-o", ck, "--overwrite"], "would destroy the source")
    assert digest(ck) == before


def test_output_dot_is_refused(capsys, source, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert_clear_error(capsys, ["pack", source, "-o", ".", "--overwrite"], "current directory")
    assert (work / "notes.txt").read_text() == "mine"


def test_output_exists_without_overwrite(capsys, source, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    before = digest(ck)
    assert_clear_error(capsys, ["pack", source, "-o", ck], "already exists", "--overwrite")
    assert digest(ck) == before


def test_overwrite_refuses_foreign_files(capsys, source, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert_clear_error(capsys, ["pack", source, "-o", out, "--overwrite"], "refusing to overwrite", "no gmmquant manifest")
    assert (out / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_own_output_with_a_foreign_file_added(capsys, source, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    (ck / "notes.md").write_text("added by hand")
    assert_clear_error(capsys, ["pack", source, "-o", ck, "--overwrite"], "refusing to overwrite", "notes.md")
    assert (ck / "notes.md").exists()


def test_overwrite_replaces_own_output(capsys, source, packed_asym, copy_of):
    ck = copy_of(packed_asym)
    rc, _, _ = cli(capsys, "pack", source, "-o", ck, "--overwrite", "--scheme", "w8a16")
    assert rc == 0 and leftovers(ck.parent) == []
    assert json.loads((ck / "config.json").read_text())["quantization_config"]["modules"]
    rc, out, _ = cli(capsys, "inspect", ck)
    assert rc == 0 and "w8a16" in out


def test_output_is_a_file(capsys, source, tmp_path):
    (tmp_path / "o").write_text("a file")
    assert_clear_error(capsys, ["pack", source, "-o", tmp_path / "o", "--overwrite"], "not a directory")
    assert (tmp_path / "o").read_text() == "a file"


def test_output_is_a_symlink(capsys, source, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep").write_text("x")
    (tmp_path / "o").symlink_to(tmp_path / "real")
    assert_clear_error(capsys, ["pack", source, "-o", tmp_path / "o", "--overwrite"], "symbolic link")
    assert (tmp_path / "real" / "keep").exists()


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody (root included) can create entries in: `chattr +i`, or chmod when not root."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root without chattr +i: no way to make a read-only directory")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_output(capsys, source, read_only_dir):
    line = assert_clear_error(capsys, ["pack", source, "-o", read_only_dir / "o"], str(read_only_dir))
    assert "not permitted" in line or "Permission denied" in line
    assert list(read_only_dir.iterdir()) == []


def test_disk_full(capsys, source, tmp_path):
    """`ulimit -f`: writes past 200 kB fail with EFBIG (Python ignores SIGXFSZ), as on a full disk; one line,
    nothing left behind."""
    out = tmp_path / "o"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        rc, _, err = cli(capsys, "pack", source, "-o", out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    errors = [line for line in err.splitlines() if " error: " in line]
    assert rc == 1 and "Traceback" not in err
    assert len(errors) == 1 and "File too large" in errors[0] and "nothing was written" in errors[0]
    assert not out.exists() and leftovers(tmp_path) == []


# --- arguments and recipes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size,rule", [("abc", "expected a size like"), ("0", "positive"), ("-5MB", "positive"),
                                       ("nanGB", "positive")])
def test_bad_max_shard_size(capsys, source, tmp_path, size, rule):
    assert_clear_error(capsys, ["pack", source, "-o", tmp_path / "o", f"--max-shard-size={size}"], "--max-shard-size", rule)


@pytest.mark.parametrize("text,fragments", [
    ("scheme: w8a16\ncalibration:\n  num_samples: 4\n  colour: blue\n", ["calibration.colour: unknown key", "line 4"]),
    ("scheme: w8a16\ncalibration:\n  num_samples: many\n", ["calibration.num_samples: expected int", "line 3"]),
    ("scheme: w8a16\ngptq: [1, 2]\n", ["gptq: expected a mapping", "line 2"]),
    ("scheme: w8a16\n  bad: indent\n", ["not valid YAML", "line 2"]),
    ("- just\n- a list\n", ["recipe: expected a mapping"]),
])
def test_bad_recipe(capsys, source, tmp_path, text, fragments):
    (tmp_path / "r.yaml").write_text(text)
    assert_clear_error(capsys, ["calibrate", source, "-o", tmp_path / "o", "--recipe", tmp_path / "r.yaml"], "r.yaml", *fragments)


def test_unknown_option_is_one_line(capsys):
    assert_clear_error(capsys, ["pack", "src", "-o", "out", "--no-such-flag"], "unrecognized arguments: --no-such-flag")


def test_export_asymmetric_advice_keeps_calibration_work(capsys, packed_asym, tmp_path):
    line = assert_clear_error(capsys, ["export", packed_asym, "--to", "ascend", "-o", tmp_path / "a"], "asymmetric W4A16")
    assert "compressed-tensors" in line and "re-pack with --symmetric\"" not in line


def test_python_dash_m_gmmquant(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gmmquant", "inspect", str(tmp_path / "missing")], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "gmmquant inspect: error:" in result.stderr and "no such checkpoint directory" in result.stderr


def test_debug_shows_the_traceback(capsys, tmp_path):
    rc, _, err = cli(capsys, "--debug", "inspect", tmp_path / "missing")
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("gmmquant inspect: error:")
