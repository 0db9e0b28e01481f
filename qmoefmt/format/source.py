"""The root's `source` member (spec §4.4) beyond its format and file name: the source
safetensors header's `__metadata__`, recorded since 1.4 so that `unpack` writes it back
(transformers reads `{"format": "pt"}` from it), and the lowest version a root's optional
members need (§3)."""
from __future__ import annotations

from ..errors import FormatError, LimitError
from .constants import (ATTACHMENTS_SINCE, LOGICAL_DTYPE_SINCE, MAX_SOURCE_METADATA_BYTES,
                        SOURCE_METADATA_SINCE, version_tuple)
from .metadata import dumps


def check_metadata(value, where: str) -> dict[str, str] | None:
    """`source.metadata` type-checked and bounded: None when absent."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise FormatError(where, "source.metadata is not an object of string members "
                                 "(safetensors __metadata__, spec §4.4)")
    size = len(dumps(value))
    if size > MAX_SOURCE_METADATA_BYTES:
        raise LimitError(where, f"source.metadata of {size} bytes, limit is "
                                f"{MAX_SOURCE_METADATA_BYTES} (spec §9)")
    return value


def lowest_version(version: str, meta: dict) -> str:
    """`version` (what the codecs used need) raised to what the root's optional members
    need: a store without them declares what it declared before they existed."""
    needs = [version]
    if meta.get("attachments"):
        needs.append(ATTACHMENTS_SINCE)
    if isinstance(meta.get("source"), dict) and "metadata" in meta["source"]:
        needs.append(SOURCE_METADATA_SINCE)
    if any("logical_dtype" in d for d in _descriptors(meta)):
        needs.append(LOGICAL_DTYPE_SINCE)
    return max(needs, key=version_tuple)


def _descriptors(meta: dict):
    for key in ("tensors", "dictionaries"):
        for entry in meta.get(key) or []:
            arrays = entry.get("arrays") if isinstance(entry, dict) else None
            yield from (d for d in (arrays or {}).values() if isinstance(d, dict))
