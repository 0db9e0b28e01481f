"""The lowest format version a store needs (spec §3): what its codecs, its dictionaries'
stored forms and its root's optional members were defined in. The writer declares it and
verify holds a store to it, from this one function."""
from __future__ import annotations

from .. import codecs, dictionaries
from ..format import constants as C
from ..format.source import lowest_version


def needed_version(codec_ids, dictionary_entries, meta: dict) -> str:
    return lowest_version(max(codecs.lowest_version(codec_ids),
                              dictionaries.lowest_version(dictionary_entries),
                              key=C.version_tuple), meta)
