"""Round-to-nearest ternary quantization on QMoE's grid (spec §6), fused for the packer.

Per row: lo = bf16(min(row min, 0)), hi = bf16(max(row max, 0)), rounded to nearest even;
a weight w becomes lo (symbol 1) if w < lo/2, hi (symbol 2) if w > hi/2, else 0 (symbol
0), compared in float32. The stored scales are the very values the thresholds used, so
what decodes is exactly what was chosen.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from ..errors import NonFiniteError
from ..format.bf16 import bf16_bits, bf16_value


@nb.njit(nogil=True, inline="always")
def _load(xf, xb, use_bits, r, i):
    return bf16_value(xb[r, i]) if use_bits else xf[r, i]


@nb.njit(nogil=True, parallel=True, cache=True)
def _quantize_rows(xf, xb, use_bits, sym, scales, counts, bad):
    """Rows of float32 (xf), or of bfloat16 bits (xb, use_bits): reading bf16 directly
    spares the packer a float32 copy of every tensor."""
    rows, cols = sym.shape
    for r in nb.prange(rows):
        mn = np.float32(0.0)
        mx = np.float32(0.0)
        finite = True
        for i in range(cols):
            v = _load(xf, xb, use_bits, r, i)
            if not np.isfinite(v):
                finite = False
            if v < mn:
                mn = v
            if v > mx:
                mx = v
        if not finite:
            bad[r] = 1
            continue
        blo = bf16_bits(mn)
        bhi = bf16_bits(mx)
        if (blo & 0x7FFF) == 0x7F80 or (bhi & 0x7FFF) == 0x7F80:
            bad[r] = 2          # finite, but its scale would round to infinity in bf16
            continue
        scales[r, 0] = blo
        scales[r, 1] = bhi
        tlo = bf16_value(blo) / np.float32(2.0)
        thi = bf16_value(bhi) / np.float32(2.0)
        n1 = 0
        n2 = 0
        out = sym[r]
        for i in range(cols):
            v = _load(xf, xb, use_bits, r, i)
            if v < tlo:
                out[i] = 1
                n1 += 1
            elif v > thi:
                out[i] = 2
                n2 += 1
            else:
                out[i] = 0
        counts[r, 0] = cols - n1 - n2
        counts[r, 1] = n1
        counts[r, 2] = n2


def quantize_rtn(x: np.ndarray, bf16_bits_input: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 [rows, cols] (or, with bf16_bits_input, uint16 bfloat16 bits) ->
    (symbols int8 [rows, cols], scales uint16 [rows, 2] as bf16 bits of (lo, hi),
    counts int64 [3] of symbols 0, 1, 2)."""
    if bf16_bits_input:
        xb = np.ascontiguousarray(x, dtype=np.uint16)
        xf = np.zeros((1, 1), np.float32)
    else:
        xf = np.ascontiguousarray(x, dtype=np.float32)
        xb = np.zeros((1, 1), np.uint16)
    rows, cols = x.shape
    sym = np.empty((rows, cols), np.int8)
    scales = np.zeros((rows, 2), np.uint16)
    counts = np.zeros((rows, 3), np.int64)
    bad = np.zeros(rows, np.uint8)
    if rows:
        _quantize_rows(xf, xb, bf16_bits_input, sym, scales, counts, bad)
    if bad.any():
        r = int(np.argmax(bad != 0))
        raise NonFiniteError(r, beyond_bf16=bool(bad[r] == 2))
    return sym, scales, counts.sum(axis=0)
