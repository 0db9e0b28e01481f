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

from . import cpu_matmul
from .base import ROW_EXTRA_CODES, ROW_NONZERO_PAD, ROW_OK, ROW_SHORT, DecodeBackend

_PAR = dict(nogil=True, parallel=True, cache=True)
# below this many codewords (times the batch) a product runs on the calling thread
SERIAL_CODEWORDS = 16384
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
        slots = d.runtime_slots()
        if slots is None:          # entries too wide for one word: no ladder dictionary
            self._ternary_matmul_by_blocks(codes, offsets, cols, d, lo, hi, xt, y, status)
            return
        words, lb, k = slots
        if xt.shape[1] == 1:
            table, xp = cpu_matmul.matvec_table(xt[:, 0], cols, lb), np.zeros((1, 1), np.float32)
        else:
            table, xp = np.zeros(1, np.float32), np.ascontiguousarray(xt.T)
        args = (codes, offsets, cols, d.runtime_next(), words, lb, k, lo, hi, xp, table, y, status)
        threads = nb.get_num_threads()
        if threads == 1 or codes.shape[0] * xt.shape[1] < SERIAL_CODEWORDS:
            cpu_matmul.ternary_matmul_serial(*args)
        else:
            cpu_matmul.ternary_matmul(*args, 4 * threads)

    def _ternary_matmul_by_blocks(self, codes, offsets, cols, d, lo, hi, xt, y, status,
                                  block: int = 256) -> None:
        """Dense a block of rows at a time, for dictionaries the fused kernel cannot
        take: W is never whole, only `block` rows of it."""
        for r0 in range(0, offsets.shape[0] - 1, block):
            r1 = min(offsets.shape[0] - 1, r0 + block)
            w = np.empty((r1 - r0, cols), np.float32)
            self.ternary_values(codes, offsets[r0:r1 + 1], cols, d, lo[r0:r1], hi[r0:r1], w,
                                status[r0:r1])
            y[:, r0:r1] = xt.T @ w.T

    def kbit_matmul(self, packed, bits, cols, group_size, scales, zeros, xt, y, bad) -> None:
        packed, zeros = np.ascontiguousarray(packed), np.ascontiguousarray(zeros)
        if bits in (2, 4) and group_size % (8 // bits) == 0:
            if xt.shape[1] == 1:
                cpu_matmul.kbit_matvec(packed, bits, cols, group_size, scales, zeros,
                                       cpu_matmul.kbit_matvec_input(xt[:, 0], bits), y, bad)
            else:
                cpu_matmul.kbit_matmul(packed, bits, cols, group_size, scales, zeros,
                                       cpu_matmul.kbit_matmul_input(xt, bits), y, bad,
                                       min(packed.shape[0], 4 * nb.get_num_threads()))
            return
        _kbit_matmul(packed, bits, cols, group_size, scales, zeros, xt, y, bad,
                     min(packed.shape[0], 8 * nb.get_num_threads()))

    def unpack_levels(self, packed, bits, cols, out, bad) -> None:
        _unpack(np.ascontiguousarray(packed), bits, cols, out, bad)
