"""`--dictionary auto`: which dictionary codes a tensor (a writer's choice, spec §5.4).

The candidates are the dictionaries the store already holds, the golomb-v2f ladder point
fitted to the tensor, and qmoe-2023; each costs its estimated rate on every expert weight
still to pack plus, if the store does not hold it yet, its own stored bytes. The cheapest
wins, so a small model shares one or two dictionaries where a per-tensor fit would add one
per sparsity, and a large one still gets a fitted dictionary wherever that pays. The
choice depends only on the plan and the tensors before this one: a resumed pack chooses
as an uninterrupted one did.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from ..format.constants import KIND_GOLOMB, KIND_QMOE2023
from . import compact
from .golomb import cross_entropy, golomb_k, ladder_point
from .qmoe2023 import build_qmoe2023


def golomb_bytes(p0: float) -> int:
    """Stored bytes of the golomb-v2f dictionary for a ladder point: one tree a state."""
    return (golomb_k(p0) + 2) * compact.TREE_BYTES


QMOE2023_BYTES = sum(dt.itemsize * math.prod(shape) for _, dt, shape in
                     compact.arrays(compact.TRIE_FORM, 1))


@lru_cache(maxsize=1)
def _qmoe_trie() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """qmoe-2023's trie as the rate estimate walks it, its codewords grouped by first pair
    (so that the chain is 9 short products): per codeword the symbols 0, 1, 2 of its pairs
    after the first ([3, 65536]), its first pair, whether each of the 9 pairs does NOT
    extend it ([65536, 9], 1.0 or 0.0), and where each first pair's group starts ([10])."""
    d = build_qmoe2023()
    prefix, pair = (d.stored[n].astype(np.int64) for n in ("prefix", "pair"))
    first = pair.copy()
    later = np.zeros((3, prefix.size), np.int64)
    for c in np.flatnonzero(prefix != np.arange(prefix.size)):   # prefix[c] < c
        first[c] = first[prefix[c]]
        later[:, c] = later[:, prefix[c]]
        later[pair[c] % 3, c] += 1
        later[pair[c] // 3, c] += 1
    extends = np.zeros((prefix.size, 9), bool)
    inner = prefix != np.arange(prefix.size)
    extends[prefix[inner], pair[inner]] = True
    order = np.argsort(first, kind="stable")
    return (np.ascontiguousarray(later[:, order], np.float64), first[order],
            (~extends[order]).astype(np.float64), np.searchsorted(first[order], np.arange(10)))


def qmoe2023_rate(p: np.ndarray) -> float:
    """Bits per symbol of qmoe-2023 on iid symbols of probabilities p (rows' ends
    ignored). Its greedy match ends on the first pair that does not extend it, which then
    starts the next codeword, so the parse is a Markov chain over that first pair: from
    the trie, each first pair's expected codeword length and the chain's next first pair,
    then the chain's stationary mix."""
    later, first, ends_on, group = _qmoe_trie()
    pp = np.outer(p, p).reshape(9)              # P(pair r = t0 + 3 t1) = p[t0] p[t1]
    reach = np.exp(np.log(np.maximum(p, 1e-300)) @ later)   # given its first pair
    length = np.bincount(first, reach, 9)       # expected pairs, per first pair
    # chain[f, r]: from first pair f, the codeword ends and pair r starts the next one
    chain = np.stack([reach[group[f]:group[f + 1]] @ ends_on[group[f]:group[f + 1]]
                      for f in range(9)]) * pp[None, :]
    w, v = np.linalg.eig(chain.T)
    pi = np.abs(np.real(v[:, np.argmin(np.abs(w - 1))]))
    pi /= pi.sum()
    return 16.0 / (2.0 * float(pi @ length))


def rate(kind: str, p_zero: float | None, p: np.ndarray) -> float:
    """Estimated bits per symbol of a dictionary on symbols of probabilities p."""
    if kind == KIND_QMOE2023:
        return qmoe2023_rate(p)
    return cross_entropy(float(p[0]), p_zero)


def choose(counts: np.ndarray, held: list[tuple[str, float | None]],
           weights_left: int) -> tuple[str, float | None]:
    """(kind, p_zero) of the dictionary for a tensor with these symbol counts: `held` are
    the (kind, p_zero) the store holds, in the order it took them, `weights_left` the
    expert weights from this tensor to the end of the pack. Ties go to the earlier
    candidate: held ones first."""
    total = int(np.sum(counts))
    p = (np.asarray(counts, np.float64) / total if total
         else np.array([0.885, 0.0575, 0.0575]))
    fitted = (KIND_GOLOMB, ladder_point(float(p[0])))
    candidates = [(c, 0) for c in held]
    for c, nbytes in ((fitted, golomb_bytes(fitted[1])), ((KIND_QMOE2023, None), QMOE2023_BYTES)):
        if c not in held:
            candidates.append((c, nbytes))
    best, best_bits = None, math.inf
    for (kind, p_zero), nbytes in candidates:
        bits = rate(kind, p_zero, p) * weights_left + 8 * nbytes
        if bits < best_bits:
            best, best_bits = (kind, p_zero), bits
    return best
