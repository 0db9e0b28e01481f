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
        if d.kind == "qmoe-2023":
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
    dt = np.uint16 if cols < (1 << 16) else np.uint32
    return codes, counts.astype(dt)


# ---------------------------------------------------------------- decoder

@nb.njit(**_SEQ)
def _decode_row(codes, start, n, cols, rec, lb, kb, s0, sp, chain, sym_out, f_out, lo, hi, mode):
    """mode 0: write symbols into sym_out; mode 1: write lo/hi values into f_out. The row
    is zeroed here, just before the scatter, while it is in cache. Returns a ROW_* status."""
    if mode == 0:
        sym_out[:] = 0
    else:
        f_out[:] = 0
    one = np.uint64(1)
    lmask = (one << np.uint64(lb)) - one
    kmask = (one << np.uint64(kb)) - one
    ulb = np.uint64(lb)
    width = np.uint64(lb + 1)
    head = np.uint64(lb + kb)
    state = 0
    pos = 0
    for j in range(n):
        if pos >= cols:
            return 1
        e = (state << 16) | codes[start + j]
        # the state and position chains run through the small chain table (next_state |
        # length << 8, L2-resident), so the loads of the records of successive codewords
        # stay off the critical path and overlap
        c = chain[e]
        state = c & 0xFF
        length = np.int64(c >> 8)
        x = rec[e, 0]
        nnz = np.int64((x >> ulb) & kmask)
        x >>= head
        left = s0
        word = 0
        for _ in range(nnz):
            if left == 0:
                word += 1
                x = rec[e, word]
                left = sp
            p = pos + np.int64(x & lmask)
            is_hi = (x >> ulb) & one
            x >>= width
            left -= 1
            if p >= cols:
                return 3
            if mode == 0:
                sym_out[p] = 2 if is_hi else 1
            else:
                f_out[p] = hi if is_hi else lo
        pos += length
    if pos < cols:
        return 2
    return 0


@nb.njit(**_PAR)
def _decode_symbols(codes, offsets, cols, rec, lb, kb, s0, sp, chain, out, status):
    dummy = np.zeros(1, np.float32)
    for r in nb.prange(out.shape[0]):
        status[r] = _decode_row(codes, offsets[r], offsets[r + 1] - offsets[r], cols,
                                rec, lb, kb, s0, sp, chain, out[r], dummy,
                                0.0, 0.0, 0)


@nb.njit(**_PAR)
def _decode_values(codes, offsets, cols, rec, lb, kb, s0, sp, chain, lo, hi, out, status):
    dummy = np.zeros(1, np.int8)
    for r in nb.prange(out.shape[0]):
        status[r] = _decode_row(codes, offsets[r], offsets[r + 1] - offsets[r], cols,
                                rec, lb, kb, s0, sp, chain, dummy, out[r],
                                lo[r], hi[r], 1)


def _records(d: Dictionary):
    return (*d.runtime_records(), d.runtime_chain())


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
    out = np.zeros((rows, cols), np.int8) if not (rows and cols) else np.empty((rows, cols), np.int8)
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
        out = np.empty((rows, cols), np.float32)
    elif out.shape != (rows, cols) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {(rows, cols)}")
    status = np.zeros(rows, np.uint8)
    if rows and cols:
        _decode_values(codes, offsets, cols, *_records(d),
                       np.asarray(lo, np.float32), np.asarray(hi, np.float32), out, status)
    _raise_status(status, where)
    return out
