"""An independent reference for the `qmoe-2023` dictionary and QMoE's greedy encoder, and
for the RTN ternary quantizer, built from the algorithms' descriptions (spec §5.3, §6 and
QMoE's sub1.py), not from qmoefmt.dictionaries.qmoe2023 / qmoefmt.dictionaries.stream /
qmoefmt.quantize.rtn, none of which it imports.

Plain Python and numpy only: a heapq of (-p, list of pairs), a dict-based trie, a greedy
walk over the pairs of each row, and a numpy quantizer with ml_dtypes' bfloat16 rounding.
tests/test_qmoe_reference.py checks the library against it; the conformance manifests'
expected qmoe-2023 streams and the store tests' expected values come from it.
"""
from __future__ import annotations

import hashlib
import heapq
from functools import lru_cache

import ml_dtypes
import numpy as np

CODEWORDS = 1 << 16
MAX_PAIRS = 14
P_ZERO = 0.885
# QMoE's sub1.py: probs = [ZEROS] + [(1 - ZEROS) / 2] * 2. The spec (§5.3) says the same:
# "0.0575 computed as (1 - 0.885) / 2 in binary64", which is 0.057499999999999996, not the
# literal 0.0575; the two give different dictionaries (test_literal_0575_is_not_qmoe).
P_NONZERO = (1 - P_ZERO) / 2

def pair_probabilities(p_nonzero: float = P_NONZERO) -> list[float]:
    """q[3i + j] = (1.0 * p[i]) * p[j], pair r holding symbols (r % 3, r // 3)."""
    p = [P_ZERO, p_nonzero, p_nonzero]
    return [(1.0 * p[i]) * p[j] for i in range(3) for j in range(3)]


@lru_cache(maxsize=1)
def reference_sequences() -> tuple[tuple[int, ...], ...]:
    """The 2^16 most probable sequences of 1..14 pairs, in pop order (= codeword)."""
    return sequences_for(P_NONZERO)


def sequences_for(p_nonzero: float) -> tuple[tuple[int, ...], ...]:
    q = pair_probabilities(p_nonzero)
    heap: list[tuple[float, list[int]]] = [(-1.0, [])]
    out: list[tuple[int, ...]] = []
    while len(out) < CODEWORDS:
        v, seq = heapq.heappop(heap)
        if v != -1.0:              # the root (the empty sequence) is not a codeword
            out.append(tuple(seq))
        if len(seq) == MAX_PAIRS:  # length-14 sequences are not expanded
            continue
        for r in range(9):
            heapq.heappush(heap, (v * q[r], seq + [r]))
    return tuple(out)


@lru_cache(maxsize=1)
def reference_trie() -> dict:
    """Nested dicts: trie[r] = [codeword, children], children likewise keyed by pair."""
    root: dict = {}
    for code, seq in enumerate(reference_sequences()):
        node = root
        for r in seq[:-1]:
            node = node[r][1]      # pop order puts every prefix before its extensions
        assert seq[-1] not in node
        node[seq[-1]] = [code, {}]
    return root


def reference_encode_row(row, trie: dict | None = None) -> list[int]:
    """QMoE's greedy longest match over the pairs t[i] + 3 t[i+1] of one row."""
    trie = reference_trie() if trie is None else trie
    row = [int(x) for x in row]
    cols = len(row)
    out: list[int] = []
    node = None                    # the current match, [codeword, children]
    for i in range(0, cols, 2):
        r = row[i] + 3 * (row[i + 1] if i + 1 < cols else 0)
        if node is not None and r in node[1]:
            node = node[1][r]
        else:
            if node is not None:
                out.append(node[0])
            node = trie[r]
    if node is not None:
        out.append(node[0])
    return out


def reference_encode(symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 [rows, cols] -> (codes uint16, row_codes uint16 if cols < 65536 else uint32)."""
    sym = np.asarray(symbols)
    assert sym.ndim == 2
    rows, cols = sym.shape
    trie = reference_trie()
    codes: list[int] = []
    counts: list[int] = []
    for r in range(rows):
        c = reference_encode_row(sym[r].tolist(), trie)
        codes.extend(c)
        counts.append(len(c))
    rc_dtype = np.uint16 if cols < (1 << 16) else np.uint32
    return np.array(codes, dtype=np.uint16), np.array(counts, dtype=rc_dtype)


@lru_cache(maxsize=1)
def reference_tables() -> dict[str, np.ndarray]:
    """The five stored tables (spec §5.6) of the reference dictionary."""
    seqs = reference_sequences()
    nonzeros = []
    for seq in seqs:
        nz = []
        for n, r in enumerate(seq):
            for half, t in enumerate((r % 3, r // 3)):
                if t:
                    nz.append((2 * n + half, t))
        nonzeros.append(nz)
    k = max(len(nz) for nz in nonzeros)
    length = np.array([[2 * len(s) for s in seqs]], dtype=np.uint16)
    nnz = np.array([[len(nz) for nz in nonzeros]], dtype=np.uint8)
    pos = np.zeros((1, CODEWORDS, k), np.uint16)
    sym = np.zeros((1, CODEWORDS, k), np.uint8)
    for c, nz in enumerate(nonzeros):
        for i, (p, y) in enumerate(nz):
            pos[0, c, i] = p
            sym[0, c, i] = y
    return {"length": length, "next_state": np.zeros((1, CODEWORDS), np.uint8),
            "nnz": nnz, "nz_pos": pos, "nz_sym": sym}


@lru_cache(maxsize=1)
def reference_trie_arrays() -> dict[str, np.ndarray]:
    """The reference dictionary as a 1.4 store holds it (spec §5.7.2): per codeword, the
    codeword of its sequence less the last pair (itself for one pair), and that pair."""
    seqs = reference_sequences()
    index = {tuple(seq): c for c, seq in enumerate(seqs)}
    prefix = [c if len(seq) == 1 else index[tuple(seq[:-1])] for c, seq in enumerate(seqs)]
    return {"prefix": np.array(prefix, np.uint16),
            "pair": np.array([seq[-1] for seq in seqs], np.uint8)}


def reference_content_id(form: str = "tables") -> str:
    """The content id (spec §5.6) of the reference dictionary stored as the five tables
    or, since 1.4, as its trie."""
    h = hashlib.sha256()
    if form == "trie":
        arrays = [(reference_trie_arrays()[n], dt) for n, dt in (("prefix", "<u2"), ("pair", "u1"))]
    else:
        t = reference_tables()
        arrays = [(t[n], dt) for n, dt in (("length", "<u2"), ("next_state", "u1"), ("nnz", "u1"),
                                             ("nz_pos", "<u2"), ("nz_sym", "u1"))]
    for a, dt in arrays:
        h.update(np.ascontiguousarray(a, dtype=dt).tobytes())
    return "sha256:" + h.hexdigest()


def reference_quantize(w) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spec §6 in plain numpy: float [rows, cols] -> (symbols int8, scales uint16 [rows, 2]
    bf16 bits of (lo, hi), values float32). A row without negative (positive) values has
    lo (hi) = +0.0, whatever the sign of its zeros."""
    w = np.asarray(w, dtype=np.float32)
    assert w.ndim == 2
    if not np.isfinite(w).all():
        raise ValueError("non-finite weights")
    rows, cols = w.shape
    if cols:
        mn, mx = w.min(axis=1), w.max(axis=1)
    else:
        mn = mx = np.zeros(rows, np.float32)
    zero = np.float32(0.0)
    lo = np.where(mn < 0, mn, zero).astype(np.float32).astype(ml_dtypes.bfloat16)
    hi = np.where(mx > 0, mx, zero).astype(np.float32).astype(ml_dtypes.bfloat16)
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    tlo = (lo32 / np.float32(2))[:, None]
    thi = (hi32 / np.float32(2))[:, None]
    sym = np.where(w < tlo, 1, np.where(w > thi, 2, 0)).astype(np.int8)
    values = np.where(sym == 1, lo32[:, None],
                      np.where(sym == 2, hi32[:, None], np.float32(0))).astype(np.float32)
    scales = np.stack([lo.view(np.uint16), hi.view(np.uint16)], axis=1).reshape(rows, 2)
    return sym, scales, values


def bf16_bits_reference(x) -> np.ndarray:
    """Spec §1's formula, for cross-checking ml_dtypes' rounding."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
