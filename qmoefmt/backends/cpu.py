"""The Numba CPU backend: row-parallel decode kernels (`numba.prange` over rows).

Safety: Numba does not bounds-check. Everything a kernel indexes with is in range by
construction (a uint16 codeword into a 65536-entry table, a state from a table whose
values were validated) or was checked by the caller (row offsets against len(codes)),
and every output write is guarded by the row width. Row-level violations come back as
status codes, never as memory errors.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from .base import ROW_EXTRA_CODES, ROW_NONZERO_PAD, ROW_OK, ROW_SHORT, DecodeBackend

_PAR = dict(nogil=True, parallel=True, cache=True)
_SEQ = dict(nogil=True, cache=True)


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
            return ROW_EXTRA_CODES
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
                return ROW_NONZERO_PAD
            if mode == 0:
                sym_out[p] = 2 if is_hi else 1
            else:
                f_out[p] = hi if is_hi else lo
        pos += length
    if pos < cols:
        return ROW_SHORT
    return ROW_OK


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


@nb.njit(**_SEQ)
def _dot_row(codes, start, n, cols, rec, lb, kb, s0, sp, chain, xt, acc):
    """One row of Y = X W^T without W: acc[0, :] += X[:, p] for every lo symbol at column
    p, acc[1, :] for every hi one (xt is X transposed, [cols, batch], so a nonzero adds a
    contiguous run of batch values). Bounds as in _decode_row. Returns a ROW_* status."""
    one = np.uint64(1)
    lmask = (one << np.uint64(lb)) - one
    kmask = (one << np.uint64(kb)) - one
    ulb = np.uint64(lb)
    width = np.uint64(lb + 1)
    head = np.uint64(lb + kb)
    batch = xt.shape[1]
    state = 0
    pos = 0
    for j in range(n):
        if pos >= cols:
            return ROW_EXTRA_CODES
        e = (state << 16) | codes[start + j]
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
            h = np.int64((x >> ulb) & one)
            x >>= width
            left -= 1
            if p >= cols:
                return ROW_NONZERO_PAD
            for b in range(batch):
                acc[h, b] += xt[p, b]
        pos += length
    if pos < cols:
        return ROW_SHORT
    return ROW_OK


@nb.njit(**_SEQ)
def _dot_row1(codes, start, n, cols, rec, lb, kb, s0, sp, chain, x1, lo, hi):
    """_dot_row for one input vector, the sums in registers: -> (ROW_* status, y). The
    selects are multiplications by 0/1 (exact), so no branch depends on the data."""
    one = np.uint64(1)
    lmask = (one << np.uint64(lb)) - one
    kmask = (one << np.uint64(kb)) - one
    ulb = np.uint64(lb)
    width = np.uint64(lb + 1)
    head = np.uint64(lb + kb)
    slo = np.float32(0.0)
    shi = np.float32(0.0)
    state = 0
    pos = 0
    for j in range(n):
        if pos >= cols:
            return ROW_EXTRA_CODES, np.float32(0.0)
        e = (state << 16) | codes[start + j]
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
            h = np.float32((x >> ulb) & one)
            x >>= width
            left -= 1
            if p >= cols:
                return ROW_NONZERO_PAD, np.float32(0.0)
            v = x1[p]
            shi += v * h
            slo += v - v * h
        pos += length
    if pos < cols:
        return ROW_SHORT, np.float32(0.0)
    return ROW_OK, lo * slo + hi * shi


@nb.njit(**_PAR)
def _ternary_matmul(codes, offsets, cols, rec, lb, kb, s0, sp, chain, lo, hi, xt, y, status,
                    blocks):
    """Rows in `blocks` contiguous blocks (a few per thread), each with one accumulator."""
    rows = offsets.shape[0] - 1
    batch = xt.shape[1]
    for k in nb.prange(blocks):
        acc = np.empty((2, batch), np.float32)
        for r in range(k * rows // blocks, (k + 1) * rows // blocks):
            if batch == 1:
                status[r], y[0, r] = _dot_row1(codes, offsets[r], offsets[r + 1] - offsets[r],
                                               cols, rec, lb, kb, s0, sp, chain, xt[:, 0],
                                               lo[r], hi[r])
                continue
            acc[:] = 0
            status[r] = _dot_row(codes, offsets[r], offsets[r + 1] - offsets[r], cols,
                                 rec, lb, kb, s0, sp, chain, xt, acc)
            for b in range(batch):
                y[b, r] = lo[r] * acc[0, b] + hi[r] * acc[1, b]


@nb.njit(**_PAR)
def _kbit_matmul(packed, bits, cols, group_size, scales, zeros, xt, y, bad, blocks):
    """Y = X W^T for §12 rows: per group, scale * sum of (level - zero) * x, the levels
    unpacked on the fly (subtracting the zero point per weight keeps the error within
    fp32 rounding of the dequantized product; sum(level * x) - zero * sum(x) cancels)."""
    rows = packed.shape[0]
    batch = xt.shape[1]
    groups = scales.shape[1]
    mask = (1 << bits) - 1
    for k in nb.prange(blocks):
        acc = np.empty(batch, np.float32)
        out = np.empty(batch, np.float32)
        for r in range(k * rows // blocks, (k + 1) * rows // blocks):
            out[:] = 0
            bitacc = np.uint32(0)
            nacc = 0
            o = 0
            for g in range(groups):
                acc[:] = 0
                z = np.float32(zeros[r, g])
                for i in range(g * group_size, min(cols, (g + 1) * group_size)):
                    if nacc < bits:
                        bitacc |= np.uint32(packed[r, o]) << np.uint32(nacc)
                        o += 1
                        nacc += 8
                    level = np.float32(bitacc & mask) - z
                    bitacc >>= np.uint32(bits)
                    nacc -= bits
                    for b in range(batch):
                        acc[b] += level * xt[i, b]
                s = scales[r, g]
                for b in range(batch):
                    out[b] += s * acc[b]
            if bitacc != 0:         # padding bits of the last byte must be zero
                bad[r] = 1
            for b in range(batch):
                y[b, r] = out[b]


@nb.njit(**_PAR)
def _unpack(packed, bits, cols, out, bad):
    rows = packed.shape[0]
    mask = (1 << bits) - 1
    for r in nb.prange(rows):
        acc = np.uint32(0)
        nacc = 0
        o = 0
        for i in range(cols):
            if nacc < bits:
                acc |= np.uint32(packed[r, o]) << np.uint32(nacc)
                o += 1
                nacc += 8
            out[r, i] = acc & mask
            acc >>= np.uint32(bits)
            nacc -= bits
        if acc != 0:        # padding bits of the last byte must be zero
            bad[r] = 1


class NumbaCPU(DecodeBackend):
    name = "numba"

    def ternary_symbols(self, codes, offsets, cols, d, out, status) -> None:
        _decode_symbols(codes, offsets, cols, *d.runtime_records(), d.runtime_chain(), out, status)

    def ternary_values(self, codes, offsets, cols, d, lo, hi, out, status) -> None:
        _decode_values(codes, offsets, cols, *d.runtime_records(), d.runtime_chain(), lo, hi,
                       out, status)

    def ternary_matmul(self, codes, offsets, cols, d, lo, hi, xt, y, status) -> None:
        rows = offsets.shape[0] - 1
        _ternary_matmul(codes, offsets, cols, *d.runtime_records(), d.runtime_chain(), lo, hi,
                        xt, y, status, min(rows, 8 * nb.get_num_threads()))

    def kbit_matmul(self, packed, bits, cols, group_size, scales, zeros, xt, y, bad) -> None:
        _kbit_matmul(np.ascontiguousarray(packed), bits, cols, group_size, scales,
                     np.ascontiguousarray(zeros), xt, y, bad,
                     min(packed.shape[0], 8 * nb.get_num_threads()))

    def unpack_levels(self, packed, bits, cols, out, bad) -> None:
        _unpack(np.ascontiguousarray(packed), bits, cols, out, bad)
