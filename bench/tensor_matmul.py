"""Repeated `Tensor.matmul` on one tensor object: the runtime weight built once (now)
against rebuilt on every call (what it did before: every array re-checked and, for
uint-dict16, the weight re-decoded to check its escapes), same process, one thread,
medians of 51 calls, batch 1, on the committed fixture stores.

    python bench/tensor_matmul.py
"""
from __future__ import annotations

import time

import numba
import numpy as np

import qmoefmt
from qmoefmt.testing import paths


def median_us(fn, reps: int = 51) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e6


def main() -> None:
    numba.set_num_threads(1)
    print(f"{'store':30} {'codec':20} {'shape':>8} | {'rebuilt':>9} {'once':>7} {'ratio':>6}")
    for name in ("switch-tiny-2bit-dict16.qmoe", "switch-tiny.qmoe", "switch-tiny-2bit.qmoe"):
        st = qmoefmt.open(paths.store(name))
        t = next(st[n] for n in st if st[n].unit.multiplies and len(st[n].shape) == 2)
        x = np.random.default_rng(0).standard_normal((1, t.shape[1])).astype(np.float32)
        rebuilt = median_us(lambda: t.unit.runtime(t, True).matmul(x))
        once = median_us(lambda: t.matmul(x))
        shape = "x".join(map(str, t.shape))
        print(f"{name:30} {t.codec:20} {shape:>8} | {rebuilt:>7.0f}us {once:>5.0f}us "
              f"{rebuilt / once:>5.1f}x")


if __name__ == "__main__":
    main()
