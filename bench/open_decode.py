"""Opening a real store of many tensors and decoding one: a store of --tensors (default
10,000) tiny expert tensors (16 x 64, ternary or 2-bit, round to nearest) packed by the
real pipeline (`qmoefmt.pack` from a safetensors file), then the time of
`qmoefmt.open(path)`, listing every name and decoding one tensor (the middle one, by name),
against a baseline of reading the root zarr.json and parsing its JSON.

Cold: each rep in a fresh Python process (nothing imported, Numba's kernels loaded from
its on-disk cache at the first decode), with `import qmoefmt` timed apart; the OS page
cache is warm (the store was just written or read). Warm: the same calls again in this
process after a first round. Building the store is not timed (85 s for 10,000 tensors
on two shared cores; --store keeps it for the next run). Target: open + list + decode
under 1 s, cold.

--layout zip packs the single-file form (spec §15; the baseline then reads the root
member with Python's zipfile) and reports the files per tensor beside the directory
form's: the format issue's target is at most 1 file per 50 tensors for 20,000 tensors.

    python bench/open_decode.py [--tensors 10000] [--bits ternary|2] [--layout directory|zip]
                                [--reps 5] [--store DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

SHAPE = (16, 64)
STEPS = ("root json", "open", "list", "decode")
# What a fresh process runs: the steps, each timed, as JSON on stdout. The baseline goes
# first so that the root file is read (if at all) from disk by it, not by open.
COLD = """
import json, sys, time
t0 = time.perf_counter()
import qmoefmt
t1 = time.perf_counter()
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from open_decode import steps
print(json.dumps(dict(steps(Path(sys.argv[1])), **{"import qmoefmt": t1 - t0})))
"""


def build(store: Path, n: int, bits: str) -> None:
    """n random expert tensors through the writer the pack command uses, with a progress bar."""
    import torch
    from safetensors.torch import save_file

    from qmoefmt.pack import PackOptions, pack

    rng = np.random.default_rng(0)
    tensors = {f"blocks.{i // 100}.mlp.experts.expert_{i % 100}.wi.weight":
               torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32) / 32)
               for i in range(n)}
    ckpt = store.with_name(store.name.split(".")[0] + ".safetensors")
    save_file(tensors, str(ckpt))
    total = sum(t.nbytes for t in tensors.values())      # what pack's progress counts
    with tqdm(total=total, unit="B", unit_scale=True, desc="build", file=sys.stderr) as bar:
        pack(ckpt, store, PackOptions(preset="switch", bits=bits), progress=bar.update)
    ckpt.unlink()


def steps(store: Path) -> list[tuple[str, float]]:
    """(step, seconds) of the baseline, then open, list every name, decode one."""
    import qmoefmt

    out, t = [], time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        out.append((name, now - t))
        t = now

    if store.suffix == ".zip":
        import zipfile
        with zipfile.ZipFile(store) as z:
            json.loads(z.read("zarr.json"))
    else:
        json.loads((store / "zarr.json").read_bytes())
    lap("root json")
    st = qmoefmt.open(store)
    lap("open")
    names = sorted(st)
    lap("list")
    w = st[names[len(names) // 2]].decode()
    lap("decode")
    assert w.shape == SHAPE and len(names) > 1
    return out


def cold(store: Path, reps: int) -> dict[str, float]:
    """Medians over fresh processes, the whole process's wall time among them."""
    runs = []
    for _ in range(reps):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", COLD, str(store), str(Path(__file__).parent)],
                           check=True, capture_output=True, text=True)
        runs.append(dict(json.loads(r.stdout), process=time.perf_counter() - t))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def warm(store: Path, reps: int) -> dict[str, float]:
    steps(store)                                        # imports, Numba, the page cache
    runs = [dict(steps(store)) for _ in range(reps)]
    return {k: statistics.median(r[k] for r in runs) for k in STEPS}


def report(store: Path, c: dict, w: dict, reps: int) -> None:
    import numba

    import qmoefmt

    st = qmoefmt.open(store)
    n, size = len(st), (st.path / "zarr.json").stat().st_size
    files = 1 if store.is_file() else sum(1 for p in store.rglob("*") if p.is_file())
    print(f"{n:,} tensors {SHAPE[0]}x{SHAPE[1]}, root index {size / 1e6:.1f} MB, {files:,} "
          f"files ({files / n * 50:.3g} per 50 tensors: target <= 1 for the single-file "
          f"form); median of {reps}, seconds, Numba {numba.get_num_threads()} threads; "
          "x = over the root-json baseline")
    print(f"  {'':24} {'cold':>8} {'x':>6} {'warm':>8} {'x':>6}")
    for k in STEPS:
        print(f"  {k:24} {c[k]:8.4f} {c[k] / c['root json']:6.1f} {w[k]:8.4f} "
              f"{w[k] / w['root json']:6.1f}")
    total_c, total_w = (sum(d[k] for k in STEPS[1:]) for d in (c, w))
    ok = "met" if total_c < 1 else "MISSED"
    print(f"  {'open + list + decode':24} {total_c:8.4f} {'':6} {total_w:8.4f}   "
          f"target < 1 s cold: {ok}")
    print(f"  {'import qmoefmt':24} {c['import qmoefmt']:8.4f}")
    print(f"  {'whole process':24} {c['process']:8.4f}   (interpreter start, import, "
          "baseline and the steps)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=10_000)
    ap.add_argument("--bits", choices=["ternary", "2"], default="ternary")
    ap.add_argument("--layout", choices=["directory", "zip"], default="directory")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--store", type=Path, help="build the store here, or reuse it if it exists")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or Path(tmp) / ("many.qmoe.zip" if args.layout == "zip" else "many.qmoe")
        if not store.exists():
            t = time.perf_counter()
            build(store, args.tensors, args.bits)
            print(f"built {store} in {time.perf_counter() - t:.0f} s (not timed below)")
        report(store, cold(store, args.reps), warm(store, args.reps), args.reps)


if __name__ == "__main__":
    main()
