"""GPTQ throughput on a batch of 16 experts with their Hessians given, against round to
nearest on the same weights in the same process (the baseline GPTQ must pay for).

    python bench/gptq_throughput.py [--threads 2] [--reps 3]

Issue target: GPTQ >= 5 M params/s on 2 CPU cores for 768x3072 experts. act-order is
pack's default; plain is QMoE's column order.
"""
from __future__ import annotations

import argparse

import torch

from qmoefmt.quantize import gptq
from qmoefmt.quantize import grids as quantizers
from _timing import median_time

E = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{E} experts, torch {torch.__version__}, {args.threads} threads, median of {args.reps}")
    print(f"{'method':22} {'W':>16} {'GPTQ M/s':>9} {'RTN M/s':>8} {'GPTQ/RTN time':>13}")
    for rows, cols in [(768, 3072), (3072, 768)]:
        g = torch.Generator().manual_seed(0)
        W = torch.randn(E, rows, cols, generator=g)
        H = torch.empty(E, cols, cols)
        for e in range(E):
            X = torch.randn(4096, cols, generator=g)
            H[e] = X.T @ X
        n = E * rows * cols
        grids = [("ternary", lambda ao: gptq.gptq_ternary(W, H, act_order=ao), lambda: quantizers.ternary_rtn(W)),
                 ("int3", lambda ao: gptq.gptq_kbit(W, H, 3, act_order=ao), lambda: quantizers.kbit_rtn(W, 3)),
                 ("int2 g128", lambda ao: gptq.gptq_kbit(W, H, 2, 128, act_order=ao),
                  lambda: quantizers.kbit_rtn(W, 2, 128))]
        for (grid, gptq_run, base), ao in [(g, ao) for g in grids for ao in (True, False)]:
            name = f"{grid} {'act-order' if ao else 'plain'}"
            run = lambda: gptq_run(ao)  # noqa: E731 - called at once, in this iteration
            t, tb = median_time(run, args.reps), median_time(base, args.reps)
            print(f"{name:22} {f'[{E},{rows},{cols}]':>16} {n / t / 1e6:9.2f} {n / tb / 1e6:8.1f} {t / tb:13.1f}")


if __name__ == "__main__":
    main()
