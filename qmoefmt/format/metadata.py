"""The exact bytes of every zarr.json a writer produces (spec §4), and node paths.

Every zarr.json below the root is a pure function of the root index, so `verify` can
regenerate it and compare bytes; the root carries a CRC of itself (spec §4.4).
"""
from __future__ import annotations

import gc
import json
import math
import re

import crc32c as _crc32c
import numpy as np

from .constants import (CHECKSUM_PLACEHOLDER, DICTIONARIES, MAX_ROOT_METADATA,
                        ROOT_BYTES_PER_CONTAINER, ROOT_BYTES_PER_SEPARATOR, ROOT_DENSE_FROM,
                        ROOT_META, TENSORS)


def crc32c(data) -> int:
    return _crc32c.crc32c(data)


def dumps(obj) -> bytes:
    """Canonical JSON (spec §4.1): sorted keys, no insignificant whitespace, ASCII only,
    one trailing newline."""
    return (json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                       allow_nan=False) + "\n").encode("ascii")


def _members(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        for key, _ in pairs:
            if key in seen:
                # a reader keeping the first of two members would see another store
                raise ValueError(f"member {key!r} appears twice (spec §4.1)")
            seen.add(key)
    return obj


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is beyond binary64's range")
    return value


def loads(raw: bytes):
    """A metadata document parsed strictly (spec §4.1): UTF-8, RFC 8259 (no NaN or
    Infinity, which Python's json accepts), no member name twice in an object. Raises
    ValueError saying what is wrong."""
    # A root builds ~20 containers per tensor, none of them cyclic: CPython's collector
    # would scan them over and over as they pile up (2-3x the parse itself, 20,000 tensors).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_members,
                          parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        # the parser recurses per nesting level; its limit is the reader's (spec §9)
        raise ValueError("nested too deeply for this reader") from None
    finally:
        if collecting:
            gc.enable()


def root_size_problem(raw: bytes) -> str | None:
    """Why a root of these bytes is over a §9 limit, or None. Counted on the raw bytes,
    strings included (an upper bound), before parsing: a parser spends ~60-230 bytes per
    object, array or string it builds, so a small root dense in values could otherwise
    cost ~25x its size."""
    n = len(raw)
    if n > MAX_ROOT_METADATA:
        return f"{n} bytes of metadata, limit is {MAX_ROOT_METADATA}"
    if n <= ROOT_DENSE_FROM:
        return None
    containers = raw.count(b"{") + raw.count(b"[")
    if containers * ROOT_BYTES_PER_CONTAINER > n:
        return (f"{containers} '{{' and '[' in {n} bytes: more than one per "
                f"{ROOT_BYTES_PER_CONTAINER} bytes (spec §9)")
    separators = raw.count(b",") + raw.count(b":")
    if separators * ROOT_BYTES_PER_SEPARATOR > n:
        return (f"{separators} ',' and ':' in {n} bytes: more than one per "
                f"{ROOT_BYTES_PER_SEPARATOR} bytes (spec §9)")
    return None


def np_dtype(data_type: str) -> np.dtype:
    return np.dtype(data_type).newbyteorder("<") if data_type != "bool" else np.dtype(bool)


def chunk_shape(shape) -> list[int]:
    return [max(int(n), 1) for n in shape]


def chunk_key(shape) -> str:
    """The single chunk's key, in the default chunk key encoding with "/"; an array with a
    zero-length dimension has no chunk at all (spec §4.2)."""
    return "/".join(["c"] + ["0"] * len(shape))


def has_chunk(shape) -> bool:
    return all(int(n) > 0 for n in shape)


def array_doc(data_type: str, shape, logical_dtype: str | None = None) -> bytes:
    attrs = {"qmoefmt": {"logical_dtype": logical_dtype}} if logical_dtype else {}
    return dumps({
        "zarr_format": 3,
        "node_type": "array",
        "shape": [int(n) for n in shape],
        "data_type": data_type,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk_shape(shape)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "fill_value": False if data_type == "bool" else 0,
        "attributes": attrs,
    })


def group_doc(attributes: dict | None = None) -> bytes:
    return dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes or {}})


def node_doc(record: dict) -> bytes:
    """A tensor's or dictionary's group zarr.json: its index record, verbatim."""
    return group_doc({"qmoefmt": record})


def root_doc(meta: dict) -> bytes:
    """The root group's zarr.json with its self-checksum filled in (spec §4.4)."""
    meta = dict(meta, checksum=CHECKSUM_PLACEHOLDER)
    raw = group_doc({"qmoefmt": meta})
    crc = f"{crc32c(raw):08x}"
    return _replace_checksum(raw, crc)


_CHECKSUM_RE = re.compile(rb'"checksum":"([0-9a-f]{8})"')


def _replace_checksum(raw: bytes, value: str) -> bytes:
    m = _CHECKSUM_RE.search(raw)
    return raw[:m.start(1)] + value.encode("ascii") + raw[m.end(1):]


def root_checksum_ok(raw: bytes) -> bool | None:
    """True/False whether the root's self-checksum matches; None if it has none."""
    matches = list(_CHECKSUM_RE.finditer(raw))
    if len(matches) != 1:
        return None
    stored = matches[0].group(1).decode()
    return f"{crc32c(_replace_checksum(raw, CHECKSUM_PLACEHOLDER)):08x}" == stored


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


# The writer's temporary files are `NAME.partial.PID` (§8): no node may look like one.
_PARTIAL = re.compile(r"\.(?=partial\.)", re.IGNORECASE)     # overlapping runs too


def tensor_paths(names) -> list[str]:
    """Node paths for tensor names, in order: unsafe characters become '_', and a clash
    (compared case-insensitively, for case-insensitive file systems) gets '-N'. Readers
    take paths from the index, never from this rule (spec §4.3)."""
    used: set[str] = set()
    out = []
    for name in names:
        base = _PARTIAL.sub("_", _UNSAFE.sub("_", name))[:180] or "_"
        if base.startswith("__") or set(base) == {"."} or base.lower() == ROOT_META:
            base = "t" + base
        path, n = base, 1
        while path.lower() in used:
            path, n = f"{base}-{n}", n + 1
        used.add(path.lower())
        out.append(f"{TENSORS}/{path}")
    return out


def dictionary_path(content_id: str) -> str:
    return f"{DICTIONARIES}/{content_id.replace(':', '-')}"

__all__ = [
    "crc32c", "dumps", "loads", "np_dtype", "chunk_shape", "chunk_key", "has_chunk", "array_doc",
    "group_doc", "node_doc", "root_doc", "root_checksum_ok", "tensor_paths",
    "dictionary_path", "root_size_problem"
]
