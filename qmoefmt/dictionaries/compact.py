"""Compact dictionary forms (spec §5.7, since 1.4): what a store holds instead of the five
§5.6 tables, and the integer-only procedures that derive the tables from it.

A golomb-v2f dictionary is stored as the shape of each state's parse tree (`tree`), a
qmoe-2023 dictionary as its trie (`prefix`, `pair`). Both are exact: the derived tables
are the dictionary, and readers still decode through them, validated as §5.6 requires.
Deriving needs no floating point, so no reader depends on how a platform rounds `**`.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from ..format.constants import CODEWORDS, KIND_GOLOMB, KIND_QMOE2023, MAX_NNZ

TABLES_FORM = "tables"          # §5.6: the only form before 1.4
TREE_FORM = "tree"              # §5.7.1, golomb-v2f
TRIE_FORM = "trie"              # §5.7.2, qmoe-2023
COMPACT_KIND = {TREE_FORM: KIND_GOLOMB, TRIE_FORM: KIND_QMOE2023}

MAX_TREE_K = 12                 # §5.4: 0 <= k <= 12, so S = k + 2 <= 14
MAX_LENGTH = (1 << 16) - 1      # §5.6: an entry's length is a uint16
TREE_BITS = 2 * CODEWORDS - 1   # preorder bits of a full binary tree of 65536 leaves
TREE_BYTES = (TREE_BITS + 7) // 8
TRIE_PAIRS = 9


def arrays(form: str, n_states: int) -> tuple:
    """(array name, dtype, shape) of a compact form's stored arrays, in the order the
    content id hashes them."""
    if form == TREE_FORM:
        return (("tree", np.dtype("u1"), (n_states, TREE_BYTES)),)
    return (("prefix", np.dtype("<u2"), (CODEWORDS,)), ("pair", np.dtype("u1"), (CODEWORDS,)))


# Error codes of the derivations; the caller names the state and codeword.
_OK, _TOO_MANY_LEAVES, _TOO_FEW_LEAVES, _PADDING, _EMPTY, _LONG, _NNZ, _PREFIX, _PAIR = range(9)
PROBLEMS = {
    _TOO_MANY_LEAVES: "its tree has more than 65536 leaves",
    _TOO_FEW_LEAVES: "its tree has fewer than 65536 leaves",
    _PADDING: "the bit after its tree is not 0",
    _EMPTY: "an entry of length 0",
    _LONG: f"an entry longer than {MAX_LENGTH}",
    _NNZ: "an entry with more nonzeros than max_nnz",
    _PREFIX: "prefix is neither the codeword itself nor an earlier one",
    _PAIR: "pair is not below 9",
}


# ---------------------------------------------------------------- golomb-v2f tree

@nb.njit(cache=True)
def _derive_tree(tree, k, length, next_state, nnz, pos, sym):
    """Walks each state's preorder bits (1 = internal node, 0 = leaf, branch 0 first) and
    gives leaf c, the c-th in preorder, its entry. -> (error code, state, codeword or -1).

    The walk keeps, per depth, the node's state, length, nonzero count and which child it
    is in; the path's nonzeros live in one array of K slots, a node's being the first
    nk of them (a child adds at most one, at slot nk, which its sibling later reuses)."""
    kk = pos.shape[2]
    st = np.empty(CODEWORDS + 1, np.int64)
    ln = np.empty(CODEWORDS + 1, np.int64)
    nk = np.empty(CODEWORDS + 1, np.int64)
    br = np.empty(CODEWORDS + 1, np.int64)
    zp = np.zeros(kk, np.int64)
    zs = np.zeros(kk, np.int64)
    m = np.int64(1) << k
    for s in range(tree.shape[0]):
        bits = tree[s]
        d = 0
        st[0], ln[0], nk[0] = s, 0, 0
        code = 0
        i = 0
        while True:
            if i == TREE_BITS:                      # unfinished: more internal nodes
                return _TOO_MANY_LEAVES, s, -1      # than a 65536-leaf tree has
            b = (bits[i >> 3] >> (7 - (i & 7))) & 1
            i += 1
            if b == 1:                              # internal: walk branch 0 first
                br[d] = 0
                edge = 0
            else:                                   # leaf: codeword `code`
                if code == CODEWORDS:
                    return _TOO_MANY_LEAVES, s, -1
                if ln[d] == 0:
                    return _EMPTY, s, code
                if ln[d] > MAX_LENGTH:
                    return _LONG, s, code
                length[s, code] = ln[d]
                next_state[s, code] = st[d]
                nnz[s, code] = nk[d]
                for j in range(nk[d]):
                    pos[s, code, j] = zp[j]
                    sym[s, code, j] = zs[j]
                code += 1
                while d > 0 and br[d - 1] == 1:     # up past finished branch-1 children
                    d -= 1
                if d == 0:
                    break
                br[d - 1] = 1
                d -= 1
                edge = 1
            if d == CODEWORDS:                      # a path of 65536 internal nodes
                return _TOO_MANY_LEAVES, s, -1
            # the child's decision (§5.4's table, spec §5.7.1)
            t, L, n = st[d], ln[d], nk[d]
            if t == 0:                              # U: are the next m symbols zero?
                if edge == 1:
                    L += m
                else:
                    t = 1 if k > 0 else k + 1
            elif t <= k:                            # R_j, j = k - t: bit j of the run
                if edge == 1:
                    L += np.int64(1) << (k - t)
                t += 1
            else:                                   # Sg: the nonzero's symbol
                if n == kk:
                    return _NNZ, s, code
                zp[n] = L
                zs[n] = edge + 1
                n += 1
                L += 1
                t = 0
            d += 1
            st[d], ln[d], nk[d] = t, L, n
        if code != CODEWORDS:
            return _TOO_FEW_LEAVES, s, -1
        if i != TREE_BITS or (bits[TREE_BYTES - 1] & 1) != 0:
            return _PADDING, s, -1
    return _OK, 0, 0


def tree_bits(child: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """The `tree` array of parse trees given as child[node, branch] (>= 0 an internal
    node, < 0 a leaf), one root per state: preorder, most significant bit first."""
    out = np.zeros((len(roots), TREE_BYTES), np.uint8)
    _tree_bits(child, roots, out)
    return out


@nb.njit(cache=True)
def _tree_bits(child, roots, out):
    stack = np.empty(2 * CODEWORDS, np.int64)
    for s in range(roots.shape[0]):
        i = 0
        sp = 1
        stack[0] = roots[s]
        while sp > 0:
            sp -= 1
            v = stack[sp]
            if v >= 0:
                out[s, i >> 3] |= np.uint8(1 << (7 - (i & 7)))
                stack[sp] = child[v, 1]
                stack[sp + 1] = child[v, 0]
                sp += 2
            i += 1


# ---------------------------------------------------------------- qmoe-2023 trie

@nb.njit(cache=True)
def _derive_trie(prefix, pair, length, nnz, pos, sym):
    """Codeword c's sequence is codeword prefix[c]'s followed by pair[c] (or pair[c]
    alone when prefix[c] = c); a pair r holds the symbols r % 3, r // 3."""
    kk = pos.shape[2]
    for c in range(CODEWORDS):
        p = np.int64(prefix[c])
        r = np.int64(pair[c])
        if r >= TRIE_PAIRS:
            return _PAIR, 0, c
        if p > c:
            return _PREFIX, 0, c
        n = 0
        base = 0
        if p < c:
            base = np.int64(length[0, p])
            n = np.int64(nnz[0, p])
            for j in range(n):
                pos[0, c, j] = pos[0, p, j]
                sym[0, c, j] = sym[0, p, j]
        if base + 2 > MAX_LENGTH:
            return _LONG, 0, c
        for half in range(2):
            t = r % 3 if half == 0 else r // 3
            if t:
                if n == kk:
                    return _NNZ, 0, c
                pos[0, c, n] = base + half
                sym[0, c, n] = t
                n += 1
        length[0, c] = base + 2
        nnz[0, c] = n
    return _OK, 0, 0


# ---------------------------------------------------------------- both

def derive(form: str, stored: dict, n_states: int, max_nnz: int | None = None):
    """The five §5.6 tables of a compact dictionary whose arrays have been checked against
    `arrays(form, n_states)` -> (tables, None), or (None, the problem) for arrays that are
    no dictionary of this form. `max_nnz` is K as the entry declares it (1..32), which
    must be the entries' largest nnz; None (a writer's) takes that largest."""
    if max_nnz is not None and not 1 <= max_nnz <= MAX_NNZ:
        return None, f"max_nnz {max_nnz} is not 1..{MAX_NNZ}"
    s = n_states
    slots = MAX_NNZ if max_nnz is None else max_nnz
    t = dict(length=np.zeros((s, CODEWORDS), np.uint16),
             next_state=np.zeros((s, CODEWORDS), np.uint8),
             nnz=np.zeros((s, CODEWORDS), np.uint8),
             nz_pos=np.zeros((s, CODEWORDS, slots), np.uint16),
             nz_sym=np.zeros((s, CODEWORDS, slots), np.uint8))
    if form == TREE_FORM:
        if not 2 <= s <= MAX_TREE_K + 2:
            return None, f"{s} states, a golomb-v2f tree has 2..{MAX_TREE_K + 2} (k + 2)"
        err, st, cw = _derive_tree(stored["tree"], s - 2, t["length"], t["next_state"],
                                   t["nnz"], t["nz_pos"], t["nz_sym"])
    else:
        if s != 1:
            return None, f"{s} states, a qmoe-2023 trie has 1"
        err, st, cw = _derive_trie(stored["prefix"], stored["pair"], t["length"], t["nnz"],
                                   t["nz_pos"], t["nz_sym"])
    if err != _OK:
        at = f"state {st}" + (f" codeword {cw}" if cw >= 0 else "")
        return None, f"{at}: {PROBLEMS[err]}"
    largest = max(1, int(t["nnz"].max()))
    if max_nnz is None:
        t["nz_pos"] = np.ascontiguousarray(t["nz_pos"][:, :, :largest])
        t["nz_sym"] = np.ascontiguousarray(t["nz_sym"][:, :, :largest])
    elif largest != max_nnz:
        return None, f"max_nnz {max_nnz} is not the entries' largest nnz, {largest}"
    return t, None
