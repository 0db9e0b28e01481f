"""What every benchmark here times with: the median of repeated calls, in seconds."""
from __future__ import annotations

import statistics
import time


def median_time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)
