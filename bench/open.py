"""Opening a large store: a root index of N tensor records (default 100,000), timed through
qmoefmt.open, against a baseline in the same process of just reading the root file's
bytes and parsing its JSON (as is, and with the garbage collector paused, as qmoefmt
parses). The arrays are not created: opening must not touch them.

    python bench/open.py [--tensors 100000] [--reps 5]
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import qmoefmt
from qmoefmt import format as fmt


def make_root(path: Path, n: int) -> int:
    paths = fmt.tensor_paths(
        f"encoder.block.{i // 4096}.layer.1.mlp.experts.expert_{i % 4096}.wi.weight" for i in range(n))
    arr = {"data_type": "uint16", "shape": [123456], "crc32c": 4023233417}
    records = [{"name": p.removeprefix("tensors/"), "path": p, "shape": [3072, 768],
                "dtype": "bfloat16", "codec": fmt.CODEC_TERNARY, "dictionary": "sha256:" + "0" * 64,
                "quantizer": {"method": "rtn", "grid": "qmoe-ternary"},
                "symbol_counts": [2000000, 180000, 179296], "source_sha256": "f" * 64,
                "arrays": {"codes": arr, "row_codes": dict(arr, shape=[3072]),
                           "scales": dict(arr, shape=[3072, 2])}} for p in paths]
    meta = {"format_version": "1.0", "complete": True, "pack": {},
            "plan": {"tensors": n, "sha256": "0" * 64},
            "source": {"format": "safetensors", "name": "bench.safetensors"},
            "writer": {"name": "bench", "version": "0"}, "dictionaries": [], "tensors": records}
    raw = fmt.root_doc(meta)
    path.mkdir(parents=True, exist_ok=True)
    (path / "zarr.json").write_bytes(raw)
    return len(raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "big.qmoe"
        size = make_root(store, args.tensors)

        def baseline():
            json.loads((store / "zarr.json").read_bytes())

        def paused():
            # as qmoefmt parses: the collector off while the index's containers are built
            gc.disable()
            try:
                json.loads((store / "zarr.json").read_bytes())
            finally:
                gc.enable()

        def qopen():
            st = qmoefmt.open(store)
            assert len(st) == args.tensors

        rows = []
        for name, fn in (("read + json.loads", baseline), ("  collector paused", paused),
                         ("qmoefmt.open", qopen)):
            ts = []
            for _ in range(args.reps):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            rows.append((name, float(np.median(ts))))
    print(f"root index: {args.tensors:,} tensors, {size / 1e6:.1f} MB; median of {args.reps}")
    for name, t in rows:
        print(f"  {name:20} {t:7.3f} s   x{t / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()
