"""Wall-clock timing for benchmarks: the fastest of a few repeats (noise on a shared machine only
ever adds time, so the minimum is the least biased estimate of the cost itself)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """Seconds of the fastest of ``repeat`` calls of ``fn``."""
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
