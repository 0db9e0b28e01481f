"""The row stream coder (spec §5.2): rows of ternary symbols <-> 16-bit codewords, the
part the two dictionary-coded codecs share.

Rows are coded independently; each row's codewords are followed by nothing else, and a
row's count of codewords is stored in `row_codes`. The encoders differ by dictionary kind
(greedy trie for qmoe-2023, parse trees for golomb-v2f); decoding is one procedure for
every kind: this module checks the stream against the codes array and the row width, and
a decode backend (`qmoefmt.backends`) runs the kernel.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from .. import backends
from ..backends.base import ROW_SHORT, ROW_STATUS
from ..errors import FormatError
from ..format.constants import KIND_QMOE2023, index_dtype
from .qmoe2023 import TRIE_ROOT
from .tables import Dictionary

_PAR = dict(nogil=True, parallel=True, cache=True)
_SEQ = dict(nogil=True, cache=True)


# ---------------------------------------------------------------- encoders

@nb.njit(**_SEQ)
def _encode_row_qmoe(sym, trie, out):
    """QMoE's greedy longest match over pairs r = t[i] + 3 t[i+1] (odd rows pad a 0)."""
    cols = sym.shape[0]
    n = 0
    if cols == 0:
        return 0
    node = TRIE_ROOT
    for i in range(0, cols, 2):
        r = sym[i]
        if i + 1 < cols:
            r += 3 * sym[i + 1]
        nxt = trie[node, r]
        if nxt == -1:
            out[n] = node
            n += 1
            nxt = trie[TRIE_ROOT, r]
        node = nxt
    out[n] = node
    return n + 1


_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


@nb.njit(**_SEQ)
def _append(buf, w, acc, nacc, v, nb):
    """Append the nb (1..63) low bits of v, most significant first, to a bit string kept
    as words written so far (buf[:w]) and `nacc` pending bits left-aligned in `acc`."""
    free = 64 - nacc
    if nb < free:
        return w, acc | (np.uint64(v) << np.uint64(free - nb)), nacc + nb
    over = nb - free
    buf[w] = acc | (np.uint64(v) >> np.uint64(over))
    acc = (np.uint64(v) << np.uint64(64 - over)) if over else np.uint64(0)
    return w + 1, acc, over


@nb.njit(**_SEQ)
def _word(buf, i):
    # past the row's decisions come U:1 decisions for ever (the infinite zero run)
    return buf[i] if i < buf.shape[0] else _ONES


@nb.njit(**_SEQ)
def _peek(buf, pos, w):
    i = pos >> 6
    off = np.uint64(pos & 63)
    hi = _word(buf, i) << off
    if off:
        hi |= _word(buf, i + 1) >> (np.uint64(64) - off)
    return np.int64(hi >> np.uint64(64 - w))


@nb.njit(**_SEQ)
def _encode_row_golomb(sym, tab, base, root_w, k, out):
    """Write the row's Golomb decisions as bits (spec §5.4), then parse them with each
    state's lookup tables."""
    cols = sym.shape[0]
    if cols == 0:
        return 0
    buf = np.empty((cols * (k + 2) + (cols >> k) + 128) // 64, np.uint64)
    w = 0
    acc = np.uint64(0)
    nacc = 0
    last = 0
    low = (1 << k) - 1
    for i in range(cols):
        y = sym[i]
        if y != 0:
            run = i - last
            u = run >> k
            while u > 32:                       # long runs: unary ones in chunks
                w, acc, nacc = _append(buf, w, acc, nacc, 0xFFFFFFFF, 32)
                u -= 32
            # one append an event: u ones (U:1), a 0 (U:0), k remainder bits, the sign
            v = (((1 << u) - 1) << (k + 2)) | ((run & low) << 1) | (1 if y == 2 else 0)
            w, acc, nacc = _append(buf, w, acc, nacc, v, u + k + 2)
            last = i + 1
    nbits = w * 64 + nacc
    if nacc:
        buf[w] = acc | (_ONES >> np.uint64(nacc))
        w += 1
    for j in range(w, buf.shape[0]):
        buf[j] = _ONES
    # The decisions before bit nbits cover the symbols up to the last nonzero; each
    # padding decision (U:1) covers m more, so coverage needs no table of lengths.
    m = 1 << k
    state = 0
    n = 0
    pos = 0
    while pos < nbits or last + m * (pos - nbits) < cols:
        t = base[state]
        width = root_w[state]
        while True:
            e = tab[t + _peek(buf, pos, width)]
            if e >= 0:
                break
            pos += width
            x = ~e
            t = x >> 5
            width = x & 31
        pos += (e >> 16) & 0x1F
        out[n] = e & 0xFFFF
        n += 1
        state = e >> 21
    return n


@nb.njit(**_PAR)
def _encode_rows_qmoe(sym, trie, scratch, counts):
    for r in nb.prange(sym.shape[0]):
        counts[r] = _encode_row_qmoe(sym[r], trie, scratch[r])


@nb.njit(**_PAR)
def _encode_rows_golomb(sym, tab, base, root_w, k, scratch, counts):
    for r in nb.prange(sym.shape[0]):
        counts[r] = _encode_row_golomb(sym[r], tab, base, root_w, k, scratch[r])


@nb.njit(**_SEQ)
def _compact(scratch, counts, offsets, codes):
    # a memcpy of the (small) codes: not worth a parallel region
    for r in range(scratch.shape[0]):
        o = offsets[r]
        for j in range(counts[r]):
            codes[o + j] = scratch[r, j]


def encode(symbols: np.ndarray, d: Dictionary) -> tuple[np.ndarray, np.ndarray]:
    """symbols int8 [rows, cols] in {0, 1, 2} -> (codes uint16 [n], row_codes [rows]).
    row_codes is uint16 when every count fits, else uint32 (spec §5.2)."""
    sym = np.ascontiguousarray(symbols, dtype=np.int8)
    if sym.ndim != 2:
        raise ValueError(f"symbols must be 2-D [rows, cols], got shape {sym.shape}")
    rows, cols = sym.shape
    if sym.size and (sym.min() < 0 or sym.max() > 2):
        raise ValueError("symbols must be 0, 1 or 2")
    # Each codeword starts inside the row and expands to >= 1 symbol: <= cols per row.
    scratch = np.empty((rows, max(cols, 1)), np.uint16)
    counts = np.zeros(rows, np.int64)
    if rows:
        if d.kind == KIND_QMOE2023:
            _encode_rows_qmoe(sym, d.encoder, scratch, counts)
        else:
            tab, base, root_w = d.encoder
            _encode_rows_golomb(sym, tab, base, root_w,
                                int(d.params["k"]), scratch, counts)
    offsets = np.zeros(rows + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    codes = np.empty(int(offsets[-1]), np.uint16)
    if rows:
        _compact(scratch, counts, offsets, codes)
    return codes, counts.astype(index_dtype(cols))


# ---------------------------------------------------------------- decoder

def row_offsets(row_codes: np.ndarray, n_codes: int, cols: int, where: str = "tensor") -> np.ndarray:
    """Exclusive prefix sum of row_codes, checked against the codes array and the width."""
    rc = np.asarray(row_codes)
    if rc.ndim != 1:
        raise FormatError(where, f"row_codes must be 1-D, got shape {rc.shape}")
    if rc.size and int(rc.max()) > cols:
        r = int(np.argmax(rc > cols))
        raise FormatError(where, f"row {r}: {int(rc[r])} codewords for a row of {cols} symbols")
    offsets = np.zeros(rc.size + 1, np.int64)
    np.cumsum(rc, dtype=np.int64, out=offsets[1:])
    if offsets[-1] != n_codes:
        raise FormatError(where, f"row_codes sum to {int(offsets[-1])} but codes holds {n_codes} codewords")
    return offsets


def row_range(rows: slice | None, n: int) -> tuple[int, int]:
    """[start, stop) of a contiguous row selection (step 1) of n rows."""
    if rows is None:
        return 0, n
    if not isinstance(rows, slice) or rows.step not in (None, 1):
        raise ValueError(f"rows must be a slice with step 1, not {rows!r}")
    start, stop, _ = rows.indices(n)
    return start, max(start, stop)


def _raise_status(status: np.ndarray, where: str, first: int = 0) -> None:
    bad = np.flatnonzero(status)
    if bad.size:
        r = int(bad[0])
        more = f" (and {bad.size - 1} more rows)" if bad.size > 1 else ""
        raise FormatError(where, f"row {first + r}: {ROW_STATUS[int(status[r])]}{more}")


def decode_symbols(codes: np.ndarray, row_codes: np.ndarray, cols: int, d: Dictionary,
                   where: str = "tensor", backend=None, rows: slice | None = None) -> np.ndarray:
    """-> int8 [rows, cols] symbols (of the rows selected, all by default). The dictionary
    must have been validated; the stream is checked here before the backend's kernel
    sees it."""
    offsets = row_offsets(row_codes, codes.shape[0], cols, where)
    a, b = row_range(rows, len(offsets) - 1)
    return symbols_rows(codes, offsets[a:b + 1], cols, d, where, backend, first=a)


# Outputs up to this many elements are allocated before the kernel finds short rows;
# larger ones only once every row's codewords can reach its width.
REACH_CHECKED = 1 << 24


def check_reach(offsets: np.ndarray, cols: int, d: Dictionary, where: str, first: int) -> None:
    """Refuses, before a large output is allocated, rows whose codewords cannot expand to
    the width even at the dictionary's longest entry: else a store of a few bytes could
    declare a width that makes the reader allocate gigabytes only to find its rows short
    (spec §9). Reported as the kernel would report those rows."""
    n = len(offsets) - 1
    if n * cols <= REACH_CHECKED:
        return
    short = np.diff(offsets) * d.max_length < cols
    _raise_status(np.where(short, ROW_SHORT, 0).astype(np.uint8), where, first)


def symbols_rows(codes: np.ndarray, offsets: np.ndarray, cols: int, d: Dictionary,
                 where: str = "tensor", backend=None, first: int = 0) -> np.ndarray:
    """`decode_symbols` of the rows whose checked offsets (`row_offsets`, sliced) are
    given, the first of them row `first` of the tensor (for error messages)."""
    n = len(offsets) - 1
    check_reach(offsets, cols, d, where, first)
    out = np.zeros((n, cols), np.int8) if not (n and cols) else np.empty((n, cols), np.int8)
    status = np.zeros(n, np.uint8)
    if n and cols:
        backends.get(backend).ternary_symbols(codes, offsets, cols, d, out, status)
    elif n:
        status[:] = np.diff(offsets) > 0
    _raise_status(status, where, first)
    return out


def decode_values(codes: np.ndarray, row_codes: np.ndarray, cols: int, d: Dictionary,
                  lo: np.ndarray, hi: np.ndarray, where: str = "tensor",
                  out: np.ndarray | None = None, backend=None,
                  rows: slice | None = None) -> np.ndarray:
    """-> float32 [rows, cols] dequantized weights (0, lo[row] or hi[row]) of the rows
    selected (all by default; lo and hi are per row of the whole tensor)."""
    offsets = row_offsets(row_codes, codes.shape[0], cols, where)
    a, b = row_range(rows, len(offsets) - 1)
    offsets, n = offsets[a:b + 1], b - a
    check_reach(offsets, cols, d, where, a)
    if out is None:
        out = np.empty((n, cols), np.float32)
    elif out.shape != (n, cols) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {(n, cols)}")
    status = np.zeros(n, np.uint8)
    if n and cols:
        backends.get(backend).ternary_values(codes, offsets, cols, d,
                                             np.ascontiguousarray(lo[a:b], np.float32),
                                             np.ascontiguousarray(hi[a:b], np.float32), out, status)
    _raise_status(status, where, a)
    return out


def matmul_values(codes: np.ndarray, row_codes: np.ndarray, cols: int, d: Dictionary,
                  lo: np.ndarray, hi: np.ndarray, x: np.ndarray, where: str = "tensor",
                  backend=None) -> np.ndarray:
    """Y = X W^T (as nn.Linear computes it) for W what `decode_values` gives, without
    decoding W: x float32 [batch, cols] -> float32 [batch, rows]."""
    return matmul_rows(codes, row_offsets(row_codes, codes.shape[0], cols, where), cols, d,
                       np.asarray(lo, np.float32), np.asarray(hi, np.float32), x, where, backend)


def matmul_rows(codes: np.ndarray, offsets: np.ndarray, cols: int, d: Dictionary,
                lo: np.ndarray, hi: np.ndarray, x: np.ndarray, where: str = "tensor",
                backend=None) -> np.ndarray:
    """`matmul_values` with the row offsets already checked (`row_offsets`) and lo, hi
    float32: what a runtime weight holds, so that a forward pass redoes none of it."""
    rows = len(offsets) - 1
    if x.ndim != 2 or x.shape[1] != cols:
        raise ValueError(f"{where}: input of shape {list(x.shape)} for a weight of {cols} columns")
    y = np.zeros((x.shape[0], rows), np.float32)
    status = np.zeros(rows, np.uint8)
    if rows and cols and x.shape[0]:
        xt = np.ascontiguousarray(x.T, dtype=np.float32)
        backends.get(backend).ternary_matmul(codes, offsets, cols, d, lo, hi, xt, y, status)
    elif rows and not cols:
        status[:] = np.diff(offsets) > 0
    _raise_status(status, where)
    return y
