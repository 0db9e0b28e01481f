"""Dictionary load benchmark (spec §5.7, format 1.4): what a reader pays to get a compact
dictionary's tables, against what the tables form would have stored.

    python bench/dictionary_load.py [--reps 7]

Per dictionary (golomb-v2f across the ladder, and qmoe-2023): its stored bytes in the
compact form and as the five tables; the median time of deriving the tables from the
stored arrays (integers only), of validating them (spec §5.6), and of a whole
`Store.dictionary` load (`read_dictionary`) from a store on disk (read, CRC, hash, derive, validate). The
target is <= 50 ms a dictionary for the whole load. Numba's JIT is warmed up first.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


from qmoefmt.dictionaries import compact
from qmoefmt.dictionaries.golomb import build_golomb
from qmoefmt.dictionaries.qmoe2023 import build_qmoe2023
from qmoefmt.dictionaries.tables import validate_tables
from qmoefmt.store.reader import read_dictionary
from qmoefmt.store.writer import StoreWriter
from _timing import median_time

P0S = (0.3208, 0.6514, 0.8176, 0.8808, 0.9579, 0.9934)
TARGET_MS = 50.0


def written(d, root: Path) -> dict:
    """d written to a (never committed) store at root, as a pack writes it: its entry."""
    meta = {"writer": {"name": "bench", "version": "0"}, "pack": {"experts": []},
            "plan": {"tensors": 0, "sha256": "0" * 64},
            "source": {"format": "safetensors", "name": "none"}}
    w = StoreWriter(root, meta)
    w.add_dictionary(d)
    return w.dictionaries[d.content_id]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    dicts = [build_golomb(p) for p in P0S] + [build_qmoe2023()]
    compact.derive(dicts[0].form, dicts[0].stored, dicts[0].n_states, dicts[0].max_nnz)  # JIT
    print(f"{'dictionary':<22}{'S':>3}{'K':>4}{'stored KiB':>12}{'tables KiB':>12}"
          f"{'derive ms':>11}{'validate ms':>13}{'load ms':>9}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i, d in enumerate(dicts):
            label = (f"golomb-v2f {d.params['p_zero']}" if d.kind == "golomb-v2f" else d.kind)
            tables_bytes = sum(a.nbytes for a in d.tables().values())
            derive = median_time(lambda: compact.derive(d.form, d.stored, d.n_states, d.max_nnz),
                                 args.reps)
            validate = median_time(lambda: validate_tables(d.tables(), "bench"), args.reps)
            root = Path(tmp) / f"s{i}"
            entry = written(d, root)
            load_s = median_time(lambda: read_dictionary(root, d.content_id, entry), args.reps)
            worst = max(worst, load_s * 1e3)
            print(f"{label:<22}{d.n_states:>3}{d.max_nnz:>4}{d.stored_nbytes / 1024:>12.0f}"
                  f"{tables_bytes / 1024:>12.0f}{derive * 1e3:>11.1f}{validate * 1e3:>13.1f}"
                  f"{load_s * 1e3:>9.1f}", flush=True)
    print(f"\nslowest whole load {worst:.1f} ms (target <= {TARGET_MS:.0f} ms a dictionary)")
    if worst > TARGET_MS:
        sys.exit(1)


if __name__ == "__main__":
    main()
