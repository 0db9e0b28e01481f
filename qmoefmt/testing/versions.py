"""A store's root made to declare another version, with what that version requires of
it: since 1.5 every array descriptor records its codec's logical dtype (spec §4.5), so a
store re-declared 1.5 or later without them would describe other data than it holds."""
from __future__ import annotations

from .. import codecs
from ..format import constants as C


def declare(meta: dict, version: str) -> dict:
    """Sets meta's format_version to `version` in place, adding (from 1.5) the logical
    dtypes of the arrays of every tensor whose codec this code knows; returns meta."""
    meta["format_version"] = version
    if C.version_tuple(version) >= C.version_tuple(C.LOGICAL_DTYPE_SINCE):
        for r in meta["tensors"]:
            unit = codecs.get(r["codec"])
            for a, desc in r["arrays"].items():
                ld = unit.logical_dtype(a, r["dtype"]) if unit else None
                if ld:
                    desc["logical_dtype"] = ld
    return meta
