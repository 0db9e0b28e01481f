"""Dictionaries of the dictionary-coded codecs (spec §5): the stored tables, the two
kinds' constructions, and the row stream coder that reads and writes codewords."""
from __future__ import annotations

from ..format.constants import KIND_GOLOMB, KIND_QMOE2023
from .golomb import build_golomb
from .qmoe2023 import build_qmoe2023
from .tables import Dictionary


def canonical(kind: str, params: dict) -> Dictionary | None:
    """The dictionary a kind's construction gives for `params` (what a conforming writer
    stores), or None for a kind this code cannot build."""
    if kind == KIND_QMOE2023:
        return build_qmoe2023()
    if kind == KIND_GOLOMB:
        return build_golomb(float(params["p_zero"]), int(params["k"]))
    return None
