"""What a store holds, per tensor and in total (everything on disk counted): `inspect`."""
from __future__ import annotations

import math
from pathlib import Path

from ..format import constants as C
from .files import tree_size
from .reader import Store


def summarize(store: Store) -> dict:
    tensors, expert_params, expert_bytes, expert_tensors = [], 0, 0, 0
    for t in store.tensors():
        n = math.prod(t.shape)
        nbytes = t.nbytes
        tensors.append({
            "name": t.name,
            "shape": list(t.shape),
            "dtype": t.dtype,
            "codec": t.codec,
            "dictionary": t.dictionary,
            **t.unit.summary(t),
            "bytes": nbytes,
            "bits_per_param": 8 * nbytes / n if n else None,
        })
        if t.unit.expert:
            expert_tensors += 1
            expert_params += n
            expert_bytes += nbytes
    params = sum(math.prod(t["shape"]) for t in tensors)
    disk = tree_size(store.path)
    return {
        "path": str(store.path),
        "format_version": store.format_version,
        "complete": store.complete,
        "writer": store.meta.get("writer"),
        "pack": store.meta.get("pack"),
        "dictionaries": [{k: e.get(k) for k in ("id", "kind", "params", "n_states", "max_nnz")}
                         for e in store.meta.get("dictionaries", [])],
        "attachments": [{"name": name, "bytes": e["size"], "sha256": e["sha256"]}
                        for name, e in store.attachment_entries.items()],
        "tensors": tensors,
        "experts": {"tensors": expert_tensors, "params": expert_params, "bytes": expert_bytes,
                    "bits_per_param": 8 * expert_bytes / expert_params if expert_params else None},
        "dictionary_bytes": tree_size(Path(store.path) / C.DICTIONARIES),
        "total": {"params": params, "bytes": disk,
                  "bits_per_param": 8 * disk / params if params else None},
    }
