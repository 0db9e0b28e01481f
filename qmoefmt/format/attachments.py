"""Attachments (spec §14): the source checkpoint's config.json and generation_config.json,
carried verbatim in the root's `attachments`. Entries stay plain dicts, as the root holds
them; these functions make one from a file's bytes (the writer), type-check one from a
root (the reader, before anything uses it), and give its bytes back checked against its
hash.
"""
from __future__ import annotations

import hashlib
import json
import re

from ..errors import FormatError, LimitError
from .constants import MAX_ATTACHMENT_BYTES, MAX_ATTACHMENT_NAME, MAX_ATTACHMENTS

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\.json")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# what a JSON document's top level is, by the Python type json.loads gives it
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "true or false", type(None): "null"}


def check_name(name, where: str) -> str:
    if not (isinstance(name, str) and len(name) <= MAX_ATTACHMENT_NAME
            and _NAME.fullmatch(name)):
        raise FormatError(where, f"attachment name {name!r} is not up to {MAX_ATTACHMENT_NAME} "
                                 "characters of A-Z a-z 0-9 . _ - ending in .json (spec §14)")
    return name


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def parse_object(data: bytes, where: str) -> dict:
    """An attachment's JSON object: UTF-8 without a byte order mark, RFC 8259 (no NaN or
    Infinity, which Python's json would accept and other languages' parsers refuse)."""
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise FormatError(where, f"not UTF-8 ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise FormatError(where, f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise FormatError(where, f"not a JSON object (its top level is "
                                 f"{_JSON_KINDS.get(type(obj), type(obj).__name__)})")
    return obj


def make_entry(name: str, data: bytes, where: str) -> dict:
    """The entry a writer records for a source file's bytes, checked as §14 requires."""
    check_name(name, where)
    if len(data) > MAX_ATTACHMENT_BYTES:
        raise LimitError(where, f"{len(data):,} bytes, the attachment limit is "
                                f"{MAX_ATTACHMENT_BYTES:,} (spec §9)")
    parse_object(data, where)
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "text": data.decode("utf-8")}


def check_entries(entries, where: str) -> dict[str, dict]:
    """The root's `attachments` (None when absent) type-checked: name -> entry."""
    if entries is None:
        return {}
    if not isinstance(entries, list):
        raise FormatError(where, "attachments is not a list")
    if len(entries) > MAX_ATTACHMENTS:
        raise LimitError(where, f"{len(entries)} attachments, limit is {MAX_ATTACHMENTS}")
    out: dict[str, dict] = {}
    for i, e in enumerate(entries):
        aw = f"{where}: attachments[{i}]"
        if not isinstance(e, dict):
            raise FormatError(aw, "not an attachment entry")
        name = check_name(e.get("name"), aw)
        size = e.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(aw, "size is not a non-negative integer")
        if size > MAX_ATTACHMENT_BYTES:
            raise LimitError(aw, f"size {size:,}, the attachment limit is {MAX_ATTACHMENT_BYTES:,}")
        if not (isinstance(e.get("sha256"), str) and _SHA256.fullmatch(e["sha256"])):
            raise FormatError(aw, "sha256 is not 64 lowercase hex digits")
        if not isinstance(e.get("text"), str):
            raise FormatError(aw, "text is not a string")
        if name in out:
            raise FormatError(where, f"attachment {name!r} listed twice")
        out[name] = e
    return out


def content(entry: dict, where: str) -> bytes:
    """A checked entry's bytes: the UTF-8 encoding of its text, which must have its size
    and hash (a writer's mistake or a tampered root that was re-signed)."""
    text, size = entry["text"], entry["size"]
    if len(text) > size:     # UTF-8 takes >= 1 byte a character: no encoding needed to know
        raise FormatError(where, f"text of {len(text):,} characters, more than its size of "
                                 f"{size:,} bytes")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(where, "text holds a lone surrogate, so it is not UTF-8") from None
    if len(data) != size:
        raise FormatError(where, f"{len(data):,} bytes, its size says {size:,}: the attachment "
                                 "was modified or damaged")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise FormatError(where, "sha256 mismatch: the attachment was modified or damaged")
    return data
