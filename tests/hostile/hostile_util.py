"""Helpers of the hostile-input battery: break checkpoints in specific ways, run the CLI and check its
one-line error promise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from safetensors import safe_open
from safetensors.torch import save_file

from gmmquant.cli import main

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
PREFIX = "model.layers.0.mlp.experts"


def edit_config(ck: Path, change: Callable[[dict], None]) -> None:
    config = json.loads((ck / "config.json").read_text())
    change(config)
    (ck / "config.json").write_text(json.dumps(config))


def edit_tensors(ck: Path, change: Callable[[dict], None], file: str = "model.safetensors") -> None:
    """Rewrite one shard after `change(tensors)` (a name -> tensor dict), keeping its metadata."""
    with safe_open(str(ck / file), framework="pt") as f:
        metadata = f.metadata()
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    change(tensors)
    save_file(tensors, str(ck / file), metadata=metadata)


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clear_error(capsys, args, *fragments: str) -> str:
    """The CLI refuses `args`: non-zero exit, exactly one error line on stderr holding every fragment, no traceback."""
    rc, _, err = cli(capsys, *args)
    lines = [line for line in err.splitlines() if " error: " in line]
    assert rc != 0, f"exit 0 for {args}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def leftovers(parent: Path) -> list[str]:
    """Hidden entries gmmquant may leave next to an output (tmp / old directories, lock files)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def flip_byte(file: Path, offset_from_end: int) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) - offset_from_end] ^= 0xFF
    file.write_bytes(bytes(data))


