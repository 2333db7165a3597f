"""Wall-clock timing on a shared machine: interleaved repetitions, medians, the load they ran under."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each ``fn`` (which must block until its result is ready), the functions called
    round-robin ``repeat`` times after ``warmup`` untimed rounds, so that a change of machine load hits
    every contender alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """``(fn(), seconds)``."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def load_average() -> str:
    """1-minute load average over the core count, e.g. ``"load 6.8 on 2 cores"``."""
    return f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
