"""Where a ternary row walk's time goes: ns per codeword for the state chain alone (one
row at a time, then four rows in lockstep), for decode_values and for the fused matvec,
in one process on one thread. The runtime issue's targets need a few ns per codeword.

    python bench/row_walk.py [--p0 0.885] [--shape 768 3072]
"""
from __future__ import annotations

import argparse

import numba as nb
import numpy as np

from qmoefmt.dictionaries import build_golomb
from qmoefmt.dictionaries.golomb import ladder_point
from qmoefmt.dictionaries.stream import decode_values, encode, matmul_values, row_offsets

from _timing import median_time


@nb.njit(nogil=True)
def chain_one_row_at_a_time(codes, offsets, chain):
    total = 0
    for r in range(offsets.shape[0] - 1):
        state = pos = 0
        for j in range(offsets[r], offsets[r + 1]):
            c = chain[(state << 16) | codes[j]]
            state, pos = c & 0xFF, pos + (c >> 8)
        total += pos
    return total


@nb.njit(nogil=True, inline="always")
def _link(codes, j, state, pos, chain):
    c = chain[(state << 16) | codes[j]]
    return c & 0xFF, pos + (c >> 8)


@nb.njit(nogil=True)
def chain_four_rows_in_lockstep(codes, offsets, chain):
    """Four independent chains in registers: their loads overlap. The codewords past the
    shortest of the four rows are left out (this measures the overlap, not a decoder)."""
    total = 0
    for r in range(0, offsets.shape[0] - 4, 4):
        j0, j1, j2, j3 = offsets[r], offsets[r + 1], offsets[r + 2], offsets[r + 3]
        n = min(j1 - j0, j2 - j1, j3 - j2, offsets[r + 4] - j3)
        s0 = s1 = s2 = s3 = p0 = p1 = p2 = p3 = 0
        for i in range(n):
            s0, p0 = _link(codes, j0 + i, s0, p0, chain)
            s1, p1 = _link(codes, j1 + i, s1, p1, chain)
            s2, p2 = _link(codes, j2 + i, s2, p2, chain)
            s3, p3 = _link(codes, j3 + i, s3, p3, chain)
        total += p0 + p1 + p2 + p3
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--p0", type=float, default=0.885)
    ap.add_argument("--shape", type=int, nargs=2, default=[768, 3072])
    ap.add_argument("--reps", type=int, default=21)
    args = ap.parse_args()
    nb.set_num_threads(1)
    rows, cols = args.shape
    rng = np.random.default_rng(0)
    u = rng.random((rows, cols), dtype=np.float32)
    p0 = args.p0
    sym = np.where(u < p0, 0, np.where(u < (1 + p0) / 2, 1, 2)).astype(np.int8)
    d = build_golomb(ladder_point(p0))
    codes, rc = encode(sym, d)
    offsets = row_offsets(rc, len(codes), cols)
    chain = d.runtime_chain()
    rec = d.runtime_records()[0]
    lo, hi = np.full(rows, -0.01, np.float32), np.full(rows, 0.01, np.float32)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    print(f"{rows}x{cols}, P(0) {p0}: {len(codes):,} codewords, {d.n_states} states, tables "
          f"{(chain.nbytes + rec.nbytes) / 2**20:.1f} MiB; one thread, median of {args.reps}")
    steps = [("chain, one row at a time",
              lambda: chain_one_row_at_a_time(codes, offsets, chain)),
             ("chain, four rows in lockstep",
              lambda: chain_four_rows_in_lockstep(codes, offsets, chain)),
             ("decode_values", lambda: decode_values(codes, rc, cols, d, lo, hi)),
             ("matvec (fused)", lambda: matmul_values(codes, rc, cols, d, lo, hi, x))]
    base = None
    for name, fn in steps:
        fn()
        t = median_time(fn, args.reps)
        base = base or t
        print(f"  {name:30} {t * 1e6:9.0f} us  {t / len(codes) * 1e9:6.2f} ns/codeword  "
              f"x{t / base:.2f}")


if __name__ == "__main__":
    main()
