"""Calibration data: texts from the built-in corpus, a local .txt / .jsonl file or a cached `datasets`
dataset, tokenised into a `[num_samples, seq_len]` int64 tensor that is deterministic by seed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from .corpus import builtin_documents

BUILTIN = "builtin"


class DatasetError(ValueError):
    """Calibration data that cannot be read or is too small; the message says which file or name."""


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DatasetError(f"{path}:{lineno}: each line must be an object with a string \"text\" field")
        texts.append(text)
    return texts


def _read_datasets(name: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"{name!r} is not a file, and the `datasets` package is not installed to look it up "
                           "(pip install datasets), nor is it 'builtin'") from None
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # calibration must not start a download
    path, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(path, config or None, split=split)
    except Exception as exc:  # datasets raises many types for "not cached" / "no such dataset"
        raise DatasetError(f"dataset {name!r} could not be loaded from the local cache: {exc}") from None
    column = "text" if "text" in ds.column_names else next((c for c in ds.column_names if ds.features[c].dtype == "string"), None)
    if column is None:
        raise DatasetError(f"dataset {name!r} has no text column (columns: {ds.column_names})")
    return [t for t in ds[column] if t]


def load_texts(dataset: Optional[str] = None, split: str = "train") -> list[str]:
    """The documents of a calibration dataset.

    Args:
        dataset: None / "builtin" (CPython's pydoc topics, the `split` half), a `.txt` file (one document),
            a `.jsonl` file (a `"text"` field per line), or a `datasets` name (`name` or `name:config`) that
            is already cached.
        split: "train" or "heldout" for the built-in corpus; the split name for `datasets`.

    Raises:
        DatasetError: missing / unreadable / empty file, unknown dataset.
    """
    if dataset in (None, BUILTIN):
        return builtin_documents(split)
    path = Path(dataset)
    if path.suffix in (".txt", ".jsonl", ".json"):
        if not path.is_file():
            raise DatasetError(f"calibration file {str(path)!r} " + ("is not a regular file" if path.exists() else "does not exist"))
        texts = _read_jsonl(path) if path.suffix != ".txt" else [_read_text(path)]
    else:
        texts = _read_datasets(dataset, "test" if split == "heldout" else split)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DatasetError(f"calibration data {dataset!r} is empty (no non-blank text)")
    return texts


def token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All texts tokenised and joined with the end-of-sequence token: int64 `[T]`."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def calibration_ids(tokenizer: Any, texts: list[str], num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens from the joined token stream: int64 `[num_samples, seq_len]`.

    Windows start at positions drawn with `torch.Generator().manual_seed(seed)`, so the same data, tokenizer
    and seed always give the same tensor. Windows may overlap when the stream is short.

    Raises:
        DatasetError: the stream is shorter than one window.
    """
    stream = token_stream(tokenizer, texts)
    if stream.numel() < seq_len:
        raise DatasetError(f"calibration data has {stream.numel()} tokens, fewer than one window of seq_len={seq_len}; "
                           "give more text or a smaller --seq-len")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


__all__ = ["BUILTIN", "DatasetError", "calibration_ids", "load_texts", "token_stream"]
