"""The built-in text corpus: English prose that ships with CPython, so calibration needs no download.

`pydoc_data.topics` holds the language reference sections that `help("if")` prints (about 80 documents,
0.5 MB). Each document goes to the held-out split or the train split by a stable hash of its name, so
calibration (train) and perplexity evaluation (held-out) never see the same text, on every machine.
"""

from __future__ import annotations

import zlib

SPLITS = ("train", "heldout", "all")
HELDOUT_EVERY = 8  # about 1 document in 8 is held out


def is_heldout(name: str) -> bool:
    """Whether the document called `name` belongs to the held-out split (crc32, stable across runs)."""
    return zlib.crc32(name.encode("utf-8")) % HELDOUT_EVERY == 0


def builtin_documents(split: str = "train") -> list[str]:
    """The pydoc topics of one split, sorted by topic name.

    Args:
        split: "train", "heldout" or "all".

    Returns:
        list of documents (str), each a whole reference section.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from pydoc_data.topics import topics

    names = sorted(topics)
    if split != "all":
        names = [n for n in names if is_heldout(n) == (split == "heldout")]
    return [topics[n].strip() for n in names]


__all__ = ["HELDOUT_EVERY", "SPLITS", "builtin_documents", "is_heldout"]
