"""The index's records (spec §4.3-§4.5): what a tensor record and a dictionary entry
must hold, checked before anything uses them (a checksummed root can still come from a
buggy or hostile writer). Records stay plain dicts, as the index holds them; these
functions are their types.
"""
from __future__ import annotations

import math

from ..errors import FormatError, LimitError, VersionError
from . import constants as C
from .constants import MAX_ELEMENTS, MAX_NAME_BYTES, MAX_RANK


def check_version(version, where: str) -> None:
    if not isinstance(version, str):
        raise FormatError(where, f"format_version {version!r} is not a string")
    try:
        major, minor = (int(x) for x in str(version).split("."))
    except ValueError:
        raise FormatError(where, f"format_version {version!r} is not MAJOR.MINOR") from None
    if major != C.FORMAT_MAJOR:
        raise VersionError(where, f"format_version {version} has major {major}; this reader "
                                  f"reads major {C.FORMAT_MAJOR} only")


def check_shape(value, where: str, field: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(n, int) and not isinstance(n, bool)
                                              for n in value):
        raise FormatError(where, f"{field} is not a list of integers")
    if len(value) > MAX_RANK:
        raise LimitError(where, f"{field} has rank {len(value)}, limit is {MAX_RANK}")
    if any(n < 0 for n in value):
        raise FormatError(where, f"{field} has a negative dimension")
    if math.prod(value) > MAX_ELEMENTS or any(n > MAX_ELEMENTS for n in value):
        raise LimitError(where, f"{field} {value} exceeds {MAX_ELEMENTS} elements")
    return tuple(value)


def check_node_path(path, group: str, where: str) -> None:
    """`<group>/<one segment>`, the segment not empty, '.' or '..' (spec §4.3)."""
    ok = isinstance(path, str) and path.startswith(group + "/")
    seg = path[len(group) + 1:] if ok else ""
    if not ok or not seg or "/" in seg or seg in (".", "..") or "\\" in seg:
        raise FormatError(where, f"bad path {path!r}")


def check_arrays_index(arrays, where: str) -> None:
    if not isinstance(arrays, dict) or not arrays:
        raise FormatError(where, "arrays missing")
    for name, desc in arrays.items():
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise FormatError(where, f"bad array name {name!r}")
        if (not isinstance(desc, dict) or not isinstance(desc.get("data_type"), str)
                or not isinstance(desc.get("crc32c"), int) or isinstance(desc.get("crc32c"), bool)):
            raise FormatError(where, f"array {name!r}: malformed descriptor")
        check_shape(desc.get("shape"), f"{where}: array {name!r}", "shape")


def tensor_record(r, i: int, where: str) -> str:
    """Checks index entry tensors[i]; returns its name. `where` names the root."""
    if not isinstance(r, dict) or not isinstance(r.get("name"), str):
        raise FormatError(where, f"tensors[{i}]: not a tensor record")
    name = r["name"]
    if len(name.encode()) > MAX_NAME_BYTES:
        raise LimitError(where, f"tensors[{i}]: name longer than {MAX_NAME_BYTES} bytes")
    tw = f"{where}: tensor {name!r}"
    check_node_path(r.get("path"), C.TENSORS, tw)
    check_shape(r.get("shape"), tw, "shape")
    for key in ("codec", "dtype"):
        if not isinstance(r.get(key), str):
            raise FormatError(tw, f"{key} is not a string")
    if r["dtype"] not in C.STORED_DTYPE:
        raise FormatError(tw, f"unknown dtype {r['dtype']!r}")
    check_arrays_index(r.get("arrays"), tw)
    if "dictionary" in r and not isinstance(r["dictionary"], str):
        raise FormatError(tw, "dictionary is not a string")
    counts = r.get("symbol_counts")
    if counts is not None and not (isinstance(counts, list) and len(counts) == 3 and all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)):
        raise FormatError(tw, "symbol_counts is not 3 non-negative integers")
    return name


def dictionary_entry(e, i: int, where: str) -> str:
    """Checks index entry dictionaries[i]; returns its content id."""
    dw = f"{where}: dictionaries[{i}]"
    if not isinstance(e, dict) or not isinstance(e.get("id"), str):
        raise FormatError(dw, "not a dictionary entry with a string id")
    check_node_path(e.get("path"), C.DICTIONARIES, dw)
    check_arrays_index(e.get("arrays"), dw)
    if not isinstance(e.get("params", {}), dict) or not isinstance(e.get("kind", ""), str):
        raise FormatError(dw, "kind/params malformed")
    return e["id"]
