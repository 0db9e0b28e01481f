"""Fused decode-matmul Y = X W^T from the compressed arrays vs torch's dense X @ W.T:
ternary codewords (golomb-v2f at P(0) 0.885 and 0.93), 2-bit bit-packed levels
(uint-packed, per-row RTN min-max of gaussian weights) and 2-bit dictionary-coded levels
(uint-dict16, one group a row, levels drawn as 2-bit GPTQ experts have them: 70% on the
zero point, 29% one step off, 1% two).

Cold, as an MoE runs its experts: each call takes the next of enough distinct experts
that their dense fp32 weights exceed --cold-gb; hot: one expert again and again. Times
are medians over the rotation, in microseconds, with torch's time over ours as the
ratio (> 1: ours is faster). Run on an otherwise idle machine.

    python bench/runtime.py [--quick] [--threads 1 2] [--batch 1 4 16] [--cold-gb 1.0]
"""
from __future__ import annotations

import argparse
import math

import numba
import numpy as np
import torch

from qmoefmt.dictionaries import build_golomb
from qmoefmt.dictionaries.golomb import ladder_point
from qmoefmt.codecs.kbit_grid import dequantize
from qmoefmt.codecs.uint_dict16 import DictLevelsWeight, split
from qmoefmt.codecs.uint_packed import pack_levels
from qmoefmt.dictionaries.stream import decode_values, encode, matmul_values, row_offsets
from qmoefmt.quantize.grids import kbit_rtn
from qmoefmt import backends

from _timing import median_time

SWITCH = [(768, 3072), (3072, 768), (1024, 4096), (4096, 1024), (2080, 6144), (6144, 2080)]
LARGE = [(4096, 14336), (14336, 4096)]


def experts(shape, p0: float, n: int, rng):
    """n random ternary experts at P(0) = p0, coded with the fitted golomb-v2f dictionary:
    [(codes, row_codes, lo, hi, dense fp32 torch, dense bf16 torch)], and the dictionary."""
    rows, cols = shape
    d = build_golomb(ladder_point(p0))
    out = []
    for _ in range(n):
        u = rng.random((rows, cols), dtype=np.float32)
        sym = np.where(u < p0, 0, np.where(u < (1 + p0) / 2, 1, 2)).astype(np.int8)
        codes, rc = encode(sym, d)
        lo = -np.abs(rng.standard_normal(rows)).astype(np.float32) / 64
        hi = np.abs(rng.standard_normal(rows)).astype(np.float32) / 64
        w = torch.from_numpy(decode_values(codes, rc, cols, d, lo, hi))
        out.append((codes, rc, lo, hi, w, w.to(torch.bfloat16)))
    return out, d


def kbit_experts(shape, n: int, rng):
    """n 2-bit experts, per-row RTN of gaussian weights: [(q, scales, zeros, fp32, bf16)]."""
    rows, cols = shape
    out = []
    for _ in range(n):
        q, sc, z = kbit_rtn(torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32)),
                            2, None)
        q, sc, z = q.numpy().astype(np.uint8), sc.numpy()[:, :1].copy(), z.numpy()[:, :1].astype(np.uint8)
        w = torch.from_numpy(dequantize(q, sc, z, cols))
        out.append((pack_levels(q, 2), sc, z, w, w.to(torch.bfloat16)))
    return out


def dict16_experts(shape, n: int, rng):
    """n 2-bit uint-dict16 experts: [(DictLevelsWeight, fp32, bf16)]."""
    rows, cols = shape
    d = build_golomb(ladder_point(0.70))
    out = []
    for _ in range(n):
        step = rng.choice([-2, -1, 0, 1, 2], size=(rows, cols), p=[0.005, 0.145, 0.70, 0.145, 0.005])
        zeros = np.full((rows, 1), 2, np.uint8)
        levels = (step + 2).astype(np.uint8)
        ternary, counts, cols_e, levels_e = split(levels, zeros, cols)
        codes, rc = encode(ternary, d)
        sc = (np.abs(rng.standard_normal((rows, 1))).astype(np.float32) / 64)
        ends = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        w = DictLevelsWeight("bench", shape, codes, row_offsets(rc, len(codes), cols), counts,
                             ends, cols_e, levels_e, sc, zeros, d, 2, cols, checked=True)
        dense = torch.from_numpy(dequantize(levels, sc, zeros, cols))
        out.append((w, dense, dense.to(torch.bfloat16)))
    return out


def median_us(fn, items, reps: int) -> float:
    """Median of one call each on items, in turn (cold when they are many)."""
    fn(items[0])                                   # compile / warm the code, not the data
    turn = iter(items * reps)
    return median_time(lambda: fn(next(turn)), len(items) * reps) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, P(0) 0.885 only")
    ap.add_argument("--kinds", nargs="+", default=None,
                    help="of 0.885 0.93 2-bit dict16 (default: all; --quick: 0.885 2-bit)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--p0", type=float, nargs="+", default=[0.885, 0.93])
    ap.add_argument("--cold-gb", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    shapes = [(768, 3072), (4096, 14336)] if args.quick else SWITCH + LARGE
    p0s = [0.885] if args.quick else args.p0
    kinds = ([float(k) if k[0].isdigit() and "." in k else k for k in args.kinds] if args.kinds
             else p0s + ["2-bit"] + ([] if args.quick else ["dict16"]))
    rng = np.random.default_rng(0)
    print(f"numba {numba.__version__}, torch {torch.__version__}; cold = rotating over "
          f">= {args.cold_gb} GB of fp32 weights")
    print(f"{'W (out x in)':>13} {'kind':>5} {'thr':>3} {'batch':>5} | {'ours cold':>9} "
          f"{'fp32':>8} {'bf16':>8} {'fp32/ours':>9} {'bf16/ours':>9} | {'ours hot':>8} "
          f"{'fp32':>8} {'bf16':>8}")
    kernels = backends.get()
    for shape in shapes:
        rows, cols = shape
        n = max(2, math.ceil(args.cold_gb * 2**30 / (rows * cols * 4)))
        for p0 in kinds:
            if p0 == "dict16":
                items = dict16_experts(shape, n, rng)

                def ours(it, x):
                    it[0].matmul(x)
            elif p0 == "2-bit":
                items = kbit_experts(shape, n, rng)

                def ours(it, x):
                    y = np.empty((x.shape[0], rows), np.float32)
                    kernels.kbit_matmul(it[0], 2, cols, cols, it[1], it[2],
                                        np.ascontiguousarray(x.T), y, np.zeros(rows, np.uint8))
            else:
                items, d = experts(shape, p0, n, rng)

                def ours(it, x, d=d):
                    matmul_values(it[0], it[1], cols, d, it[2], it[3], x)
            for threads in args.threads:
                numba.set_num_threads(threads)
                torch.set_num_threads(threads)
                for batch in args.batch:
                    x = rng.standard_normal((batch, cols)).astype(np.float32)
                    xt, xb = torch.from_numpy(x), torch.from_numpy(x).to(torch.bfloat16)
                    fns = (lambda it: ours(it, x), lambda it: xt @ it[-2].T,
                           lambda it: xb @ it[-1].T)
                    cold = [median_us(f, items, args.reps) for f in fns]
                    hot = [median_us(f, items[:1] * 8, args.reps) for f in fns]
                    print(f"{rows:>6}x{cols:<6} {p0:>5} {threads:>3} {batch:>5} | "
                          f"{cold[0]:>9.0f} {cold[1]:>8.0f} {cold[2]:>8.0f} "
                          f"{cold[1] / cold[0]:>9.2f} {cold[2] / cold[0]:>9.2f} | "
                          f"{hot[0]:>8.0f} {hot[1]:>8.0f} {hot[2]:>8.0f}", flush=True)
            del items

if __name__ == "__main__":
    main()
