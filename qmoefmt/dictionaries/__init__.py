"""Dictionaries of the dictionary-coded codecs (spec §5): the tables decoders read, the
compact forms stores hold them in since 1.4 and their derivation, the two kinds'
constructions, the choice of one for a tensor, and the row stream coder that reads and
writes codewords."""
from __future__ import annotations

from ..format.constants import COMPACT_DICTIONARIES_SINCE, KIND_GOLOMB, KIND_QMOE2023
from .compact import TABLES_FORM
from .golomb import MAX_K, build_golomb
from .qmoe2023 import build_qmoe2023
from .tables import Dictionary


def canonical(kind: str, params: dict, form: str = TABLES_FORM) -> Dictionary | None:
    """The dictionary a kind's construction gives for `params`, held in `form` (what a
    conforming writer stores), or None for one this code cannot build."""
    if kind == KIND_QMOE2023:
        return build_qmoe2023(form)
    if kind == KIND_GOLOMB:
        p0, k = params.get("p_zero"), params.get("k")
        # a store's params are informative: build only what the construction defines
        if (isinstance(p0, float) and 0 < p0 < 1 and isinstance(k, int)
                and not isinstance(k, bool) and 0 <= k <= MAX_K):
            return build_golomb(p0, k, form)
    return None


def lowest_version(entries) -> str:
    """The lowest format version defining the forms of these dictionary entries (spec §3):
    compact forms since 1.4, the five tables since 1.0."""
    compact = any(e.get("form", TABLES_FORM) != TABLES_FORM for e in entries)
    return COMPACT_DICTIONARIES_SINCE if compact else "1.0"
