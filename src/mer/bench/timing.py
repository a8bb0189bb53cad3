"""Timing for benchmarks: repeat until a time budget is spent and report the median."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], seconds: float = 1.0, min_runs: int = 3) -> float:
    fn()  # warm-up: first calls pay allocation and kernel selection
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
