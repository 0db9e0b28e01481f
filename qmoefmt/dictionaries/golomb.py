"""The adaptive `golomb-v2f` dictionaries (spec §5.4).

A row of ternary symbols is read as binary decisions of a Golomb code of its zero runs
with parameter m = 2^k: in state U, "are the next m symbols all zero?"; then the k bits of
the remaining run length, most significant first (states R_{k-1}..R_0, each bit 1 emitting
2^j zeros); then in state S the sign of the nonzero (0 = lo, 1 = hi). With m chosen so
that P(0)^m is near 1/2 every decision is close to a fair coin, and a Tunstall parse tree
over fair-ish binary decisions wastes almost nothing: 0.2-0.3% over the order-0 entropy
at P(0) 0.80-0.97, where a ternary Tunstall tree of the same size loses 2.5-8%.

A codeword may end between the decisions of one symbol, so each of the k + 2 decision
states has its own tree of 2^16 leaves, and an entry records the state its successor is
read in. Decoding stays row-parallel: a codeword's state is a function of its
predecessor's entry alone.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from functools import lru_cache

import numba as nb
import numpy as np

from ..format.constants import KIND_GOLOMB
from . import compact
from .tables import CODEWORDS, Dictionary

MAX_K = 12
# P(0) values a store may hold a dictionary for, evenly spaced in log-odds so that a
# tensor's nearest ladder point costs it well under 0.5% of rate.
LADDER = tuple(round(1 / (1 + math.exp(-x / 8)), 4) for x in range(-6, 43))


def golomb_k(p0: float) -> int:
    """m = 2^k with P(0)^m closest to 1/2 (in log2 m)."""
    if p0 <= 0.5:
        return 0
    return max(0, min(MAX_K, int(math.floor(math.log2(math.log(0.5) / math.log(p0)) + 0.5))))


def cross_entropy(p0: float, q: float) -> float:
    """Bits per symbol a dictionary modelled on P(0) = q costs a source with P(0) = p0
    (lo and hi equally likely): within a fraction of a percent of the real rate."""
    p0 = min(max(p0, 1e-9), 1 - 1e-9)
    return -(p0 * math.log2(q) + (1 - p0) * math.log2((1 - q) / 2))


def ladder_point(p0: float) -> float:
    """The ladder P(0) whose model costs a source of true P(0) = p0 the fewest bits."""
    return min(LADDER, key=lambda q: (cross_entropy(p0, q), q))


@dataclass(frozen=True)
class Decision:
    p1: float          # model probability of branch 1 (construction only, §5.4)
    next: tuple        # per branch: the state of the next decision


def decisions(p0: float, k: int) -> list[Decision]:
    """The model of §5.4's decision table; what each branch emits is compact._child's,
    which readers need too and which takes no floating point."""
    m = 1 << k
    u, s = 0, k + 1
    out = [Decision(p0 ** m, (1 if k else s, u))]
    for st in range(1, k + 1):
        a = p0 ** (1 << (k - st))
        out.append(Decision(a / (1 + a), (st + 1, st + 1)))
    out.append(Decision(0.5, (u, u)))
    return out


@nb.njit(cache=True)
def _grow_tree(start, p1, nx, child, node_base, by_probability):
    """One state's tree shape: 65535 expansions of the most probable leaf (ties: the leaf
    created first). child[node, branch] is set to the child node, or -1 for a leaf;
    by_probability[i] = node * 2 + branch of the leaf i-th in decreasing probability (the
    numbering of stores before 1.4). Returns the next free node."""
    maxl = 2 * CODEWORDS
    lst = np.empty(maxl, np.int64)
    lpar = np.empty(maxl, np.int64)
    lbr = np.empty(maxl, np.int64)
    lst[0] = start
    lpar[0] = -1
    lbr[0] = 0
    heap = [(-1.0, 0)]                 # (-probability, creation order) of the leaves
    n_created = 1
    node = node_base
    for _ in range(CODEWORDS - 1):
        negp, lid = heapq.heappop(heap)
        if lpar[lid] >= 0:
            child[lpar[lid], lbr[lid]] = node
        st = lst[lid]
        for b in range(2):
            q = 1.0 - p1[st] if b == 0 else p1[st]
            c = n_created
            n_created += 1
            lst[c] = nx[st, b]
            lpar[c] = node
            lbr[c] = b
            child[node, b] = -1
            heapq.heappush(heap, (negp * q, c))
        node += 1
    for i in range(CODEWORDS):
        lid = heapq.heappop(heap)[1]        # popping the heap empty sorts the leaves
        by_probability[i] = 2 * lpar[lid] + lbr[lid]
    return node


@nb.njit(cache=True)
def _number_leaves(child, roots):
    """Leaf c of each state's tree, in preorder (branch 0 first), becomes ~c in child:
    the numbering of spec §5.7.1, which the tree's shape alone determines."""
    stack = np.empty(2 * CODEWORDS, np.int64)       # child slots node * 2 + branch
    for s in range(roots.shape[0]):
        code = 0
        stack[0] = 2 * roots[s] + 1
        stack[1] = 2 * roots[s]
        sp = 2
        while sp > 0:
            sp -= 1
            v, b = stack[sp] >> 1, stack[sp] & 1
            c = child[v, b]
            if c < 0:
                child[v, b] = ~code
                code += 1
            else:
                stack[sp] = 2 * c + 1
                stack[sp + 1] = 2 * c
                sp += 2


@lru_cache(maxsize=8)
def build_golomb(p0: float, k: int | None = None, form: str = compact.TREE_FORM) -> Dictionary:
    """Greedy Tunstall expansion, per start state, of the most probable leaf (ties: the
    earliest created) until 2^16 leaves. What a 1.4 store holds is the trees' shapes
    (§5.7.1), whose tables come from them by the readers' own derivation; form="tables"
    gives the dictionary as stores before 1.4 held it, the same entries numbered by
    decreasing probability (what `verify --deep` re-encodes those stores with)."""
    if k is None:
        k = golomb_k(p0)
    dec = decisions(p0, k)
    n_states = k + 2
    p1 = np.array([d.p1 for d in dec], np.float64)
    nx = np.array([d.next for d in dec], np.int64)
    # child[node, branch]: >= 0 an internal node, < 0 the leaf codeword ~child.
    child = np.zeros((n_states * (CODEWORDS - 1), 2), np.int32)
    roots = np.zeros(n_states, np.int32)
    by_probability = np.zeros((n_states, CODEWORDS), np.int64)
    node = 0
    for start in range(n_states):
        roots[start] = node
        node = _grow_tree(start, p1, nx, child, node, by_probability[start])
    tree = compact.tree_bits(child, roots)
    _number_leaves(child, roots)
    tables, problem = compact.derive(compact.TREE_FORM, {"tree": tree}, n_states)
    if problem is not None:
        raise ValueError(f"golomb-v2f p0={p0} k={k}: {problem}")
    params = {"p_zero": p0, "k": k}
    if form == compact.TABLES_FORM:
        slots = by_probability.reshape(-1)
        preorder = ~child.reshape(-1)[slots].reshape(n_states, CODEWORDS)
        child.reshape(-1)[slots] = ~np.tile(np.arange(CODEWORDS, dtype=np.int32), n_states)
        tables = {name: np.ascontiguousarray(np.take_along_axis(
            a, preorder.reshape(preorder.shape + (1,) * (a.ndim - 2)), axis=1))
            for name, a in tables.items()}
        d = Dictionary(kind=KIND_GOLOMB, params=params, **tables)
    else:
        d = Dictionary(kind=KIND_GOLOMB, params=params, form=form, stored={"tree": tree},
                       **tables)
    d.encoder = parse_tables(child, roots, d.next_state)
    return d


# ---------------------------------------------------------------- encoder tables
# The leaves of each state's tree form a complete prefix code over decision bits, and the
# decisions are fixed by the data alone. So the encoder writes a row's decision bits first
# and then parses them as inflate parses Huffman codes: multi-level lookup tables, one to
# three lookups per codeword instead of one dependent load per decision (~18).
ROOT_BITS = 12
SUB_BITS = 6


@nb.njit(cache=True)
def _parse_tables(child, roots, next_state, root_bits, sub_bits, fill, tab):
    """Multi-level tables over child/roots. Entry >= 0: a leaf, codeword | bits consumed
    << 16 | next_state << 21 (so the encoder needs no other table); entry < 0:
    ~(offset << 5 | width) of a subtable. fill=False only sizes them."""
    n = child.shape[0]
    md = np.zeros(n, np.int32)          # depth of the deepest leaf below each node
    for v in range(n - 1, -1, -1):      # children are created after their parents
        a = child[v, 0]
        b = child[v, 1]
        da = md[a] if a >= 0 else 0
        db = md[b] if b >= 0 else 0
        md[v] = 1 + max(da, db)
    s_count = roots.shape[0]
    base = np.zeros(s_count, np.int64)
    root_w = np.zeros(s_count, np.int64)
    q_node = np.empty(n + s_count, np.int64)
    s_of = np.empty(n + s_count, np.int64)
    q_off = np.empty(n + s_count, np.int64)
    q_w = np.empty(n + s_count, np.int64)
    stack_node = np.empty(64 * 2, np.int64)
    stack_depth = np.empty(64 * 2, np.int64)
    stack_prefix = np.empty(64 * 2, np.int64)
    size = 0
    qn = 0
    for s in range(s_count):
        w = min(root_bits, md[roots[s]])
        base[s] = size
        root_w[s] = w
        s_of[qn] = s
        q_node[qn] = roots[s]
        q_off[qn] = size
        q_w[qn] = w
        qn += 1
        size += 1 << w
    qi = 0
    while qi < qn:
        node = q_node[qi]
        off = q_off[qi]
        w = q_w[qi]
        qi += 1
        sp = 0
        stack_node[0] = node
        stack_depth[0] = 0
        stack_prefix[0] = 0
        sp = 1
        while sp > 0:
            sp -= 1
            v = stack_node[sp]
            d = stack_depth[sp]
            pre = stack_prefix[sp]
            for br in range(2):
                c = child[v, br]
                p2 = pre * 2 + br
                d2 = d + 1
                if c < 0:
                    if fill:
                        span = 1 << (w - d2)
                        code = ~c
                        val = code | (d2 << 16) | (np.int64(next_state[s_of[qi - 1], code]) << 21)
                        for j in range(p2 * span, (p2 + 1) * span):
                            tab[off + j] = val
                elif d2 == w:
                    w2 = min(sub_bits, md[c])
                    if fill:
                        tab[off + p2] = ~((size << 5) | w2)
                    q_node[qn] = c
                    s_of[qn] = s_of[qi - 1]
                    q_off[qn] = size
                    q_w[qn] = w2
                    qn += 1
                    size += 1 << w2
                else:
                    stack_node[sp] = c
                    stack_depth[sp] = d2
                    stack_prefix[sp] = p2
                    sp += 1
    return size, base, root_w


def parse_tables(child: np.ndarray, roots: np.ndarray, next_state: np.ndarray):
    """-> (tab, base, root_width): state s's root table is tab[base[s]:][:2**root_width[s]]."""
    size, _, _ = _parse_tables(child, roots, next_state, ROOT_BITS, SUB_BITS, False,
                               np.zeros(1, np.int32))
    tab = np.zeros(size, np.int32)
    _, base, root_w = _parse_tables(child, roots, next_state, ROOT_BITS, SUB_BITS, True, tab)
    return tab, base, root_w
