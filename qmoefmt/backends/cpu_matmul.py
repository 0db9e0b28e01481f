"""The Numba CPU decode-matmul kernels: Y = X W^T straight from a ternary stream (§5.2)
or from §12 packed levels, never holding W (at most one row of it, in a buffer).

A ternary row is a chain: each codeword's state comes from its predecessor's entry, one
dependent load per codeword (~10 ns from L2), so a row walked alone runs at the chain's
latency however little else there is to do. The kernel therefore works in two phases per
block of rows: phase 1 walks the block's rows in lockstep, so that their chains' loads
overlap, and only gathers each codeword's entry word (Dictionary.runtime_slots) into a
buffer; phase 2 reads that buffer in order, with no dependent loads left, and adds up the
inputs under each row's nonzeros. A slot is 3 * offset + class, an index into a table
of [position, class] rows: (0, 0) for class 0, (x, 0) for lo and (x, x) for hi with one
input vector, so the first FIXED_SLOTS slots of every entry are taken with no branch on
how many nonzeros it has (that count is close to random: a loop over it mispredicts).
For a batch, phase 2 writes the row's values into a buffer instead and takes one
vectorised dot product per input row.

The k-bit kernels unpack level s of every byte of a group in one pass against inputs
permuted the same way (column per * i + s at s * bytes + i), so that both operands are
contiguous and LLVM vectorises the loop.

Safety, as in cpu.py: entries come from (state < S, codeword < 65536), with states from
validated tables; a codeword is read only while the row's position is inside the row,
and its offsets are below 2^LB, so reads of the input stay inside the tables the caller
pads with 2^LB zero positions. Row violations come back as ROW_* codes.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from .base import ROW_EXTRA_CODES, ROW_NONZERO_PAD, ROW_OK, ROW_SHORT

_PAR = dict(nogil=True, parallel=True, cache=True)
_SEQ = dict(nogil=True, cache=True)
_U = np.uint64
LOCKSTEP_ROWS = 32        # rows whose chains phase 1 walks together
FIXED_SLOTS = 4           # slots phase 2 takes unrolled; an entry's later ones in a loop
_REASSOC = {"reassoc", "contract"}      # lets LLVM vectorise a sum (order: within fp32 rounding)
LONG_GROUP = 256          # bytes of a k-bit group from which kbit_matvec takes whole bytes


@nb.njit(**_SEQ)
def _gather_words(codes, offsets, r0, r1, nxt, slots, words, state, start, count):
    """Phase 1: words[j - offsets[r0]] = the entry word of codeword j, for every codeword
    of rows r0..r1, each row's chain advanced one codeword in turn."""
    base = offsets[r0]
    longest = 0
    for q in range(r1 - r0):
        start[q] = offsets[r0 + q]
        count[q] = offsets[r0 + q + 1] - start[q]
        state[q] = 0
        longest = max(longest, count[q])
    for i in range(longest):
        for q in range(r1 - r0):
            if i < count[q]:
                j = start[q] + i
                e = (state[q] << 16) | np.int64(codes[j])
                words[j - base] = slots[e]
                state[q] = np.int64(nxt[e])


@nb.njit(**_SEQ)
def _end_status(words, k0, k, pos, cols, lb, k_slots, stopped):
    """The row's status once its walk ends before codeword k at position pos, `stopped`
    if on a codeword that starts past the row. Only codeword k - 1 can reach past the
    row's end, so only its nonzeros are checked against it."""
    if k == k0:
        return ROW_EXTRA_CODES if stopped else (ROW_SHORT if cols else ROW_OK)
    w = words[k - 1]
    lmask = (_U(1) << _U(lb)) - _U(1)
    start = pos - np.int64(w & lmask)
    smask = (_U(1) << _U(lb + 2)) - _U(1)
    for i in range(k_slots):
        u = np.int64((w >> _U(lb + i * (lb + 2))) & smask)
        if u % 3 != 0 and start + u // 3 >= cols:
            return ROW_NONZERO_PAD
    if stopped:
        return ROW_EXTRA_CODES
    return ROW_SHORT if pos < cols else ROW_OK


@nb.njit(**_SEQ)
def _row_matvec(words, k0, n, cols, lb, k_slots, table):
    """Phase 2 for one input vector; table float32 [(cols + 2^LB) * 3 * 2] holds, for
    position p and class c at 2 * (3p + c), the input's share of the sum over all
    nonzeros and of the sum over hi ones. -> (ROW_* status, the two sums)."""
    lmask = (_U(1) << _U(lb)) - _U(1)
    smask = (_U(1) << _U(lb + 2)) - _U(1)
    sw = _U(lb + 2)
    total = np.float32(0.0)
    high = np.float32(0.0)
    pos = 0
    for k in range(k0, k0 + n):
        if pos >= cols:
            return _end_status(words, k0, k, pos, cols, lb, k_slots, True), total, high
        w = words[k]
        s = w >> _U(lb)
        b = 6 * pos
        a0 = b + 2 * np.int64(s & smask)
        a1 = b + 2 * np.int64((s >> sw) & smask)
        a2 = b + 2 * np.int64((s >> (_U(2) * sw)) & smask)
        a3 = b + 2 * np.int64((s >> (_U(3) * sw)) & smask)
        total += (table[a0] + table[a1]) + (table[a2] + table[a3])
        high += (table[a0 + 1] + table[a1 + 1]) + (table[a2 + 1] + table[a3 + 1])
        for i in range(FIXED_SLOTS, k_slots):
            a = b + 2 * np.int64((s >> _U(i * (lb + 2))) & smask)
            total += table[a]
            high += table[a + 1]
        pos += np.int64(w & lmask)
    return _end_status(words, k0, k0 + n, pos, cols, lb, k_slots, False), total, high


@nb.njit(**_SEQ)
def _row_values(words, k0, n, cols, lb, k_slots, lo, hi, row):
    """Phase 2 for a batch: the row's values written into `row` (zeroed, float32
    [cols + 2^LB + 1]; a class-0 slot writes its last element, so no branch depends on
    how many nonzeros an entry has), for dense dot products with each input row: one
    vectorised pass each, where adding a batch run per nonzero was 3-4x slower. -> status."""
    lmask = (_U(1) << _U(lb)) - _U(1)
    smask = (_U(1) << _U(lb + 2)) - _U(1)
    spare = row.shape[0] - 1
    pos = 0
    for k in range(k0, k0 + n):
        if pos >= cols:
            return _end_status(words, k0, k, pos, cols, lb, k_slots, True)
        w = words[k]
        s = w >> _U(lb)
        for i in range(max(FIXED_SLOTS, k_slots)):
            u = np.int64(s & smask)
            s >>= _U(lb + 2)
            off = u // 3
            c = u - 3 * off
            row[pos + off if c else spare] = hi if c == 2 else lo
        pos += np.int64(w & lmask)
    return _end_status(words, k0, k0 + n, pos, cols, lb, k_slots, False)


@nb.njit(nogil=True, cache=True, fastmath=_REASSOC)
def _dot(a, b):
    """sum of a * b over 1-D slices, vectorised (reassociated: within fp32 rounding)."""
    acc = np.float32(0.0)
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc


@nb.njit(**_SEQ)
def _ternary_blocks(b0, b1, codes, offsets, cols, nxt, slots, lb, k_slots, lo, hi, x, table,
                    y, status):
    """Both phases for blocks b0..b1 of LOCKSTEP_ROWS rows, with one set of buffers."""
    rows = offsets.shape[0] - 1
    batch = y.shape[0]
    longest = 0
    for blk in range(b0, b1):
        r0 = blk * LOCKSTEP_ROWS
        longest = max(longest, offsets[min(rows, r0 + LOCKSTEP_ROWS)] - offsets[r0])
    words = np.empty(longest, np.uint64)
    state = np.empty(LOCKSTEP_ROWS, np.int64)
    start = np.empty(LOCKSTEP_ROWS, np.int64)
    count = np.empty(LOCKSTEP_ROWS, np.int64)
    row = np.empty(cols + (1 << lb) + 1, np.float32)
    for blk in range(b0, b1):
        r0 = blk * LOCKSTEP_ROWS
        r1 = min(rows, r0 + LOCKSTEP_ROWS)
        base = offsets[r0]
        _gather_words(codes, offsets, r0, r1, nxt, slots, words, state, start, count)
        for r in range(r0, r1):
            k0 = offsets[r] - base
            n = offsets[r + 1] - offsets[r]
            if batch == 1:
                status[r], t, h = _row_matvec(words, k0, n, cols, lb, k_slots, table)
                y[0, r] = lo[r] * (t - h) + hi[r] * h
                continue
            row[:] = 0
            status[r] = _row_values(words, k0, n, cols, lb, k_slots, lo[r], hi[r], row)
            for j in range(batch):
                y[j, r] = _dot(row[:cols], x[j])


@nb.njit(**_PAR)
def ternary_matmul(codes, offsets, cols, nxt, slots, lb, k_slots, lo, hi, x, table, y,
                   status, chunks):
    """Y = X W^T for a §5.2 stream, y float32 [batch, rows]: with one input vector from
    `table` (see _row_matvec), else from x float32 [batch, cols] (see _row_values). The blocks of LOCKSTEP_ROWS rows are split into `chunks`
    runs of consecutive blocks, run in parallel (1: on the calling thread)."""
    blocks = (offsets.shape[0] + LOCKSTEP_ROWS - 2) // LOCKSTEP_ROWS
    for c in nb.prange(chunks):
        _ternary_blocks(c * blocks // chunks, (c + 1) * blocks // chunks, codes, offsets, cols,
                        nxt, slots, lb, k_slots, lo, hi, x, table, y, status)


@nb.njit(**_SEQ)
def ternary_matmul_serial(codes, offsets, cols, nxt, slots, lb, k_slots, lo, hi, x, table, y,
                          status):
    """ternary_matmul on the calling thread: for products too small to be worth waking
    the thread pool."""
    _ternary_blocks(0, (offsets.shape[0] + LOCKSTEP_ROWS - 2) // LOCKSTEP_ROWS, codes, offsets,
                    cols, nxt, slots, lb, k_slots, lo, hi, x, table, y, status)


def matvec_table(x: np.ndarray, cols: int, lb: int) -> np.ndarray:
    """_row_matvec's table for input vector x: rows (0, 0), (x, 0), (x, x) per position,
    zero past cols."""
    t = np.zeros((cols + (1 << lb), 3, 2), np.float32)
    t[:cols, 1, 0] = x
    t[:cols, 2, :] = x[:, None]
    return t.reshape(-1)


@nb.njit(nogil=True, cache=True, fastmath=_REASSOC)
def _level_dot(q, xs, shift, mask, zero):
    """sum over the bytes of (level at `shift` of q[i] - zero) * xs[i]: one contiguous
    pass that LLVM vectorises (given 1-D slices and a loop from 0; with offsets into the
    2-D arrays it did not, 6x slower). Short groups: _byte_dot's longer loop body costs
    more than it saves below a few hundred bytes (2.8x slower at 32)."""
    acc = np.float32(0.0)
    for i in range(q.shape[0]):
        acc += (np.float32((q[i] >> shift) & mask) - zero) * xs[i]
    return acc


@nb.njit(nogil=True, cache=True, fastmath=_REASSOC)
def _byte_dot(q, x0, x1, x2, x3, bits, zero):
    """sum over the bytes q[i] of (level s - zero) * xs[i] for each of its levels s (4 at 2
    bits, x0..x3; 2 at 4 bits, x0, x1) in one pass, one add into the running sum a byte
    rather than a level: 13% faster than _level_dot over a whole row."""
    acc = np.float32(0.0)
    if bits == 2:
        for i in range(q.shape[0]):
            b = q[i]
            acc += (((np.float32(b & 3) - zero) * x0[i] + (np.float32((b >> 2) & 3) - zero) * x1[i])
                    + ((np.float32((b >> 4) & 3) - zero) * x2[i]
                       + (np.float32(b >> 6) - zero) * x3[i]))
    else:
        for i in range(q.shape[0]):
            b = q[i]
            acc += (np.float32(b & 15) - zero) * x0[i] + (np.float32(b >> 4) - zero) * x1[i]
    return acc


@nb.njit(nogil=True, parallel=True, cache=True, fastmath=_REASSOC)
def kbit_matvec(packed, bits, cols, group_size, scales, zeros, xq, y, bad):
    """y = W x for §12 rows of `bits` in (2, 4), a group a whole number of bytes: per
    group, scale * sum of (level - zero) * x, against xq[s, i] = x[per * i + s] (per =
    8 // bits levels a byte), so that level s of every byte meets a contiguous run of
    inputs and the loop vectorises; reassociating the sum changes it only within fp32
    rounding."""
    rows = packed.shape[0]
    per = 8 // bits
    mask = (1 << bits) - 1
    full = cols // per                   # bytes whose levels are all inside the row
    gbytes = group_size // per
    groups = scales.shape[1]
    for r in nb.prange(rows):
        out = np.float32(0.0)
        for g in range(groups):
            i0 = g * gbytes
            i1 = min(full, i0 + gbytes)
            z = np.float32(zeros[r, g])
            if gbytes >= LONG_GROUP:
                acc = _byte_dot(packed[r, i0:i1], xq[0, i0:i1], xq[1, i0:i1],
                                xq[min(2, per - 1), i0:i1], xq[per - 1, i0:i1], bits, z)
            else:
                acc = np.float32(0.0)
                for s in range(per):
                    acc += _level_dot(packed[r, i0:i1], xq[s, i0:i1], bits * s, mask, z)
            if g == groups - 1 and full * per < cols:     # the row's last, partial byte
                last = packed[r, full]
                for s in range(cols - full * per):
                    acc += (np.float32((last >> (bits * s)) & mask) - z) * xq[s, full]
                if last >> (bits * (cols - full * per)):
                    bad[r] = 1
            out += scales[r, g] * acc
        y[0, r] = out


def kbit_matvec_input(x: np.ndarray, bits: int) -> np.ndarray:
    """kbit_matvec's xq for input vector x: [per, ceil(cols / per)], zero past cols."""
    return kbit_matmul_input(x[:, None], bits).reshape(8 // bits, -1)


@nb.njit(nogil=True, cache=True, fastmath=_REASSOC)
def _level_values(q, out, shift, mask, zero, scale):
    for i in range(q.shape[0]):
        out[i] = (np.float32((q[i] >> shift) & mask) - zero) * scale


@nb.njit(nogil=True, cache=True, fastmath=_REASSOC)
def _kbit_rows(r0, r1, packed, bits, cols, group_size, scales, zeros, xq, y, bad):
    """Rows r0..r1 of kbit_matmul, with one row buffer."""
    per = 8 // bits
    mask = (1 << bits) - 1
    n = xq.shape[1] // per               # bytes a row, the partial last one included
    full = cols // per
    gbytes = group_size // per
    groups = scales.shape[1]
    row = np.zeros(per * n, np.float32)  # level s of byte i at s * n + i
    for r in range(r0, r1):
        for g in range(groups):
            i0 = g * gbytes
            i1 = min(full, i0 + gbytes)
            z = np.float32(zeros[r, g])
            sc = scales[r, g]
            for s in range(per):
                _level_values(packed[r, i0:i1], row[s * n + i0:s * n + i1], bits * s, mask,
                              z, sc)
        if full < n:                     # the row's last, partial byte: the last group's
            last = packed[r, full]
            z = np.float32(zeros[r, groups - 1])
            for s in range(cols - full * per):
                row[s * n + full] = (np.float32((last >> (bits * s)) & mask) - z) * \
                    scales[r, groups - 1]
            if last >> (bits * (cols - full * per)):
                bad[r] = 1
        for j in range(xq.shape[0]):
            y[j, r] = _dot(row, xq[j])


@nb.njit(nogil=True, parallel=True, cache=True)
def kbit_matmul(packed, bits, cols, group_size, scales, zeros, xq, y, bad, chunks):
    """Y = X W^T for §12 rows of `bits` in (2, 4), a group a whole number of bytes, for a
    batch: each row dequantized into a buffer in the order kbit_matvec reads levels in,
    then one vectorised dot product with each row of X permuted the same way (xq float32
    [batch, per * bytes a row], see kbit_matmul_input). Rows in `chunks` parallel runs."""
    rows = packed.shape[0]
    for c in nb.prange(chunks):
        _kbit_rows(c * rows // chunks, (c + 1) * rows // chunks, packed, bits, cols,
                   group_size, scales, zeros, xq, y, bad)


def kbit_matmul_input(xt: np.ndarray, bits: int) -> np.ndarray:
    """kbit_matmul's xq from X transposed [cols, batch]: column per * i + s of X at
    s * n + i (n = bytes a row), zero past cols."""
    per = 8 // bits
    cols, batch = xt.shape
    n = -(-cols // per)
    xp = np.zeros((n * per, batch), np.float32)
    xp[:cols] = xt
    return np.ascontiguousarray(xp.reshape(n, per, batch).transpose(2, 1, 0).reshape(batch, per * n))
