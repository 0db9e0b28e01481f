"""The `qmoe-2023` dictionary: exactly QMoE's (Frantar & Alistarh 2023), so that our
codeword stream for a matrix equals theirs (spec §5.3).

The 2^16 most probable sequences of 1..14 ternary *pairs* under P(0) = 0.885,
P(lo) = P(hi) = 0.0575, popped from a max-priority queue keyed by (-p, pair list) with p a
float64 product taken left to right; the pop order is the codeword. Ties between equally
probable sequences are broken by that float rounding and then by the lists' order, so
both are reproduced literally. A pair r holds the symbols (r % 3, r // 3).
"""
from __future__ import annotations

import heapq
from functools import lru_cache

import numpy as np

from ..format.constants import KIND_QMOE2023
from . import compact
from .tables import CODEWORDS, Dictionary

P_ZERO = 0.885
MAX_PAIRS = 14
TRIE_ROOT = CODEWORDS


def _pair_probs() -> list[float]:
    sym = [P_ZERO, (1 - P_ZERO) / 2, (1 - P_ZERO) / 2]
    return [(1.0 * sym[i]) * sym[j] for i in range(3) for j in range(3)]


def qmoe_sequences() -> list[bytes]:
    """The codewords' pair sequences in pop order, each as bytes (one pair a byte): bytes
    order as lists of ints do, shorter prefix first, and compare in C (2.5x faster)."""
    probs = _pair_probs()
    more = [bytes((i,)) for i in range(len(probs))]
    res: list[bytes] = []
    pq: list[tuple[float, bytes]] = [(-1.0, b"")]
    pop, push = heapq.heappop, heapq.heappush
    while len(res) < CODEWORDS:
        p, seq = pop(pq)
        if p != -1.0:
            res.append(seq)
        if len(seq) == MAX_PAIRS:
            continue
        for i, q in enumerate(probs):
            push(pq, (p * q, seq + more[i]))
    return res


@lru_cache(maxsize=2)
def build_qmoe2023(form: str = compact.TRIE_FORM) -> Dictionary:
    """Stored since 1.4 as its trie (§5.7.2): each codeword's sequence is an earlier
    codeword's (its prefix, popped before it) and one pair more; the tables derive from
    that. form="tables" gives it as stores before 1.4 held it."""
    seqs = qmoe_sequences()
    index = {}
    prefix = np.zeros(CODEWORDS, np.uint16)
    pair = np.zeros(CODEWORDS, np.uint8)
    trie = np.full((CODEWORDS + 1, 9), -1, np.int32)
    for code, seq in enumerate(seqs):
        index[seq] = code
        parent = TRIE_ROOT if len(seq) == 1 else index[seq[:-1]]
        trie[parent, seq[-1]] = code
        prefix[code] = code if parent == TRIE_ROOT else parent
        pair[code] = seq[-1]
    stored = {"prefix": prefix, "pair": pair}
    tables, problem = compact.derive(compact.TRIE_FORM, stored, 1)
    if problem is not None:
        raise ValueError(f"qmoe-2023: {problem}")
    d = Dictionary(kind=KIND_QMOE2023, params={"p_zero": P_ZERO, "max_pairs": MAX_PAIRS},
                   form=form, stored=None if form == compact.TABLES_FORM else stored,
                   **tables)
    d.encoder = trie
    return d
