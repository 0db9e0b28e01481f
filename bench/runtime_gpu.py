"""The GPU runtime (qmoefmt.backends.cuda) against torch on the same GPU:

1. products Y = X W^T vs torch bf16 `X @ W.T` (cuBLAS) at batch 1, 4, 16 on the six
   Switch shapes and 4096x14336 / 14336x4096: ternary golomb-v2f at P(0) 0.885 (and
   QMoE's qmoe-2023 dictionary), 2-bit uint-packed and 2-bit uint-dict16; cold (rotating
   over distinct copies of the expert, together over 3x the L2) and hot (one copy);
2. dense decode (fp32, bf16 out) against a measured device-to-device copy, as bytes
   written per second;
3. tokens/s of the bundled model run from its store on the GPU, vs the same model dense.

GPU times come from CUDA events around a burst of calls queued behind a spin kernel, so
that Python's launch overhead does not show (each burst is checked to have been queued
before the spin ended); medians over bursts, in microseconds. Ratios are torch / ours
(> 1: ours is faster). Correctness: each product is compared with torch fp32 first.

    python bench/runtime_gpu.py [--quick] [--batch 1 4 16] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qmoefmt.backends import cuda
from qmoefmt.codecs.kbit_grid import dequantize
from qmoefmt.codecs.ternary_dict16 import TernaryWeight
from qmoefmt.codecs.uint_dict16 import DictLevelsWeight, split
from qmoefmt.codecs.uint_packed import PackedWeight, pack_levels
from qmoefmt.dictionaries import build_golomb, build_qmoe2023
from qmoefmt.dictionaries.golomb import ladder_point
from qmoefmt.dictionaries.stream import encode, row_offsets

SWITCH = [(768, 3072), (3072, 768), (1024, 4096), (4096, 1024), (2080, 6144), (6144, 2080)]
LARGE = [(4096, 14336), (14336, 4096)]
BURST = 64
SPIN_CYCLES_PER_CALL = 400_000      # ~200 us at 2 GHz: more than Python takes a call


def ternary(shape, p0, d, rng):
    rows, cols = shape
    u = rng.random((rows, cols), dtype=np.float32)
    sym = np.where(u < p0, 0, np.where(u < (1 + p0) / 2, 1, 2)).astype(np.int8)
    codes, rc = encode(sym, d)
    lo = -np.abs(rng.standard_normal(rows)).astype(np.float32) / 64
    hi = np.abs(rng.standard_normal(rows)).astype(np.float32) / 64
    dense = np.where(sym == 1, lo[:, None], np.where(sym == 2, hi[:, None], 0)).astype(np.float32)
    return TernaryWeight("bench", shape, codes, row_offsets(rc, codes.size, cols), lo, hi, d), dense


def two_bit(shape, rng):
    """Levels as 2-bit GPTQ experts have them: 70% on the zero point, 29% one step off."""
    rows, cols = shape
    step = rng.choice([-2, -1, 0, 1], size=(rows, cols), p=[0.005, 0.145, 0.70, 0.15])
    zeros = np.full((rows, 1), 2, np.uint8)
    levels = (step + 2).astype(np.uint8)
    sc = (np.abs(rng.standard_normal((rows, 1))).astype(np.float32) / 64)
    sc = (sc.view(np.uint32) >> 16 << 16).view(np.float32)
    return levels, zeros, sc, dequantize(levels, sc, zeros, cols)


def packed(shape, rng):
    levels, zeros, sc, dense = two_bit(shape, rng)
    return PackedWeight("bench", shape, pack_levels(levels, 2), sc, zeros, 2, shape[1]), dense


def dict16(shape, d, rng):
    levels, zeros, sc, dense = two_bit(shape, rng)
    rows, cols = shape
    ternary_, counts, ecols, elevels = split(levels, zeros, cols)
    codes, rc = encode(ternary_, d)
    ends = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    return DictLevelsWeight("bench", shape, codes, row_offsets(rc, codes.size, cols), counts, ends,
                            ecols, elevels, sc, zeros, d, 2, cols), dense


def gpu_us(calls, reps: int) -> float:
    """Median over `reps` bursts of BURST calls (rotating over `calls`) of the GPU time a
    call, queued behind a spin so that the GPU runs them back to back; NaN for a burst
    whose queueing outlasted the spin (the GPU would have waited for Python)."""
    for c in calls:
        c()                          # compiles, and each weight's first-use check (a sync)
    torch.cuda.synchronize()
    times = []
    turn = 0
    for _ in range(reps):
        es, e0, e1 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        es.record()
        torch.cuda._sleep(SPIN_CYCLES_PER_CALL * BURST)
        t = time.perf_counter()
        e0.record()
        for _ in range(BURST):
            calls[turn % len(calls)]()
            turn += 1
        e1.record()
        queued_ms = (time.perf_counter() - t) * 1e3
        e1.synchronize()
        spin_ms = es.elapsed_time(e0)
        times.append(e0.elapsed_time(e1) * 1e3 / BURST if queued_ms < spin_ms else float("nan"))
    ok = [t for t in times if t == t]
    return statistics.median(ok) if ok else float("nan")


def copies(weight, n: int):
    return [weight.copy(cuda.to_device) for _ in range(n)]


def bench_products(shapes, batches, reps, out):
    rng = np.random.default_rng(0)
    l2 = cuda.cupy().cuda.Device().attributes["L2CacheSize"]
    golomb, qmoe = build_golomb(ladder_point(0.885)), build_qmoe2023()
    g70 = build_golomb(ladder_point(0.70))
    print(f"L2 {l2 >> 20} MiB; cold = rotating over > 3x L2 of distinct copies")
    print(f"{'W (out x in)':>13} {'kind':>9} {'batch':>5} | {'ours cold':>9} {'bf16 cold':>9} "
          f"{'ratio':>6} | {'ours hot':>8} {'bf16 hot':>8} {'ratio':>6} | {'max err':>8}")
    for shape in shapes:
        rows, cols = shape
        for kind, make in (("t-0.885", lambda: ternary(shape, 0.885, golomb, rng)),
                           ("t-qmoe", lambda: ternary(shape, 0.885, qmoe, rng)),
                           ("2bit", lambda: packed(shape, rng)),
                           ("dict16", lambda: dict16(shape, g70, rng))):
            host, dense = make()
            n = max(2, -(-3 * l2 // max(1, host.nbytes)))
            ws = copies(host, n)
            wd = torch.from_numpy(dense).cuda()
            nb = max(2, -(-3 * l2 // (rows * cols * 2)))
            wb = [wd.to(torch.bfloat16).clone() for _ in range(nb)]
            for batch in batches:
                x = torch.randn(batch, cols, device="cuda")
                xb = x.to(torch.bfloat16)
                ref = x.double() @ wd.double().T
                err = float((cuda.matmul(ws[0], x).double() - ref).abs().max())
                ours = [lambda w=w: cuda.matmul(w, x) for w in ws]
                theirs = [lambda w=w: xb @ w.T for w in wb]
                cold = gpu_us(ours, reps), gpu_us(theirs, reps)
                hot = gpu_us(ours[:1], reps), gpu_us(theirs[:1], reps)
                row = dict(shape=list(shape), kind=kind, batch=batch, ours_cold_us=cold[0],
                           bf16_cold_us=cold[1], ours_hot_us=hot[0], bf16_hot_us=hot[1],
                           max_abs_err=err, compressed_bytes=host.nbytes)
                out.add("products", row)
                print(f"{rows:>6}x{cols:<6} {kind:>9} {batch:>5} | {cold[0]:>9.1f} "
                      f"{cold[1]:>9.1f} {cold[1] / cold[0]:>6.2f} | {hot[0]:>8.1f} "
                      f"{hot[1]:>8.1f} {hot[1] / hot[0]:>6.2f} | {err:>8.1e}", flush=True)
            del ws, wb


def bench_decode(shapes, reps, out):
    """Bytes written a second by dense decode vs by a device-to-device copy."""
    rng = np.random.default_rng(1)
    cp = cuda.cupy()
    golomb = build_golomb(ladder_point(0.885))
    src = cp.empty(1 << 30, np.uint8)
    dst = cp.empty_like(src)
    copy_us = gpu_us([lambda: dst.data.copy_from_device_async(src.data, src.nbytes)], reps)
    copy_bw = src.nbytes / copy_us / 1e3
    print(f"device-to-device copy: {copy_bw:.0f} GB/s written")
    out["copy_gb_s"] = copy_bw      # saved with the first decode row
    del src, dst
    for shape in shapes:
        for kind, make in (("t-0.885", lambda: ternary(shape, 0.885, golomb, rng)),
                           ("2bit", lambda: packed(shape, rng))):
            w = make()[0].copy(cuda.to_device)
            for dtype, size in (("float32", 4), ("bfloat16", 2)):
                us = gpu_us([lambda: cuda.decode(w, dtype)], reps)
                bw = shape[0] * shape[1] * size / us / 1e3
                out.add("decode", dict(shape=list(shape), kind=kind, dtype=dtype, us=us,
                                          gb_s=bw, of_copy=bw / copy_bw))
                print(f"decode {shape[0]:>6}x{shape[1]:<6} {kind:>7} {dtype:>8}: {us:8.1f} us "
                      f"{bw:6.0f} GB/s = {bw / copy_bw:5.1%} of copy", flush=True)


def bench_model(out, reps):
    """Tokens/s of the bundled model from its store (ternary, qmoe-2023) on the GPU."""
    import qmoefmt
    from qmoefmt.demo.model import load_model as load_dense
    from qmoefmt.pack import PackOptions, pack
    from qmoefmt.testing import paths
    from qmoefmt.torch import load_model
    with tempfile.TemporaryDirectory() as tmp:
        store_path = Path(tmp) / "moe-tiny.qmoe"
        pack(paths.checkpoint("moe-tiny"), store_path,
             PackOptions(preset="switch", dictionary="qmoe-2023"))
        store = qmoefmt.open(store_path)
        coded = load_dense(paths.checkpoint("moe-tiny")).eval()
        load_model(store, coded, preset="switch")
        coded.cuda()
        dense = load_dense(paths.checkpoint("moe-tiny")).eval().cuda()
        for batch, ctx in ((1, 256), (8, 256)):
            tokens = torch.randint(0, 256, (batch, ctx), device="cuda")
            for name, model in (("store", coded), ("dense", dense)):
                with torch.no_grad():
                    model(tokens)
                    torch.cuda.synchronize()
                    ts = []
                    for _ in range(reps):
                        t = time.perf_counter()
                        model(tokens)
                        torch.cuda.synchronize()
                        ts.append(time.perf_counter() - t)
                tps = batch * ctx / statistics.median(ts)
                out.add("model", dict(model=name, batch=batch, context=ctx, tokens_s=tps))
                print(f"bundled model, {name:>5}, {batch} x {ctx} tokens: {tps:10.0f} tokens/s",
                      flush=True)


class Results(dict):
    """The figures, written to `path` (if any) as each one comes: a run cut short keeps
    what it measured."""

    def __init__(self, path: Path | None, **head):
        super().__init__(head, products=[], decode=[], model=[])
        self.path = path

    def add(self, section: str, row: dict) -> None:
        self[section].append(row)
        if self.path is not None:
            self.path.write_text(json.dumps(self, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes only")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    shapes = [(1024, 4096), (4096, 14336)] if args.quick else SWITCH + LARGE
    if not cuda.available():
        raise SystemExit("no CUDA GPU (or no CuPy): nothing to measure")
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, torch {torch.__version__}, cupy {cuda.cupy().__version__}")
    out = Results(args.json, device=props.name)
    bench_products(shapes, args.batch, args.reps, out)
    bench_decode([(4096, 14336), (14336, 4096)], args.reps, out)
    bench_model(out, args.reps)


if __name__ == "__main__":
    main()
