"""Codec benchmark: rates against the order-0 entropy, per-tensor sizes against
qmoe-2023, and encode/decode throughput against a 2-bit packing baseline run in the same
process (the GGUF TQ2_0 idea: every symbol in 2 bits, numpy).

    python bench/codec.py [--reps 5] [--quick]

Data: iid ternary symbols (lo and hi equally likely) at each P(0), on the six Switch
expert shapes (rows x cols). Medians of --reps runs; numba's JIT is warmed up first.
"""
from __future__ import annotations

import argparse
import math

import numba
import numpy as np

from qmoefmt.dictionaries import stream as codec
from qmoefmt.dictionaries.golomb import build_golomb, ladder_point
from qmoefmt.dictionaries.qmoe2023 import build_qmoe2023
from _timing import median_time

P0S = (0.80, 0.885, 0.93, 0.97)
SHAPES = ((768, 3072), (3072, 768), (1024, 4096), (4096, 1024), (2080, 6144), (6144, 2080))


def entropy(p0: float) -> float:
    p1 = (1 - p0) / 2
    return -(p0 * math.log2(p0) + 2 * p1 * math.log2(p1))


def symbols(rng, p0: float, rows: int, cols: int) -> np.ndarray:
    u = rng.random((rows, cols), dtype=np.float32)
    return np.where(u < p0, 0, np.where(u < p0 + (1 - p0) / 2, 1, 2)).astype(np.int8)


def tensor_bytes(codes, row_codes, rows) -> int:
    """codes + row_codes + scales (two bf16 per row), as stored."""
    return codes.nbytes + row_codes.nbytes + 4 * rows


# -- baseline: 2 bits per symbol, packed and unpacked with numpy -------------------------
LUT = np.array([0.0, -1.0, 1.0, 0.0], np.float32)


def pack2(sym):
    s = sym.reshape(sym.shape[0], -1, 4).astype(np.uint8)
    return s[..., 0] | s[..., 1] << 2 | s[..., 2] << 4 | s[..., 3] << 6


def unpack2(packed, out):
    for j in range(4):
        out[:, j::4] = LUT[(packed >> (2 * j)) & 3]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="two shapes, fewer reps")
    args = ap.parse_args()
    shapes = SHAPES[:2] if args.quick else SHAPES
    reps = 3 if args.quick else args.reps
    rng = np.random.default_rng(0)
    dq = build_qmoe2023()
    print(f"numba threading layer: {numba.config.THREADING_LAYER}, cores: {numba.config.NUMBA_NUM_THREADS}")

    print("\n## Rates (bits per weight) and per-tensor size")
    print("codes-only = 16 * codewords / weights; tensor = codes + row_codes + scales; "
          "QMoE layout = int32 offsets (rows+1) + codes + scales, as QMoE stores it")
    print(f"{'P(0)':>6} {'shape':>10} {'entropy':>8} | {'adaptive':>8} {'x H':>6} | {'qmoe23':>8} {'x H':>6} |"
          f" {'tensor a':>8} {'tensor q':>8} {'a/q':>6} {'QMoE lay.':>9} {'a/QMoE':>6}")
    results = []
    for p0 in P0S:
        da = build_golomb(ladder_point(p0))
        h = entropy(p0)
        for rows, cols in shapes:
            sym = symbols(rng, p0, rows, cols)
            n = sym.size
            ca, ra = codec.encode(sym, da)
            cq, rq = codec.encode(sym, dq)
            rate_a, rate_q = 16 * ca.size / n, 16 * cq.size / n
            ta, tq = 8 * tensor_bytes(ca, ra, rows) / n, 8 * tensor_bytes(cq, rq, rows) / n
            tqmoe = 8 * (cq.nbytes + 4 * (rows + 1) + 4 * rows) / n
            results.append((p0, rows, cols, rate_a / h, ta / tq))
            print(f"{p0:6.3f} {rows:>4}x{cols:<5} {h:8.4f} | {rate_a:8.4f} {rate_a / h:6.3f} | "
                  f"{rate_q:8.4f} {rate_q / h:6.3f} | {ta:8.4f} {tq:8.4f} {ta / tq:6.3f} "
                  f"{tqmoe:9.4f} {ta / tqmoe:6.3f}")

    print("\n## Throughput (M weights/s, median), vs 2-bit numpy packing baseline")
    print(f"{'P(0)':>6} {'shape':>10} {'dict':>10} {'thr':>3} | {'encode':>7} {'base':>6} {'x':>5} |"
          f" {'decode f32':>10} {'base':>6} {'x':>5} | {'symbols':>7}")
    for p0 in P0S:
        da = build_golomb(ladder_point(p0))
        for rows, cols in shapes:
            sym = symbols(rng, p0, rows, cols)
            n = sym.size
            out = np.empty((rows, cols), np.float32)
            lo = np.full(rows, -1.0, np.float32)
            hi = np.full(rows, 1.0, np.float32)
            packed = pack2(sym)
            tb_enc = median_time(lambda: pack2(sym), reps)
            tb_dec = median_time(lambda: unpack2(packed, out), reps)
            for d in (da, dq):
                codes, rc = codec.encode(sym, d)
                for threads in (1, 2):
                    numba.set_num_threads(threads)
                    codec.encode(sym[:4], d)
                    te = median_time(lambda: codec.encode(sym, d), reps)
                    td = median_time(lambda: codec.decode_values(codes, rc, cols, d, lo, hi, out=out), reps)
                    ts = median_time(lambda: codec.decode_symbols(codes, rc, cols, d), reps)
                    name = "adaptive" if d is da else "qmoe-2023"
                    print(f"{p0:6.3f} {rows:>4}x{cols:<5} {name:>10} {threads:>3} | "
                          f"{n / te / 1e6:7.0f} {n / tb_enc / 1e6:6.0f} {tb_enc / te:5.2f} | "
                          f"{n / td / 1e6:10.0f} {n / tb_dec / 1e6:6.0f} {tb_dec / td:5.2f} | "
                          f"{n / ts / 1e6:7.0f}")
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)

    print("\n## Targets")
    wide = [r for r in results if r[2] >= 3072]
    print(f"adaptive codes-only <= 1.05 x H on rows >= 3072 wide: worst {max(r[3] for r in wide):.4f}")
    for p0, bound in ((0.885, 0.90), (0.93, 0.75)):
        worst = max(r[4] for r in results if r[0] == p0)
        print(f"tensor size adaptive / qmoe-2023 at P(0)={p0}: worst {worst:.3f} "
              f"(target <= {bound:.2f}, i.e. >= {100 * (1 - bound):.0f}% smaller)")


if __name__ == "__main__":
    main()
