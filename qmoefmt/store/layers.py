"""Ordering and grouping of tensor names for `inspect`: natural order, layers, and the
per-layer and GPTQ-status sums. Pure functions of the summary's tensor rows and records."""
from __future__ import annotations

import re

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders `layers.2` before `layers.10`: digit runs compare as numbers.
    Text and number parts alternate from a text part, so keys never compare str to int."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(_DIGITS.split(name)))


def layer_of(name: str) -> str | None:
    """The name up to and including its first `<word>.<integer>` component pair
    (`blocks.3`, `layers.10`, `encoder.block.1`), or None. Generic on purpose: a checkpoint
    names its layers however its model does, and a per-architecture table would go stale."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] and not parts[i].isdigit() and parts[i + 1].isdigit():
            return ".".join(parts[:i + 2])
    return None


def bits(nbytes: int, params: int) -> float | None:
    return 8 * nbytes / params if params else None


def group_by_layer(tensors: list[dict]) -> list[dict]:
    """One summary per layer, in natural order of layer names; tensors without a layer
    form one last group (layer None). `tensors` are summary rows in natural order."""
    groups: dict[str | None, list[dict]] = {}
    for t in tensors:
        groups.setdefault(layer_of(t["name"]), []).append(t)
    order = sorted((k for k in groups if k is not None), key=natural_key)
    return [_layer_summary(k, groups[k]) for k in order + ([None] if None in groups else [])]


def _layer_summary(layer: str | None, rows: list[dict]) -> dict:
    params = sum(r["params"] for r in rows)
    nbytes = sum(r["bytes"] for r in rows)
    array_bytes = sum(r["array_bytes"] for r in rows)
    experts = [r for r in rows if r["expert"]]
    # Weighted by element count over the tensors that know their zeros (dense ones and
    # uint-packed ones do not, and are left out rather than counted as zero-free).
    known = [r for r in rows if r["zero_fraction"] is not None]
    known_n = sum(r["params"] for r in known)
    zeros = sum(r["zero_fraction"] * r["params"] for r in known)
    return {
        "layer": layer,
        "names": [r["name"] for r in rows],
        "tensors": len(rows),
        "expert_tensors": len(experts),
        "params": params,
        "expert_params": sum(r["params"] for r in experts),
        "bytes": nbytes,
        "array_bytes": array_bytes,
        "bits_per_param": bits(nbytes, params),
        "array_bits_per_param": bits(array_bytes, params),
        "zero_fraction": zeros / known_n if known_n else None,
        "dictionaries": sorted({r["dictionary"] for r in rows if r["dictionary"]}),
    }


def status_counts(records: list[dict]) -> dict[str, int]:
    """GPTQ status -> how many experts have it, over the records' quantizer statuses. A
    fused tensor records a list, one status per expert, and counts once per expert."""
    counts: dict[str, int] = {}
    for r in records:
        status = (r.get("quantizer") or {}).get("status")
        if status is None:
            continue
        for s in status if isinstance(status, list) else [status]:
            counts[s] = counts.get(s, 0) + 1
    return dict(sorted(counts.items()))
