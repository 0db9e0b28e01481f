"""Codec `qmoe.uint-packed` (spec §12, format 1.1): b-bit levels (b = 2, 3, 4), packed
little-endian bit by bit, each row starting on a byte; per group of `group_size` columns a
bf16 scale and a uint8 zero point; value = scale * (level - zero).
"""
from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np

from .. import backends
from ..errors import FormatError
from ..format import constants as C
from .base import ArraySpec, RuntimeWeight, TensorArrays
from .kbit_grid import KbitGrid


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


def pack_levels(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 levels [rows, cols] (< 2**bits) -> packed uint8 [rows, row_bytes]."""
    if bits not in C.KBIT_BITS:
        raise ValueError(f"bits must be one of {C.KBIT_BITS}")
    q = np.ascontiguousarray(q, dtype=np.uint8)
    if q.size and int(q.max()) >= (1 << bits):
        raise ValueError(f"levels must be < {1 << bits}")
    out = np.zeros((q.shape[0], row_bytes(q.shape[1], bits)), np.uint8)
    if q.size:
        _pack(q, bits, out)
    return out


def check_padding(packed: np.ndarray, bits: int, cols: int, where: str) -> None:
    """The bits after each row's last level are 0 (§12), from the rows' last bytes alone."""
    used = cols * bits % 8
    if not used or not packed.size:
        return
    bad = (np.asarray(packed[:, -1]) >> used) != 0
    if bad.any():
        raise FormatError(where, f"row {int(np.argmax(bad))}: nonzero padding bits in q")


def unpack_levels(packed: np.ndarray, bits: int, cols: int, where: str = "tensor",
                  backend=None) -> np.ndarray:
    rows = packed.shape[0]
    if packed.shape != (rows, row_bytes(cols, bits)):
        raise FormatError(where, f"q has shape {list(packed.shape)}, expected "
                                 f"[{rows}, {row_bytes(cols, bits)}] for {cols} columns of {bits} bits")
    out = np.zeros((rows, cols), np.uint8)
    bad = np.zeros(rows, np.uint8)
    if rows and cols:
        backends.get(backend).unpack_levels(packed, bits, cols, out, bad)
    if bad.any():
        raise FormatError(where, f"row {int(np.argmax(bad))}: nonzero padding bits in q")
    return out


@dataclass(eq=False)
class PackedWeight(RuntimeWeight):
    """A uint-packed weight: packed rows, float32 scales and uint8 zero points per group."""
    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    bits: int
    group_size: int
    moved = ("q", "scales", "zeros")

    def matmul(self, x: np.ndarray, backend=None) -> np.ndarray:
        """Y = X W^T from the packed levels, unpacked on the fly."""
        self.check_input(x)
        rows, cols = self.shape
        y = np.zeros((x.shape[0], rows), np.float32)
        bad = np.zeros(rows, np.uint8)
        if rows and cols and x.shape[0]:
            backends.get(backend).kbit_matmul(self.q, self.bits, cols, self.group_size,
                                              self.scales, self.zeros,
                                              np.ascontiguousarray(x.T, np.float32), y, bad)
        if bad.any():
            raise FormatError(self.where, f"row {int(np.argmax(bad))}: nonzero padding bits in q")
        return y


class UintPacked(KbitGrid):
    id = C.CODEC_UINT
    since = "1.1"
    multiplies = True
    arrays = ("q", "scales", "zeros")

    def array_specs(self, t: TensorArrays) -> dict[str, ArraySpec]:
        rows, cols = t.rows_cols
        bits, _ = self.params(t)
        return {"q": ArraySpec(("uint8",), (rows, row_bytes(cols, bits))), **self.grid_specs(t)}

    def levels(self, t: TensorArrays, zeros: np.ndarray, check_crc: bool, backend,
               rows: tuple[int, int]) -> np.ndarray:
        bits, _ = self.params(t)
        q = t.array("q", check_crc)[rows[0]:rows[1]]
        return unpack_levels(q, bits, t.rows_cols[1], t.where, backend)

    def runtime(self, t: TensorArrays, check_crc: bool = True) -> PackedWeight:
        """The grid validated as decode() validates it; the padding bits are checked by
        the kernel, on every product."""
        bits, _ = self.params(t)
        return PackedWeight(t.where, t.rows_cols, np.ascontiguousarray(t.array("q", check_crc)),
                            np.ascontiguousarray(self.float_scales(t, check_crc)),
                            np.ascontiguousarray(self.zero_points(t, check_crc)), bits,
                            t.record["group_size"])

    def check(self, t: TensorArrays, deep: bool) -> None:
        super().check(t, deep)
        if not deep:          # a deep check unpacks every row, padding included
            bits, _ = self.params(t)
            check_padding(t.array("q", check_crc=False), bits, t.rows_cols[1], t.where)

    def encode(self, levels: np.ndarray, bits: int, scales_bits: np.ndarray,
               zeros: np.ndarray) -> tuple[dict, dict]:
        """uint8 levels [rows, cols] -> (record members, arrays)."""
        return {"codec": self.id}, {"q": (pack_levels(levels, bits), None),
                                    **self.grid_arrays(scales_bits, zeros)}
