"""The codec registry: one unit per codec id (spec §2), the one place codec ids are
dispatched on. A new codec is a new module here and one line in `_UNITS`."""
from __future__ import annotations

from ..format.constants import version_tuple
from .base import ArraySpec, Codec, TensorArrays
from .dense import Dense
from .ternary_dict16 import TernaryDict16
from .uint_dict16 import UintDict16
from .uint_packed import UintPacked

_UNITS = (TernaryDict16(), Dense(), UintPacked(), UintDict16())
CODECS: dict[str, Codec] = {c.id: c for c in _UNITS}


def get(codec_id: str) -> Codec | None:
    """The unit of a codec id, or None for an id this reader does not know (a newer minor
    may add codecs: only the tensors using it are unreadable, spec §3)."""
    return CODECS.get(codec_id)


def lowest_version(codec_ids) -> str:
    """The lowest format version defining all of `codec_ids` (spec §3)."""
    return max((CODECS[c].since for c in codec_ids), key=version_tuple, default="1.0")


__all__ = ["ArraySpec", "CODECS", "Codec", "TensorArrays", "get", "lowest_version"]
