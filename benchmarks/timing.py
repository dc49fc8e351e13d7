"""Timing helper shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians(fns: dict[str, Callable[[int], object]], reps: int, budget_s: float = 20.0) -> dict[str, float]:
    """Median ms of each fn(i), i = 0..reps-1, timing the variants round-robin so that the noise of this
    shared VM (CPU steal comes and goes) hits every variant alike. Stops early, after at least 3 rounds,
    once `budget_s` is spent."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    deadline = time.perf_counter() + budget_s
    for i in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(i)
            times[name].append((time.perf_counter() - start) * 1e3)
        if time.perf_counter() > deadline and i >= 2:
            break
    return {name: statistics.median(t) for name, t in times.items()}
