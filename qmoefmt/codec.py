"""Codec `qmoe.ternary-dict16` (spec §5): rows of ternary symbols <-> 16-bit codewords.

Rows are coded independently; each row's codewords are followed by nothing else, and a
row's count of codewords is stored in `row_codes`. The decoder is shared by every
dictionary kind; the encoders differ (greedy trie for qmoe-2023, parse trees for
golomb-v2f).

Safety: Numba does not bounds-check. Everything the decoder indexes with is either in
range by construction (a uint16 codeword into a 65536-entry table, a state from a table
whose values were validated), or checked before use (row offsets against len(codes)), and
every output write is guarded by the row width. Row-level violations come back as status
codes, never as memory errors.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from .dictionary import Dictionary
from .errors import FormatError

ROW_OK = 0
ROW_EXTRA_CODES = 1     # a codeword starts at or past the row's end
ROW_SHORT = 2           # the codewords expand to fewer symbols than the row has
ROW_NONZERO_PAD = 3     # a nonzero symbol falls past the row's end
ROW_STATUS = {
    ROW_EXTRA_CODES: "codeword starts past the end of the row",
    ROW_SHORT: "codewords expand to fewer symbols than the row width",
    ROW_NONZERO_PAD: "nonzero symbol past the end of the row (padding must be zero)",
}

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
    node = 65536
    for i in range(0, cols, 2):
        r = sym[i]
        if i + 1 < cols:
            r += 3 * sym[i + 1]
        nxt = trie[node, r]
        if nxt == -1:
            out[n] = node
            n += 1
            nxt = trie[65536, r]
        node = nxt
    out[n] = node
    return n + 1


@nb.njit(**_SEQ)
def _encode_row_golomb(sym, child, roots, rec, k, out):
    cols = sym.shape[0]
    state = 0
    node = roots[0]
    n = 0
    emitted = 0
    pos = 0
    i = 0
    while True:
        # next event: a nonzero at i preceded by a run of i - pos zeros, or the tail
        while i < cols and sym[i] == 0:
            i += 1
        tail = i >= cols
        run = i - pos
        # the tail is an infinite run: "m more zeros" until the row is covered
        n_unary = (run >> k) if not tail else 1 << 62
        u = 0
        while u < n_unary:
            if tail and node == roots[state] and emitted >= cols:
                return n
            c = child[node, 1]
            u += 1
            if c < 0:
                code = ~c
                out[n] = code
                n += 1
                e = (state << 16) | code
                emitted += rec[e, 0]
                state = rec[e, 1] & 0xFF
                node = roots[state]
            else:
                node = c
        # U: 0, then the k remainder bits, then the sign
        for step in range(k + 2):
            if step == 0:
                b = 0
            elif step <= k:
                b = (run >> (k - step)) & 1
            else:
                b = 1 if sym[i] == 2 else 0
            c = child[node, b]
            if c < 0:
                code = ~c
                out[n] = code
                n += 1
                e = (state << 16) | code
                emitted += rec[e, 0]
                state = rec[e, 1] & 0xFF
                node = roots[state]
            else:
                node = c
        i += 1
        pos = i


@nb.njit(**_PAR)
def _encode_rows_qmoe(sym, trie, scratch, counts):
    for r in nb.prange(sym.shape[0]):
        counts[r] = _encode_row_qmoe(sym[r], trie, scratch[r])


@nb.njit(**_PAR)
def _encode_rows_golomb(sym, child, roots, rec, k, scratch, counts):
    for r in nb.prange(sym.shape[0]):
        counts[r] = _encode_row_golomb(sym[r], child, roots, rec, k, scratch[r])


@nb.njit(**_PAR)
def _compact(scratch, counts, offsets, codes):
    for r in nb.prange(scratch.shape[0]):
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
        if d.kind == "qmoe-2023":
            _encode_rows_qmoe(sym, d.encoder, scratch, counts)
        else:
            child, roots = d.encoder
            _encode_rows_golomb(sym, child, roots, d.runtime_records(),
                                int(d.params["k"]), scratch, counts)
    offsets = np.zeros(rows + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    codes = np.empty(int(offsets[-1]), np.uint16)
    if rows:
        _compact(scratch, counts, offsets, codes)
    dt = np.uint16 if cols < (1 << 16) else np.uint32
    return codes, counts.astype(dt)


# ---------------------------------------------------------------- decoder

@nb.njit(**_SEQ)
def _decode_row(codes, start, n, cols, rec, shift, sym_out, f_out, lo, hi, mode):
    """mode 0: write symbols into sym_out; mode 1: write lo/hi values into f_out (which
    the caller zero-filled). Returns a ROW_* status."""
    state = 0
    pos = 0
    for j in range(n):
        if pos >= cols:
            return 1
        e = (state << 16) | codes[start + j]
        mask = (1 << shift) - 1
        for i in range(rec[e, 1] >> 8):
            v = rec[e, 2 + i]
            p = pos + (v & mask)
            y = 1 + (v >> shift)
            if p < cols:
                if mode == 0:
                    sym_out[p] = y
                else:
                    f_out[p] = lo if y == 1 else hi
            else:
                return 3
        pos += rec[e, 0]
        state = rec[e, 1] & 0xFF
    if pos < cols:
        return 2
    return 0


@nb.njit(**_PAR)
def _decode_symbols(codes, offsets, cols, rec, shift, out, status):
    dummy = np.zeros(1, np.float32)
    for r in nb.prange(out.shape[0]):
        status[r] = _decode_row(codes, offsets[r], offsets[r + 1] - offsets[r], cols,
                                rec, shift, out[r], dummy,
                                0.0, 0.0, 0)


@nb.njit(**_PAR)
def _decode_values(codes, offsets, cols, rec, shift, lo, hi, out, status):
    dummy = np.zeros(1, np.int8)
    for r in nb.prange(out.shape[0]):
        status[r] = _decode_row(codes, offsets[r], offsets[r + 1] - offsets[r], cols,
                                rec, shift, dummy, out[r],
                                lo[r], hi[r], 1)


def _records(d: Dictionary) -> tuple[np.ndarray, int]:
    rec = d.runtime_records()
    return rec, (16 if rec.dtype == np.uint32 else 15)


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


def _raise_status(status: np.ndarray, where: str) -> None:
    bad = np.flatnonzero(status)
    if bad.size:
        r = int(bad[0])
        more = f" (and {bad.size - 1} more rows)" if bad.size > 1 else ""
        raise FormatError(where, f"row {r}: {ROW_STATUS[int(status[r])]}{more}")


def decode_symbols(codes: np.ndarray, row_codes: np.ndarray, cols: int, d: Dictionary,
                   where: str = "tensor") -> np.ndarray:
    """-> int8 [rows, cols] symbols. The dictionary must have been validated."""
    rows = np.asarray(row_codes).shape[0]
    offsets = row_offsets(row_codes, codes.shape[0], cols, where)
    out = np.zeros((rows, cols), np.int8)
    status = np.zeros(rows, np.uint8)
    if rows and cols:
        _decode_symbols(codes, offsets, cols, *_records(d), out, status)
    elif rows and codes.shape[0]:
        status[:] = np.asarray(row_codes) > 0
    _raise_status(status, where)
    return out


def decode_values(codes: np.ndarray, row_codes: np.ndarray, cols: int, d: Dictionary,
                  lo: np.ndarray, hi: np.ndarray, where: str = "tensor",
                  out: np.ndarray | None = None) -> np.ndarray:
    """-> float32 [rows, cols] dequantized weights (0, lo[row] or hi[row])."""
    rows = np.asarray(row_codes).shape[0]
    offsets = row_offsets(row_codes, codes.shape[0], cols, where)
    if out is None:
        out = np.zeros((rows, cols), np.float32)
    else:
        if out.shape != (rows, cols) or out.dtype != np.float32:
            raise ValueError(f"out must be float32 {(rows, cols)}")
        out.fill(0)
    status = np.zeros(rows, np.uint8)
    if rows and cols:
        _decode_values(codes, offsets, cols, *_records(d),
                       np.asarray(lo, np.float32), np.asarray(hi, np.float32), out, status)
    _raise_status(status, where)
    return out
