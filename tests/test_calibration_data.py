"""Calibration data: built-in corpus, .txt / .jsonl files, deterministic windows, clear errors."""

from __future__ import annotations

import pytest
import torch

from gmmquant.calibrate.corpus import builtin_documents, is_heldout
from gmmquant.calibrate.data import DatasetError, calibration_ids, load_texts, token_stream

from tiny_models import byte_level_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def test_builtin_splits_are_disjoint_and_stable():
    train, heldout = builtin_documents("train"), builtin_documents("heldout")
    assert len(train) > 40 and len(heldout) > 3
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(builtin_documents("all"))
    assert is_heldout("assert") == is_heldout("assert")  # crc32, not the per-process salted hash()
    assert load_texts(None) == train and load_texts("builtin", "heldout") == heldout
    with pytest.raises(ValueError, match="split"):
        builtin_documents("validation")


def test_windows_are_deterministic_by_seed(tokenizer):
    texts = load_texts("builtin")
    a = calibration_ids(tokenizer, texts, 6, 32, seed=0)
    b = calibration_ids(tokenizer, texts, 6, 32, seed=0)
    c = calibration_ids(tokenizer, texts, 6, 32, seed=1)
    assert a.shape == (6, 32) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = token_stream(tokenizer, texts)
    # every window is a contiguous slice of the joined stream
    for row in a:
        starts = (stream == row[0]).nonzero().flatten()
        assert any(torch.equal(stream[s : s + 32], row) for s in starts.tolist())


def test_txt_and_jsonl_files(tmp_path, tokenizer):
    txt = tmp_path / "a.txt"
    txt.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    assert load_texts(str(txt)) == [txt.read_text()]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "first document"}\n\n{"text": "second one"}\n')
    assert load_texts(str(jsonl)) == ["first document", "second one"]
    ids = calibration_ids(tokenizer, load_texts(str(txt)), 3, 16)
    assert ids.shape == (3, 16)
    eos = tokenizer.eos_token_id
    assert token_stream(tokenizer, ["a b", "c"]).tolist().count(eos) == 2


@pytest.mark.parametrize("content,message", [
    ("", "is empty"),
    ("   \n\n", "is empty"),
    ('{"text": "ok"}\nnot json\n', ":2: not valid JSON"),
    ('{"body": "no text field"}\n', ':1: each line must be an object with a string "text" field'),
])
def test_bad_files(tmp_path, content, message):
    suffix = ".jsonl" if "{" in content or "json" in message else ".txt"
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_texts(str(path))


def test_missing_file_and_too_little_text(tmp_path, tokenizer):
    with pytest.raises(DatasetError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(DatasetError, match="fewer than one window of seq_len=4096"):
        calibration_ids(tokenizer, ["a short text"], 2, 4096)
