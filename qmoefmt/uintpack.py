"""Codec `qmoe.uint-packed` (spec §12, format 1.1): b-bit levels (b = 2, 3, 4), packed
little-endian bit by bit, each row starting on a byte; per group of `group_size` columns a
bf16 scale and a uint8 zero point; value = scale * (level - zero).
"""
from __future__ import annotations

import numba as nb
import numpy as np

from .errors import FormatError

BITS = (2, 3, 4)


def row_bytes(cols: int, bits: int) -> int:
    return (cols * bits + 7) // 8


@nb.njit(nogil=True, parallel=True, cache=True)
def _pack(q, bits, out):
    rows, cols = q.shape
    for r in nb.prange(rows):
        acc = np.uint32(0)
        nacc = 0
        o = 0
        for i in range(cols):
            acc |= np.uint32(q[r, i]) << np.uint32(nacc)
            nacc += bits
            if nacc >= 8:
                out[r, o] = acc & 0xFF
                o += 1
                acc >>= np.uint32(8)
                nacc -= 8
        if nacc > 0:
            out[r, o] = acc & 0xFF


@nb.njit(nogil=True, parallel=True, cache=True)
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


def pack_levels(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 levels [rows, cols] (< 2**bits) -> packed uint8 [rows, row_bytes]."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}")
    q = np.ascontiguousarray(q, dtype=np.uint8)
    if q.size and int(q.max()) >= (1 << bits):
        raise ValueError(f"levels must be < {1 << bits}")
    out = np.zeros((q.shape[0], row_bytes(q.shape[1], bits)), np.uint8)
    if q.size:
        _pack(q, bits, out)
    return out


def unpack_levels(packed: np.ndarray, bits: int, cols: int, where: str = "tensor") -> np.ndarray:
    rows = packed.shape[0]
    if packed.shape != (rows, row_bytes(cols, bits)):
        raise FormatError(where, f"q has shape {list(packed.shape)}, expected "
                                 f"[{rows}, {row_bytes(cols, bits)}] for {cols} columns of {bits} bits")
    out = np.zeros((rows, cols), np.uint8)
    bad = np.zeros(rows, np.uint8)
    if rows and cols:
        _unpack(np.ascontiguousarray(packed), bits, cols, out, bad)
    if bad.any():
        raise FormatError(where, f"row {int(np.argmax(bad))}: nonzero padding bits in q")
    return out


def dequantize(levels: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int) -> np.ndarray:
    """float32 scale[g] * (level - zero[g]) with g = column // group_size."""
    cols = levels.shape[1]
    g = np.arange(cols) // group_size
    return (scales[:, g] * (levels.astype(np.float32) - zeros[:, g].astype(np.float32))).astype(np.float32)
