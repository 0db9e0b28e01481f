"""The hardening issue's memory and time bound, measured: hostile stores of at most 64 MiB
on disk, each examined (open, decode every tensor, verify --deep) in a fresh child whose
peak resident memory above its warmed-up size is compared with the largest output the
store legitimately produces (a decoded tensor, in float32 or its own dtype).

    python scripts/memory_bound.py [--json]

The bound: peak - largest output <= 1 GiB, and at most 10 s per MiB of store plus output.
The cases are the issue's reproducers: the seed corpus's re-signed mutants (zero-row
tensors of huge width, widths enlarged, dictionary params.k, ...), a dictionary whose
every entry is 65,535 zeros (2^28 symbols from 32 KiB of codes), a tensor's zarr.json
replaced by a 3 GiB sparse file, and 64 MiB roots dense in values."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmoefmt.testing import fuzz  # noqa: E402
from qmoefmt.testing.fuzz_targets import make_targets  # noqa: E402

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "fuzz_corpus.jsonl"
GiB, MiB = 1 << 30, 1 << 20

CHILD = r"""
import json, sys, time
from pathlib import Path
import numpy as np
import qmoefmt, qmoefmt.backends.cpu
from qmoefmt.errors import QmoeError
from qmoefmt.store.verify import verify

def hwm(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

# warm the decoders on a small store first, so compilation is not counted
st = qmoefmt.open(sys.argv[2])
for t in st.tensors():
    t.decode()
verify(sys.argv[2], deep=True)
del st, t
base = hwm("VmRSS:")

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")     # VmHWM back to the current size

t0 = time.perf_counter()
out, result, peaks = 0, "accepted", []
try:
    try:
        st = qmoefmt.open(sys.argv[1])
        for t in st.tensors():
            out = max(out, int(np.prod(t.shape, dtype=object)) * 4)
            t.decode()
    except QmoeError as e:
        result = "refused: " + str(e)
    st = t = None
    peaks.append(hwm("VmHWM:") - base)
    reset_peak()
    problems = verify(sys.argv[1], deep=True)
    peaks.append(hwm("VmHWM:") - base)
    if problems and result == "accepted":
        result = "refused: " + str(problems[0])
except MemoryError:
    result = "memory"
print(json.dumps({"peak_above": max(peaks + [0]), "output": out,
                  "seconds": time.perf_counter() - t0, "result": result[:160]}))
"""


def measure(store: Path, warm: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(store), str(warm)],
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    if r.returncode != 0:
        return {"result": f"crash: {r.stderr.strip().splitlines()[-1:]}", "peak_above": 0,
                "output": 0, "seconds": 0.0}
    return json.loads(r.stdout.strip().splitlines()[-1])


def disk_bytes(store: Path) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in store.rglob("*") if p.is_file())


def expanding_dictionary(base: Path, into: Path) -> Path:
    """A store whose one ternary tensor [256, 2^20 - 16] decodes from 16 codewords a row
    through a dictionary of 65,535-zero entries: 2^28 symbols, a 1 GiB float32 output."""
    from qmoefmt.dictionaries.tables import Dictionary
    from qmoefmt.format import constants as C
    from qmoefmt.store.writer import StoreWriter, write_arrays
    root = json.loads((base / "zarr.json").read_bytes())["attributes"]["qmoefmt"]
    shape = (1, C.CODEWORDS)
    d = Dictionary(kind="golomb-v2f", params={"p_zero": 0.99999}, form="tables",
                   length=np.full(shape, 65535, np.uint16),
                   next_state=np.zeros(shape, np.uint8), nnz=np.zeros(shape, np.uint8),
                   nz_pos=np.zeros(shape + (1,), np.uint16), nz_sym=np.zeros(shape + (1,), np.uint8))
    d.validate()
    w = StoreWriter(into, {k: root[k] for k in ("pack", "plan", "source", "writer")})
    cid = w.add_dictionary(d)
    rows, per_row = 256, 16
    cols = per_row * 65535
    path = "tensors/experts.0.w"
    arrays = write_arrays(into, path, {
        "codes": (np.zeros(rows * per_row, np.uint16), None),
        "row_codes": (np.full(rows, per_row, np.uint32), None),
        "scales": (np.tile(np.array([0xBF80, 0x3F80], np.uint16), (rows, 1)), "bfloat16")})
    record = {"name": "experts.0.w", "path": path, "shape": [rows, cols], "dtype": "float32",
              "codec": C.CODEC_TERNARY, "dictionary": cid,
              "quantizer": {"method": "rtn", "grid": "qmoe-ternary"},
              "symbol_counts": [rows * cols, 0, 0], "source_sha256": "0" * 64, "arrays": arrays}
    w.finish_tensor(record)
    w.commit([record])
    return into


def sparse_tensor_document(base: Path, into: Path) -> Path:
    import shutil
    shutil.copytree(base, into)
    doc = next(into.glob("tensors/experts.0.w/zarr.json"))
    doc.unlink()
    with open(doc, "wb") as f:
        f.truncate(3 * GiB)
    return into


def dense_root(base: Path, into: Path, filler: bytes) -> Path:
    import shutil
    shutil.copytree(base, into)
    raw = (into / "zarr.json").read_bytes()
    pad = b'"pad":[' + filler * ((63 * MiB) // len(filler)) + b'0],'
    (into / "zarr.json").write_bytes(raw.replace(b'"complete":', pad + b'"complete":', 1))
    fuzz._resign_checksum(into)
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        targets = make_targets(work / "targets")
        warm = targets["ternary-qmoe2023"]
        cases = []
        for i, line in enumerate(CORPUS.read_text().splitlines()):
            entry = json.loads(line)
            m = fuzz.Mutation(**entry["mutation"])
            cases.append((entry["why"], fuzz.mutant(targets[entry["target"]], m,
                                                    work / f"corpus-{i}")))
        cases.append(("a dictionary of 65,535-zero entries: 2^28 symbols from 8 KiB of codes",
                      expanding_dictionary(targets["ternary-qmoe2023"], work / "expand")))
        cases.append(("a tensor's zarr.json a 3 GiB sparse file",
                      sparse_tensor_document(targets["ternary-qmoe2023"], work / "sparse")))
        for filler, what in ((b'{},', "'{}'"), (b'"abc",', "'\"abc\"'"),
                             (b'"abcde",', "'\"abcde\"' (at the density limit)")):
            cases.append((f"a 64 MiB root of {what} values",
                          dense_root(targets["ternary-qmoe2023"], work / f"root-{len(rows)}-"
                                     f"{len(cases)}", filler)))
        for why, store in cases:
            on_disk = disk_bytes(store)
            r = measure(store, warm)
            over = r["peak_above"] - r["output"]
            limit_s = 10 * (on_disk + r["output"]) / MiB
            rows.append({"case": why, "disk_bytes": on_disk, **r,
                         "within": over <= GiB and r["seconds"] <= max(limit_s, 1.0)
                         and not r["result"].startswith(("crash", "memory"))})
            if not args.json:
                print(f"{why[:70]:70s} disk {on_disk / MiB:7.2f} MiB  out {r['output'] / MiB:8.1f} "
                      f"MiB  peak+ {r['peak_above'] / MiB:7.1f} MiB  {r['seconds']:6.2f} s  "
                      f"{'ok ' if rows[-1]['within'] else 'OVER'}  {r['result'][:60]}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    bad = [r for r in rows if not r["within"]]
    print(f"{len(rows)} cases, {len(bad)} over the bound", file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
