"""Which CPU kernel runs a weight-only group of a given shape: measured per machine, cached on disk.

The fastest way to multiply by an int4 / int8 weight on a CPU depends on the CPU and the shape: the fused
aten kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) read the packed weight once and win at
decode; dequantizing the expert in the activation dtype and running one bf16/fp16 GEMM wins at prefill on
CPUs with AVX512-BF16 / AMX, later (or never) on AVX2-only ones. Like inductor's and Triton's autotune
caches, the choice is measured once per (machine, kernel kind, activation dtype, rows bucket, K, N, quant
groups) and kept in a small JSON file:

- `$GMMQUANT_AUTOTUNE=cache` (default): use measured entries; on a miss, the built-in rule (dequantize from
  `EXACT_MIN_ROWS` rows per expert).
- `$GMMQUANT_AUTOTUNE=on`: measure on a miss (a few ms per new shape, once) and persist.
- `$GMMQUANT_AUTOTUNE=off`: the built-in rule only; the cache is neither read nor written.
- `gmmquant tune MODEL` measures a model's expert shapes ahead of time and prints the table;
  `gmmquant tune --show` prints the cache.
The file is `$GMMQUANT_CACHE_DIR/cpu-kernels.json` (default `~/.cache/gmmquant`), one section per machine
signature (CPU model, ISA flags, torch version, threads). Both candidates stay within the contract's
tolerance (docs/KERNELS.md "Numerics"); with `GMMQUANT_CPU_NUMERICS=npu` only the exact one is allowed.
int8 x int8 and A8W4 calls have one exact kernel (`torch._int_mm`), so nothing to choose; the NPU's
`tuning_config`, which the spec allows for int8 full quant only, therefore selects nothing on CPU.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

AUTOTUNE_ENV = "GMMQUANT_AUTOTUNE"
CACHE_DIR_ENV = "GMMQUANT_CACHE_DIR"
EXACT_MIN_ROWS = 32  # the built-in rule: from this many rows per expert, dequantize and run one GEMM
FUSED, DEQUANT = "fused", "dequant_gemm"
CANDIDATES = (FUSED, DEQUANT)
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile", "avx_vnni")


@dataclass(frozen=True)
class KernelKey:
    """One weight-only matmul shape: `[rows, k] @ dequant([k, n])`, rows bucketed to a power of two."""

    kind: str  # "w4a16" or "w8a16"
    x_dtype: str  # "bfloat16" or "float16"
    rows: int
    k: int
    n: int
    groups: int  # quant groups along K (1: per channel)

    def text(self) -> str:
        return f"{self.kind}/{self.x_dtype}/rows{self.rows}/k{self.k}/n{self.n}/g{self.groups}"


def rows_bucket(rows: int) -> int:
    """1, 2, 4, ... : the power of two at or above `rows`."""
    return 1 << max(0, int(rows) - 1).bit_length()


def mode() -> str:
    value = os.environ.get(AUTOTUNE_ENV, "cache")
    if value not in ("cache", "on", "off"):
        raise ValueError(f"${AUTOTUNE_ENV} must be 'cache', 'on' or 'off', got {value!r}")
    return value


@functools.lru_cache(maxsize=None)
def isa_flags() -> tuple[str, ...]:
    """The ISA flags of this CPU that decide which kernel is fastest (from /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return tuple(f for f in ISA_FLAGS if f in have)
    return ()


@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} | {' '.join(isa_flags())} | torch {torch.__version__}"


def machine_signature() -> str:
    """What a measurement is valid for: CPU model, ISA flags, torch version, intra-op threads."""
    return f"{_cpu_model()} | {torch.get_num_threads()} threads"


def cache_path() -> Path:
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "gmmquant")
    return Path(root) / "cpu-kernels.json"


_lock = threading.Lock()
_loaded: dict[str, dict[str, dict]] | None = None


def load_table() -> dict[str, dict[str, dict]]:
    """{machine signature: {key text: {"choice": ..., "ms": {candidate: ms}}}}; a corrupt file reads as empty."""
    global _loaded
    with _lock:
        if _loaded is None:
            try:
                data = json.loads(cache_path().read_text())
                _loaded = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                _loaded = {}
        return _loaded


def _save(table: dict) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".cpu-kernels.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file, never half of one


def reset() -> None:
    """Forget the in-memory copy of the cache (tests; after editing the file)."""
    global _loaded
    with _lock:
        _loaded = None


def builtin_choice(key: KernelKey) -> str:
    return DEQUANT if key.rows >= EXACT_MIN_ROWS else FUSED


_measure: Optional[Callable[[KernelKey, str, int], float]] = None


def register_measure(fn: Callable[[KernelKey, str, int], float]) -> None:
    """The cpu backend registers how to time one candidate on one key (ms, median)."""
    global _measure
    _measure = fn


def choose(key: KernelKey) -> str:
    """The kernel for `key` under $GMMQUANT_AUTOTUNE (see the module docstring)."""
    how = mode()
    if how == "off":
        return builtin_choice(key)
    entry = load_table().get(machine_signature(), {}).get(key.text())
    if entry is not None and entry.get("choice") in CANDIDATES:
        return entry["choice"]
    if how == "on":
        return tune([key])[0]["choice"]
    return builtin_choice(key)


def tune(keys: list[KernelKey], reps: int = 7) -> list[dict]:
    """Time every candidate on every key, persist the winners, return one row per key."""
    if _measure is None:
        from . import cpu  # noqa: F401 - registers the measurement

    rows = []
    for key in keys:
        ms = {c: _measure(key, c, reps) for c in CANDIDATES}
        choice = min(ms, key=ms.get)
        rows.append({"key": asdict(key), "choice": choice, "ms": ms})
    if mode() != "off":
        table = load_table()
        section = table.setdefault(machine_signature(), {})
        for row in rows:
            section[KernelKey(**row["key"]).text()] = {"choice": row["choice"], "ms": row["ms"]}
        _save(table)
    return rows


def median_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
