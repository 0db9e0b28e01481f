"""inspect: what a store holds, per tensor and in total (everything on disk counted)."""
from __future__ import annotations

import math
from pathlib import Path

from . import layout
from .store_reader import Store


def summarize(store: Store) -> dict:
    tensors = []
    for t in store.tensors():
        n = math.prod(t.shape)
        nbytes = t.nbytes
        counts = t.record.get("symbol_counts")
        tensors.append({
            "name": t.name,
            "shape": list(t.shape),
            "dtype": t.dtype,
            "codec": t.codec,
            "dictionary": t.dictionary,
            "zero_fraction": (counts[0] / n) if counts and n else None,
            "bytes": nbytes,
            "bits_per_param": 8 * nbytes / n if n else None,
        })
    params = sum(math.prod(t["shape"]) for t in tensors)
    disk = sum(p.stat().st_size for p in Path(store.path).rglob("*") if p.is_file())
    coded = [t for t in tensors if t["codec"] == layout.CODEC_TERNARY]
    coded_params = sum(math.prod(t["shape"]) for t in coded)
    coded_bytes = sum(t["bytes"] for t in coded)
    dict_bytes = sum(p.stat().st_size for p in (Path(store.path) / layout.DICTIONARIES).rglob("*")
                     if p.is_file())
    return {
        "path": str(store.path),
        "format_version": store.format_version,
        "complete": store.complete,
        "writer": store.meta.get("writer"),
        "pack": store.meta.get("pack"),
        "dictionaries": [{k: e.get(k) for k in ("id", "kind", "params", "n_states", "max_nnz")}
                         for e in store.meta.get("dictionaries", [])],
        "tensors": tensors,
        "experts": {"tensors": len(coded), "params": coded_params, "bytes": coded_bytes,
                    "bits_per_param": 8 * coded_bytes / coded_params if coded_params else None},
        "dictionary_bytes": dict_bytes,
        "total": {"params": params, "bytes": disk,
                  "bits_per_param": 8 * disk / params if params else None},
    }
