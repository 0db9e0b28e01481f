"""Where the CPU ternary decode-matmul (batch 1) spends its time: cpu_matmul's phase 1
(the lockstep gather of entry words) and phase 2 (the row sums) timed apart on one
random expert, beside the bare state chain walked one row at a time (the latency floor
that phase 1 interleaves rows to beat). One thread, cache-hot, medians, ns per codeword.

    python bench/ternary_phases.py [--rows 768] [--cols 3072] [--p0 0.885] [--reps 100]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numba as nb
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _timing import median_time
from runtime import experts  # the expert generator bench/runtime.py times

from qmoefmt.backends import cpu_matmul as K
from qmoefmt.dictionaries.stream import row_offsets

L = K.LOCKSTEP_ROWS


@nb.njit
def phase1(codes, offsets, nxt, slots):
    """_gather_words over every block of rows, as _ternary_blocks calls it."""
    rows = offsets.shape[0] - 1
    words = np.empty(codes.shape[0], np.uint64)
    state = np.empty(L, np.int64)
    start = np.empty(L, np.int64)
    count = np.empty(L, np.int64)
    for r0 in range(0, rows, L):
        K._gather_words(codes, offsets, r0, min(rows, r0 + L), nxt, slots,
                        words[offsets[r0]:], state, start, count)
    return words


@nb.njit
def phase2(words, offsets, cols, lb, k, table, lo, hi, y):
    """_row_matvec over every row, from phase 1's words."""
    for r in range(offsets.shape[0] - 1):
        _, t, h = K._row_matvec(words, offsets[r], offsets[r + 1] - offsets[r], cols, lb, k,
                                table)
        y[r] = lo[r] * (t - h) + hi[r] * h


@nb.njit
def chain(codes, offsets, nxt):
    """Only the next-state chain, one row after another (each load waits on the last)."""
    acc = 0
    for r in range(offsets.shape[0] - 1):
        s = 0
        for j in range(offsets[r], offsets[r + 1]):
            s = np.int64(nxt[(s << 16) | np.int64(codes[j])])
        acc += s
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=768)
    ap.add_argument("--cols", type=int, default=3072)
    ap.add_argument("--p0", type=float, default=0.885)
    ap.add_argument("--reps", type=int, default=100)
    args = ap.parse_args()
    nb.set_num_threads(1)
    rng = np.random.default_rng(0)
    (e,), d = experts((args.rows, args.cols), args.p0, 1, rng)
    codes, row_codes, lo, hi = e[:4]
    offsets = row_offsets(row_codes, codes.shape[0], args.cols)
    slots, lb, k = d.runtime_slots()
    nxt = d.runtime_next()
    table = K.matvec_table(rng.standard_normal(args.cols).astype(np.float32), args.cols, lb)
    y = np.zeros(args.rows, np.float32)
    words = phase1(codes, offsets, nxt, slots)
    n = codes.size
    print(f"{args.rows}x{args.cols}, P(0) {args.p0}: {n:,} codewords, {slots.size // 65536} "
          f"states, {k} slots a word; one thread, median of {args.reps}")
    for name, fn in (("phase 1 (lockstep gather)", lambda: phase1(codes, offsets, nxt, slots)),
                     ("phase 2 (row sums)",
                      lambda: phase2(words, offsets, args.cols, lb, k, table, lo, hi, y)),
                     ("chain alone, a row at a time", lambda: chain(codes, offsets, nxt))):
        fn()                                            # compile, fill the caches
        us = median_time(fn, args.reps) * 1e6
        print(f"  {name:30} {us:9.1f} us  {us * 1e3 / n:5.1f} ns/codeword")


if __name__ == "__main__":
    main()
