"""Timing helper shared by the benchmark scripts (scripts/bench_*.py import it from their folder)."""
from __future__ import annotations

import time


def timed(fn, repeat: int = 1):
    """(best wall time in seconds over ``repeat`` calls of ``fn()``, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out
