"""What a store holds, per tensor, per layer and in total: `inspect`.

Two sizes are counted everywhere: `bytes` are all of a tensor's files (its chunks and its
zarr.json metadata files), what it costs on disk; `array_bytes` are its chunk files only,
the coded data a reader loads. On small tensors the metadata files dominate, so the two
bits/param figures differ a lot there and converge on large ones."""
from __future__ import annotations

import fnmatch
import math
from pathlib import Path

from ..format import constants as C
from ..format import metadata as M
from .files import file_size, tree_size
from .layers import bits, group_by_layer, natural_key, status_counts
from .reader import Store


def _array_bytes(group: Path, arrays: dict) -> int:
    """Bytes of the chunk files of a tensor's or dictionary's arrays."""
    return sum(file_size(group / name / M.chunk_key(d["shape"]))
               for name, d in arrays.items() if M.has_chunk(d["shape"]))


def _tensor_row(store: Store, t, levels: bool) -> dict:
    n = math.prod(t.shape)
    nbytes = t.nbytes
    array_bytes = _array_bytes(store.path / t.path, t.record["arrays"])
    row = {
        "name": t.name, "shape": list(t.shape), "dtype": t.dtype, "codec": t.codec,
        "dictionary": t.dictionary, "expert": t.unit.expert, "params": n,
        "quantizer": t.record.get("quantizer"),
        **t.unit.summary(t),
        "bytes": nbytes, "array_bytes": array_bytes,
        "bits_per_param": bits(nbytes, n), "array_bits_per_param": bits(array_bytes, n),
    }
    if "bits" in t.record:      # k-bit codecs (§12, §13)
        counts = t.record.get("symbol_counts")
        # uint-dict16's sign stream counts symbol 0 exactly on the zero point (§13);
        # uint-packed's share is in its codes alone, read only when asked for
        share = counts[0] / n if counts and n else (
            t.unit.zero_point_share(t) if levels and not counts else None)
        row.update(bits=t.record["bits"], group_size=t.record.get("group_size"),
                   zero_point_share=share)
        if row["zero_fraction"] is None:    # on the zero point is exactly the weights 0
            row["zero_fraction"] = share
    return row


def _sizes(rows: list[dict], nbytes: int, array_bytes: int) -> dict:
    params = sum(r["params"] for r in rows)
    return {"tensors": len(rows), "params": params, "bytes": nbytes, "array_bytes": array_bytes,
            "bits_per_param": bits(nbytes, params),
            "array_bits_per_param": bits(array_bytes, params)}


def _total(store: Store, rows: list[dict], pattern: str | None) -> dict:
    """Unfiltered: every file of the store (root, dictionaries, attachments included) and
    every chunk (dictionaries' included). Filtered: only the matched tensors' files, since
    shared files belong to no subset."""
    if pattern is not None:
        return dict(_sizes(rows, sum(r["bytes"] for r in rows),
                           sum(r["array_bytes"] for r in rows)), filter=pattern)
    dict_arrays = sum(_array_bytes(store.path / e["path"], e["arrays"])
                      for e in store.meta.get("dictionaries", []))
    return dict(_sizes(rows, tree_size(store.path),
                       sum(r["array_bytes"] for r in rows) + dict_arrays), filter=None)


def summarize(store: Store, pattern: str | None = None, levels: bool = False,
              progress=None) -> dict:
    """The store's summary; `pattern` (an fnmatch glob on tensor names) restricts the
    tensors, layers, experts, statuses and totals to the matching tensors. `levels` reads
    uint-packed tensors' codes for their zero-point share (else a metadata read alone);
    `progress(n)` is told of each tensor summarized."""
    picked = [t for t in store.tensors()
              if pattern is None or fnmatch.fnmatchcase(t.name, pattern)]
    rows = []
    for t in picked:
        rows.append(_tensor_row(store, t, levels))
        if progress:
            progress(1)
    rows.sort(key=lambda r: natural_key(r["name"]))
    experts = [r for r in rows if r["expert"]]
    return {
        "path": str(store.path),
        "format_version": store.format_version,
        "complete": store.complete,
        "writer": store.meta.get("writer"),
        "source": store.meta.get("source"),
        "pack": store.meta.get("pack"),
        "gptq_status": status_counts([t.record for t in picked]),
        "dictionaries": [{k: e.get(k) for k in ("id", "kind", "params", "n_states", "max_nnz")}
                         for e in store.meta.get("dictionaries", [])],
        "attachments": [{"name": name, "bytes": e["size"], "sha256": e["sha256"]}
                        for name, e in store.attachment_entries.items()],
        "filter": pattern,
        "store_tensors": len(store.meta.get("tensors") or []),
        "tensors": rows,
        "layers": group_by_layer(rows),
        "experts": _sizes(experts, sum(r["bytes"] for r in experts),
                          sum(r["array_bytes"] for r in experts)),
        "dictionary_bytes": tree_size(store.path / C.DICTIONARIES),
        "total": _total(store, rows, pattern),
    }
