"""The index's records (spec §4.3-§4.5): what a tensor record and a dictionary entry
must hold, checked before anything uses them (a checksummed root can still come from a
buggy or hostile writer). Records stay plain dicts, as the index holds them; these
functions are their types.
"""
from __future__ import annotations

import functools
import math
import re

from ..errors import FormatError, LimitError, VersionError
from . import constants as C
from .constants import MAX_ELEMENTS, MAX_NAME_BYTES, MAX_RANK


# ASCII digits only: int() would also take "١" (ARABIC-INDIC ONE), which no other
# language's reader reads as 1; no leading zeros, so that a version has one spelling
_VERSION = re.compile(r"(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX8 = re.compile(r"[0-9a-f]{8}")
# §4.3: one node name that means the same on every file system and to every Zarr reader
_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,255}")
SOURCE_FORMATS = ("safetensors", "torch", "hdf5")

# Every member the versions this code implements define (§4.4, §4.5, §14), for verify's
# report of members a store of such a version must not have (§3); a codec adds its own.
ROOT_MEMBERS = {"format_version", "complete", "checksum", "writer", "pack", "plan", "source",
                "tensors", "dictionaries", "attachments"}
OBJECT_MEMBERS = {"writer": {"name", "version"}, "plan": {"tensors", "sha256"},
                  "source": {"format", "name", "metadata"}}
RECORD_MEMBERS = {"name", "path", "shape", "dtype", "codec", "arrays", "source_sha256"}
DESCRIPTOR_MEMBERS = {"data_type", "shape", "crc32c", "logical_dtype"}
ATTACHMENT_MEMBERS = {"name", "size", "sha256", "text"}


def check_version(version, where: str) -> None:
    if not isinstance(version, str):
        raise FormatError(where, f"format_version {version!r} is not a string")
    m = _VERSION.fullmatch(version)
    if m is None:
        raise FormatError(where, f"format_version {version!r} is not MAJOR.MINOR "
                                 "(decimal ASCII digits, spec §3)")
    major = int(m.group(1))
    if major != C.FORMAT_MAJOR:
        raise VersionError(where, f"format_version {version} has major {major}; this reader "
                                  f"reads major {C.FORMAT_MAJOR} only")


def check_shape(value, where: str, field: str) -> tuple[int, ...]:
    # one pass that only succeeds: opening a store checks ~4 shapes per tensor
    if type(value) is list and len(value) <= MAX_RANK:
        total = 1
        for n in value:
            if type(n) is not int or not 0 <= n <= MAX_ELEMENTS:
                break
            total *= n
        else:
            if total <= MAX_ELEMENTS:
                return tuple(value)
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


def node_name_ok(seg) -> bool:
    """A node name of the store (spec §4.3): 1-255 of `A-Z a-z 0-9 . _ -`, not only
    periods, not starting with `__` (Zarr reserves both), neither the layout's own
    `zarr.json` nor a writer's temporary `.partial.` name (ignoring case)."""
    return (isinstance(seg, str) and _SEGMENT.fullmatch(seg) is not None and seg.strip(".") != ""
            and not seg.startswith("__") and seg.lower() != C.ROOT_META
            and ".partial." not in seg.lower())


def check_node_path(path, group: str, where: str) -> None:
    """`<group>/<one node name>` (spec §4.3)."""
    ok = isinstance(path, str) and path.startswith(group + "/")
    if not ok or not node_name_ok(path[len(group) + 1:]):
        raise FormatError(where, f"bad path {path!r} (spec §4.3: {group}/ and one name of "
                                 "A-Z a-z 0-9 . _ -)")


def check_arrays_index(arrays, where: str) -> None:
    if not isinstance(arrays, dict) or not arrays:
        raise FormatError(where, "arrays missing")
    for name, desc in arrays.items():
        if not _array_name_ok(name):
            raise FormatError(where, f"bad array name {name!r}")
        if (type(desc) is not dict or type(desc.get("data_type")) is not str
                or type(desc.get("crc32c")) is not int):
            raise FormatError(where, f"array {name!r}: malformed descriptor")
        if "logical_dtype" in desc and desc["logical_dtype"] not in C.LOGICAL_DTYPES:
            raise FormatError(where, f"array {name!r}: logical_dtype {_brief(desc['logical_dtype'])} "
                                     f"is not one of {list(C.LOGICAL_DTYPES)} (spec §4.5)")
        check_shape(desc.get("shape"), f"{where}: array {name!r}", "shape")


# A store repeats a handful of array names in every record (names are dict keys: strings).
_array_name_ok = functools.lru_cache(maxsize=1024)(node_name_ok)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _brief(v) -> str:
    """A value for a one-line error, however large the document made it."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _object(meta: dict, key: str, where: str, members: dict) -> None:
    """meta[key] an object whose `members` (name -> (test, what it must be)) pass."""
    obj = meta.get(key)
    if not isinstance(obj, dict):
        raise FormatError(where, f"{key} is not an object (spec §4.4)")
    for name, (test, what) in members.items():
        if not test(obj.get(name)):
            raise FormatError(where, f"{key}.{name} {_brief(obj.get(name))} is not {what} (spec §4.4)")


def _optional(test):
    return lambda v: v is None or test(v)


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def root_members(meta: dict, where: str) -> None:
    """The root's own members (spec §4.4) typed, before anything reads them; the index,
    attachments and source metadata are checked by their own functions."""
    if not isinstance(meta.get("complete"), bool):
        raise FormatError(where, f"complete {_brief(meta.get('complete'))} is not true or false")
    if not (isinstance(meta.get("checksum"), str) and _HEX8.fullmatch(meta["checksum"])):
        raise FormatError(where, "checksum is not 8 lowercase hex digits")
    text = (lambda v: isinstance(v, str), "a string")
    _object(meta, "writer", where, {"name": text, "version": text})
    # a writer's own record of its options, but for the two members readers use
    # (from_pretrained selects the experts with them)
    _object(meta, "pack", where, {"experts": (_optional(_strings), "an array of strings"),
                                  "preset": (_optional(lambda v: isinstance(v, str)),
                                             "a string or null")})
    _object(meta, "plan", where, {
        "tensors": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
        "sha256": (lambda v: isinstance(v, str) and _HEX64.fullmatch(v) is not None,
                   "64 lowercase hex digits")})
    _object(meta, "source", where, {
        "format": (lambda v: v in SOURCE_FORMATS, f"one of {', '.join(SOURCE_FORMATS)}"),
        "name": text})


def tensor_record(r, i: int, where: str) -> str:
    """Checks index entry tensors[i]; returns its name. `where` names the root."""
    if type(r) is not dict or type(r.get("name")) is not str:
        raise FormatError(where, f"tensors[{i}]: not a tensor record")
    name = r["name"]
    # counted as the writer counts (a JSON escape can spell a lone surrogate)
    if (not (name.isascii() and len(name) <= MAX_NAME_BYTES)
            and len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES):
        raise LimitError(where, f"tensors[{i}]: name longer than {MAX_NAME_BYTES} bytes")
    tw = f"{where}: tensor {name!r}"
    check_node_path(r.get("path"), C.TENSORS, tw)
    check_shape(r.get("shape"), tw, "shape")
    for key in ("codec", "dtype"):
        if type(r.get(key)) is not str:
            raise FormatError(tw, f"{key} is not a string")
    if r["dtype"] not in C.STORED_DTYPE:
        raise FormatError(tw, f"unknown dtype {r['dtype']!r}")
    check_arrays_index(r.get("arrays"), tw)
    sha = r.get("source_sha256")
    if not (type(sha) is str and _HEX64.fullmatch(sha)):
        raise FormatError(tw, "source_sha256 is not 64 lowercase hex digits")
    if "dictionary" in r and type(r["dictionary"]) is not str:
        raise FormatError(tw, "dictionary is not a string")
    if "quantizer" in r and type(r["quantizer"]) is not dict:
        raise FormatError(tw, "quantizer is not an object")
    counts = r.get("symbol_counts")
    if counts is not None and not (type(counts) is list and len(counts) == 3 and all(
            type(c) is int and c >= 0 for c in counts)):
        raise FormatError(tw, "symbol_counts is not 3 non-negative integers")
    return name


def dictionary_entry(e, i: int, where: str) -> str:
    """Checks index entry dictionaries[i]; returns its content id."""
    dw = f"{where}: dictionaries[{i}]"
    if not isinstance(e, dict) or not isinstance(e.get("id"), str):
        raise FormatError(dw, "not a dictionary entry with a string id")
    if not (e["id"].startswith("sha256:") and _HEX64.fullmatch(e["id"][7:])):
        raise FormatError(dw, f"id {_brief(e['id'])} is not sha256: and 64 lowercase hex digits")
    for key in ("n_states", "max_nnz"):
        if not _is_int(e.get(key)):
            raise FormatError(dw, f"{key} {_brief(e.get(key))} is not an integer")
    check_node_path(e.get("path"), C.DICTIONARIES, dw)
    check_arrays_index(e.get("arrays"), dw)
    if not isinstance(e.get("params", {}), dict) or not isinstance(e.get("kind", ""), str):
        raise FormatError(dw, "kind/params malformed")
    return e["id"]
