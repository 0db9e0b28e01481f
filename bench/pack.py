"""End-to-end pack benchmark: a generated bf16 Switch-style checkpoint (~4 GB by default)
packed with RTN ternary + adaptive dictionaries, in a subprocess so that its peak RSS is
its own. Baseline in the same run: a subprocess that only reads every tensor through the
same checkpoint reader (what pack cannot beat).

    python bench/pack.py [--gb 4] [--reps 3] [--keep] [--dir /tmp/qmoefmt-bench]

Reports median wall time, M params/s and peak RSS of each, and pack / read ratios; and
the pack into the single-file form (OUT.zip, spec §15: the directory store archived once
complete) against the pack into a directory, whose ratio the format issue bounds at 1.10.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

D_MODEL, D_FF = 768, 3072


def generate(path: Path, gb: float) -> tuple[int, int]:
    """Experts of switch-base shapes, heavy-tailed rows (student-t), plus dense tensors."""
    from qmoefmt.io.safetensors_writer import SafetensorsWriter

    per_expert = 2 * D_MODEL * D_FF
    n_experts = max(1, int(gb * 1e9 / 2 / per_expert))
    layers = max(1, n_experts // 64)
    per_layer = -(-n_experts // layers)
    entries = [("shared.weight", "bfloat16", [32128, D_MODEL])]
    for l in range(layers):
        for e in range(per_layer):
            for w, shape in (("wi", [D_FF, D_MODEL]), ("wo", [D_MODEL, D_FF])):
                entries.append((f"encoder.block.{2 * l + 1}.layer.1.mlp.experts.expert_{e}.{w}.weight",
                                "bfloat16", shape))
        entries.append((f"encoder.block.{2 * l + 1}.layer.1.mlp.router.classifier.weight",
                        "bfloat16", [per_layer, D_MODEL]))
    rng = np.random.default_rng(0)
    params = 0
    with SafetensorsWriter(path, entries) as w:
        for name, _, shape in entries:
            a = (rng.standard_t(5, size=shape).astype(np.float32) * 0.02).astype(ml_dtypes.bfloat16)
            w.write(name, a)
            params += a.size
    return params, len(entries)


CHILD_PACK = """
import sys, json, resource, time
from qmoefmt.pack import PackOptions, pack
t = time.perf_counter()
s = pack(sys.argv[1], sys.argv[2], PackOptions(preset="switch"))
print(json.dumps(dict(seconds=time.perf_counter() - t, params=s.params, bits=s.bits_per_param,
                      store_bytes=s.store_bytes,
                      rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""

CHILD_READ = """
import sys, json, resource, time
from qmoefmt.io.checkpoint import open_checkpoint
t = time.perf_counter(); n = 0
with open_checkpoint(sys.argv[1]) as c:
    for s in c.tensors():
        n += s.read().size
print(json.dumps(dict(seconds=time.perf_counter() - t, params=n, rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def run(code: str, *args: str) -> dict:
    env = dict(os.environ, NUMBA_NUM_THREADS=os.environ.get("NUMBA_NUM_THREADS", "2"))
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True,
                         text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/qmoefmt-bench")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    ckpt = d / f"switch-{args.gb:g}gb.safetensors"
    if not ckpt.exists():
        t = time.perf_counter()
        params, n = generate(ckpt, args.gb)
        print(f"generated {ckpt}: {n} tensors, {params:,} params, "
              f"{ckpt.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
    store = d / "store.qmoe"
    # warm-up: numba's cache and the page cache, so every rep sees the same conditions
    shutil.rmtree(store, ignore_errors=True)
    run(CHILD_READ, str(ckpt))
    archive = d / "store.qmoe.zip"
    reads, packs, zips = [], [], []
    for _ in range(args.reps):
        reads.append(run(CHILD_READ, str(ckpt)))
        shutil.rmtree(store, ignore_errors=True)
        packs.append(run(CHILD_PACK, str(ckpt), str(store)))
        archive.unlink(missing_ok=True)
        zips.append(run(CHILD_PACK, str(ckpt), str(archive)))
    med = lambda rs, k: float(np.median([r[k] for r in rs]))  # noqa: E731
    params = packs[0]["params"]
    print(f"\ncheckpoint {ckpt.stat().st_size / 1e9:.2f} GB, {params:,} params, "
          f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', '2')}, {args.reps} reps (median)")
    print(f"{'':14} {'seconds':>8} {'M params/s':>10} {'peak RSS MB':>11}")
    for name, rs in (("read only", reads), ("pack", packs), ("pack to .zip", zips)):
        print(f"{name:14} {med(rs, 'seconds'):8.2f} {params / med(rs, 'seconds') / 1e6:10.1f} "
              f"{med(rs, 'rss') / 2**20:11.0f}")
    print(f"pack / read time ratio: {med(packs, 'seconds') / med(reads, 'seconds'):.2f}")
    print(f"pack to .zip / pack time ratio: {med(zips, 'seconds') / med(packs, 'seconds'):.3f} "
          "(target <= 1.10)")
    print(f"store: {packs[0]['store_bytes'] / 1e6:.1f} MB, {packs[0]['bits']:.3f} bits/param; "
          f"archive {zips[0]['store_bytes'] / 1e6:.1f} MB")
    print(f"targets: >= 100 M params/s on 2 cores: {params / med(packs, 'seconds') / 1e6:.1f}; "
          f"peak RSS <= 1.5 GB: {med(packs, 'rss') / 2**30:.2f} GB")
    shutil.rmtree(store, ignore_errors=True)
    archive.unlink(missing_ok=True)
    if not args.keep:
        ckpt.unlink()


if __name__ == "__main__":
    main()
