"""Plain-numpy decoders written from the spec (§5.1, §5.2 through the §5.6 tables, §12's
bit order), the dictionaries the backend suite runs on, and the fp32 bound a decode-matmul
is held to: what `backends.DecodeBackendTests` compares every backend against."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..backends.base import ROW_EXTRA_CODES, ROW_NONZERO_PAD, ROW_OK, ROW_SHORT
from ..codecs.uint_packed import row_bytes
from ..dictionaries import build_golomb, build_qmoe2023
from ..dictionaries.tables import Dictionary
from ..format.constants import CODEWORDS


def reference_row(codes, cols: int, d: Dictionary, out: np.ndarray) -> int:
    """Spec §5.2 for one row, reading the five stored tables: writes the row's nonzero
    symbols into `out` (zeros, [cols]) and returns its ROW_* status."""
    state = pos = 0
    for c in codes:
        if pos >= cols:
            return ROW_EXTRA_CODES
        for i in range(int(d.nnz[state, c])):
            p = pos + int(d.nz_pos[state, c, i])
            if p >= cols:
                return ROW_NONZERO_PAD
            out[p] = d.nz_sym[state, c, i]
        pos += int(d.length[state, c])
        state = int(d.next_state[state, c])
    return ROW_SHORT if pos < cols else ROW_OK


def reference_symbols(codes, row_codes, cols: int, d: Dictionary):
    """-> (int8 [rows, cols] symbols, uint8 [rows] ROW_* status). A failed row holds what
    was set before its error; backends need not agree on it."""
    rows = len(row_codes)
    out = np.zeros((rows, cols), np.int8)
    status = np.zeros(rows, np.uint8)
    o = 0
    for r, n in enumerate(int(n) for n in row_codes):
        status[r] = reference_row(codes[o:o + n].tolist(), cols, d, out[r])
        o += n
    return out, status


def reference_values(symbols, lo, hi) -> np.ndarray:
    """Spec §5.1: symbol 0, 1, 2 -> +0.0, lo[row], hi[row], as binary32."""
    return np.where(symbols == 1, lo[:, None],
                    np.where(symbols == 2, hi[:, None], np.float32(0))).astype(np.float32)


def reference_pack(levels: np.ndarray, bits: int) -> np.ndarray:
    """Spec §12: level i is bits i*b .. i*b + b - 1 of the row's bit string, least
    significant first; bit j is bit j mod 8 of byte j div 8; padding bits are 0."""
    rows, cols = levels.shape
    b = ((levels[:, :, None].astype(np.uint8) >> np.arange(bits, dtype=np.uint8)) & 1)
    b = b.reshape(rows, cols * bits)
    b = np.pad(b, ((0, 0), (0, 8 * row_bytes(cols, bits) - cols * bits)))
    return np.packbits(b, axis=1, bitorder="little")


def reference_unpack(packed: np.ndarray, bits: int, cols: int):
    """-> (uint8 [rows, cols] levels, bool [rows]: the row's padding bits are not zero)."""
    rows = packed.shape[0]
    b = np.unpackbits(packed, axis=1, bitorder="little")
    lv = b[:, :cols * bits].reshape(rows, cols, bits)
    levels = (lv << np.arange(bits, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)
    return levels, b[:, cols * bits:].any(axis=1)


# ------------------------------------------------------------------ dictionaries


@lru_cache(maxsize=1)
def synthetic_dictionary() -> Dictionary:
    """Valid tables (§5.6) that no construction of ours produces: 5 states, K = 32
    nonzeros (entries from 0 to 32 of them), lengths up to 65535. Every dictionary we
    build packs a codeword's entry into one 64-bit word; these need up to 11, so a
    backend cannot pass by handling only the tables it has seen."""
    rng = np.random.default_rng(20240613)
    s, k = 5, 32
    shape = (s, CODEWORDS)
    nnz = rng.integers(0, k + 1, shape)
    pos = np.cumsum(rng.integers(1, 5, shape + (k,), dtype=np.uint16), axis=2, dtype=np.uint16) - 1
    used = np.arange(k) < nnz[..., None]
    last = np.take_along_axis(pos, np.maximum(nnz - 1, 0)[..., None], axis=2)[..., 0]
    length = np.where(nnz > 0, last.astype(np.int64) + 1, 1) + rng.integers(0, 16, shape)
    length[rng.random(shape) < 0.002] = 65535
    d = Dictionary(kind="synthetic", params={"seed": 20240613},
                   length=length.astype(np.uint16),
                   next_state=rng.integers(0, s, shape).astype(np.uint8),
                   nnz=nnz.astype(np.uint8),
                   nz_pos=np.where(used, pos, 0).astype(np.uint16),
                   nz_sym=np.where(used, rng.integers(1, 3, shape + (k,), dtype=np.uint8), 0)
                   .astype(np.uint8))
    d.validate()
    return d


# build_golomb takes ~0.3-0.5 s a dictionary (lru_cached): a few P(0) across the ladder,
# the densest with K = 10 nonzeros an entry, the sparsest with entries of hundreds of zeros.
GOLOMB_P0 = (0.3208, 0.8808, 0.9707)
BUILT = ("qmoe-2023",) + tuple(f"golomb-{p}" for p in GOLOMB_P0)
ALL = BUILT + ("synthetic",)


def dictionary(kind: str) -> Dictionary:
    if kind == "qmoe-2023":
        return build_qmoe2023()
    if kind == "synthetic":
        return synthetic_dictionary()
    return build_golomb(float(kind.removeprefix("golomb-")))



def assert_matmul_close(y: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    """y == x @ w.T within fp32 accumulation: |error| <= (cols + 2) * 2^-23 * (|x| @ |w|.T),
    the bound for summing cols float32 terms and scaling by a per-row factor."""
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    bound = (w.shape[1] + 2) * 2.0 ** -23 * (np.abs(x).astype(np.float64) @ np.abs(w).T)
    assert np.all(np.abs(y - ref) <= bound), float(np.max(np.abs(y - ref) - bound))
