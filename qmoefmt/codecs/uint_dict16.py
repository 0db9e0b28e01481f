"""Codec `qmoe.uint-dict16` (spec §13): b-bit levels as a dictionary-coded ternary
stream plus escapes.

Low-bit experts put most levels on the zero point and nearly all the rest one step away
(2-bit Switch-like experts: ~70% on it, ~29% at +-1, <1% further), so the sign of
`level - zero` is a ternary stream with the statistics §5's dictionaries are built for,
and the few levels two or more steps out are listed per row. This module maps levels to
that pair and back; the ternary stream itself is §5's (`dictionaries.stream`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..dictionaries.stream import (decode_symbols, encode, matmul_rows, row_offsets,
                                  symbols_rows)
from ..dictionaries.tables import Dictionary
from ..errors import FormatError
from ..format import constants as C
from ..format.constants import index_dtype
from .base import ArraySpec, RuntimeWeight, TensorArrays
from .coded_stream import DictionaryCoded
from .kbit_grid import KbitGrid, dequantize


def _zero_points(zeros: np.ndarray, cols: int, group_size: int) -> np.ndarray:
    zeros = np.asarray(zeros)
    if zeros.shape[0] * cols == 0:      # no rows: no per-column index for a huge width
        return np.zeros((zeros.shape[0], cols), np.int16)
    return zeros[:, np.arange(cols) // group_size].astype(np.int16)


def steps(levels: np.ndarray, zeros: np.ndarray, group_size: int) -> np.ndarray:
    """int16 `level - zero point` of every level."""
    levels = np.asarray(levels, np.uint8)
    return levels.astype(np.int16) - _zero_points(zeros, levels.shape[1], group_size)


def split(levels: np.ndarray, zeros: np.ndarray, group_size: int, d: np.ndarray | None = None):
    """levels uint8 [rows, cols] -> (ternary int8 [rows, cols], row_escapes, escape_cols,
    escape_levels): symbol 1 where level < zero, 2 where level > zero, and every level two
    or more steps from its zero point listed, row by row, columns increasing. `d` is
    `steps(levels, zeros, group_size)` if the caller has it already."""
    levels = np.asarray(levels, np.uint8)
    rows, cols = levels.shape
    d = steps(levels, zeros, group_size) if d is None else d
    ternary = ((d < 0) * 1 + (d > 0) * 2).astype(np.int8)
    far = np.abs(d) >= 2
    dt = index_dtype(cols)
    r, c = np.nonzero(far)
    return (ternary, far.sum(axis=1).astype(dt), c.astype(dt), levels[r, c].astype(np.uint8))


def merge(ternary: np.ndarray, zeros: np.ndarray, group_size: int, bits: int,
          row_escapes: np.ndarray, escape_cols: np.ndarray, escape_levels: np.ndarray,
          where: str = "tensor", first_row: int = 0) -> np.ndarray:
    """The levels (uint8 [rows, cols]) back, after checking every escape and level against
    spec §13; any inconsistency is a FormatError naming `where` and the row (counted from
    `first_row`, for a slice of the tensor), never a wrong level."""
    rows, cols = ternary.shape
    counts, cols_e, lev_e, row_of = _escape_lists(rows, cols, bits, row_escapes, escape_cols,
                                                  escape_levels, where, first_row)
    maxq = (1 << bits) - 1
    n = cols_e.shape[0]
    zp = _zero_points(zeros, cols, group_size)
    t = np.asarray(ternary)
    levels = zp + (t == 2).astype(np.int16) - (t == 1).astype(np.int16)
    if n:
        d = lev_e - zp[row_of, cols_e]
        sym = t[row_of, cols_e]
        bad = (np.abs(d) < 2) | ((d > 0) != (sym == 2)) | (sym == 0)
        if bad.any():
            k = int(np.argmax(bad))
            raise FormatError(where, f"row {first_row + int(row_of[k])}, column {int(cols_e[k])}: escape level "
                                     f"{int(lev_e[k])} with zero point {int(zp[row_of[k], cols_e[k]])} "
                                     f"and ternary symbol {int(sym[k])} (must be >= 2 steps away, "
                                     "on the symbol's side)")
        levels[row_of, cols_e] = lev_e
    out = (levels < 0) | (levels > maxq)
    if out.any():
        r, c = (int(i[0]) for i in np.nonzero(out))
        raise FormatError(where, f"row {first_row + r}, column {c}: ternary symbol {int(t[r, c])} with zero "
                                 f"point {int(zp[r, c])} gives a level outside 0..{maxq}")
    return levels.astype(np.uint8)


def check_escapes(zeros: np.ndarray, group_size: int, bits: int, cols: int, row_escapes,
                  escape_cols, escape_levels, where: str) -> None:
    """What spec §13 requires of the escapes without the sign stream (verify, shallow):
    the lists consistent, and every escape level >= 2 steps from its zero point."""
    rows = np.asarray(zeros).shape[0]
    _, cols_e, lev_e, row_of = _escape_lists(rows, cols, bits, row_escapes, escape_cols,
                                             escape_levels, where, 0)
    if cols_e.shape[0]:
        z = np.asarray(zeros)[row_of, cols_e // group_size].astype(np.int16)
        bad = np.abs(lev_e - z) < 2
        if bad.any():
            k = int(np.argmax(bad))
            raise FormatError(where, f"row {int(row_of[k])}, column {int(cols_e[k])}: escape level "
                                     f"{int(lev_e[k])} with zero point {int(z[k])} (must be >= 2 "
                                     "steps away)")


def _escape_lists(rows: int, cols: int, bits: int, row_escapes, escape_cols, escape_levels,
                  where: str, first_row: int):
    """(counts, columns, levels, row of each escape), checked against each other, the row
    width and 2^bits."""
    if bits not in C.KBIT_BITS:
        raise FormatError(where, f"bits {bits!r} not one of {C.KBIT_BITS}")
    maxq = (1 << bits) - 1
    counts = np.asarray(row_escapes, np.int64)
    cols_e = np.asarray(escape_cols, np.int64)
    lev_e = np.asarray(escape_levels, np.int16)
    n = cols_e.shape[0]
    if counts.shape != (rows,) or lev_e.shape != (n,):
        raise FormatError(where, f"row_escapes {list(counts.shape)}, escape_cols [{n}] and "
                                 f"escape_levels {list(lev_e.shape)} do not fit {rows} rows")
    if rows and int(counts.max(initial=0)) > cols:
        r = int(np.argmax(counts > cols))
        raise FormatError(where, f"row {first_row + r}: {int(counts[r])} escapes in a row of {cols} columns")
    if int(counts.sum()) != n:
        raise FormatError(where, f"row_escapes sum to {int(counts.sum())} but escape_cols holds {n}")
    row_of = np.repeat(np.arange(rows), counts)
    if n:
        if int(cols_e.max()) >= cols:
            k = int(np.argmax(cols_e >= cols))
            raise FormatError(where, f"row {first_row + int(row_of[k])}: escape column {int(cols_e[k])} >= {cols}")
        same_row = row_of[1:] == row_of[:-1]
        bad = same_row & (cols_e[1:] <= cols_e[:-1])
        if bad.any():
            k = int(np.argmax(bad)) + 1
            raise FormatError(where, f"row {first_row + int(row_of[k])}: escape columns not strictly increasing")
        if int(lev_e.max()) > maxq:
            k = int(np.argmax(lev_e > maxq))
            raise FormatError(where, f"row {first_row + int(row_of[k])}: escape level {int(lev_e[k])} >= 2**{bits}")
    return counts, cols_e, lev_e, row_of


def coded_bytes(n_codes: int, rows: int, cols: int, n_escapes: int) -> int:
    """Bytes of the arrays that replace `q` (codes, row_codes, row_escapes, escape_cols,
    escape_levels): what pack weighs against uint-packed's `q`."""
    it = index_dtype(cols).itemsize
    return 2 * n_codes + 2 * it * rows + (it + 1) * n_escapes


@dataclass(eq=False)
class DictLevelsWeight(RuntimeWeight):
    """A uint-dict16 weight. With one group a row (the default grid) W = s * t + E: t the
    ternary stream's -1/0/+1, s the row's scale, E the escapes' corrections, so the
    product is the ternary kernel's with (lo, hi) = (-s, s) plus a short correction list.
    That needs every escape to agree with the stream (§13), which only decoding shows: the
    first product decodes the weight `BLOCK` rows at a time (as grouped grids always do)
    and checks it; later ones are fused."""
    codes: np.ndarray
    offsets: np.ndarray
    counts: np.ndarray
    ends: np.ndarray
    escape_cols: np.ndarray
    escape_levels: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    dictionary: Dictionary
    bits: int
    group_size: int
    checked: bool = False
    # derived from the moved arrays: not copied with them, rebuilt on the copy's first use
    _corrections: tuple | None = field(default=None, init=False, repr=False)
    moved = ("codes", "offsets", "counts", "ends", "escape_cols", "escape_levels", "scales",
             "zeros")
    BLOCK = 256

    def matmul(self, x: np.ndarray, backend=None) -> np.ndarray:
        self.check_input(x)
        x = np.asarray(x, np.float32)
        if self.checked and self.group_size >= self.shape[1]:
            return self._fused(x, backend)
        y = self._by_blocks(x, backend)
        self.checked = True
        return y

    def _fused(self, x: np.ndarray, backend) -> np.ndarray:
        rows, cols = self.shape
        if self._corrections is None:
            self._corrections = self._escape_corrections()
        s, er, ec, ew = self._corrections
        y = matmul_rows(self.codes, self.offsets, cols, self.dictionary, -s, s, x, self.where,
                        backend)
        for j in range(x.shape[0] if ec.size else 0):
            y[j] += np.bincount(er, weights=x[j, ec] * ew, minlength=rows).astype(np.float32)
        return y

    def _escape_corrections(self):
        """(row scales, and per escape its row, column and weight s * (step - sign)): the
        stream already adds s * sign(step) at an escape's column."""
        rows, cols = self.shape
        s = (np.ascontiguousarray(self.scales[:, 0]) if rows and cols
             else np.zeros(rows, np.float32))
        er = np.repeat(np.arange(rows), self.counts)
        if not er.size:
            return s, er, er, np.zeros(0)
        step = self.escape_levels.astype(np.float64) - self.zeros[er, 0].astype(np.float64)
        return s, er, self.escape_cols.astype(np.int64), s[er] * (step - np.sign(step))

    def _by_blocks(self, x: np.ndarray, backend) -> np.ndarray:
        rows, cols = self.shape
        y = np.zeros((x.shape[0], rows), np.float32)
        for a in range(0, rows, self.BLOCK):
            b = min(rows, a + self.BLOCK)
            ternary = symbols_rows(self.codes, self.offsets[a:b + 1], cols, self.dictionary,
                                   self.where, backend, first=a)
            e0, e1 = int(self.ends[a]), int(self.ends[b])
            levels = merge(ternary, self.zeros[a:b], self.group_size, self.bits,
                           self.counts[a:b], self.escape_cols[e0:e1], self.escape_levels[e0:e1],
                           self.where, first_row=a)
            w = dequantize(levels, self.scales[a:b], self.zeros[a:b], self.group_size)
            y[:, a:b] = x @ w.T
        return y


class UintDict16(KbitGrid, DictionaryCoded):
    id = C.CODEC_UINT_DICT
    since = "1.2"
    multiplies = True
    arrays = ("codes", "row_codes", "row_escapes", "escape_cols", "escape_levels",
              "scales", "zeros")
    members = KbitGrid.members + ("dictionary", "symbol_counts")
    check = DictionaryCoded.check     # the stream's checks, with the grid's as its params

    def array_specs(self, t: TensorArrays) -> dict[str, ArraySpec]:
        rows, cols = t.rows_cols
        idx = str(index_dtype(cols).newbyteorder("="))
        return {**self.stream_specs(t), "row_escapes": ArraySpec((idx,), (rows,)),
                "escape_cols": ArraySpec((idx,)), "escape_levels": ArraySpec(("uint8",)),
                **self.grid_specs(t)}

    def levels(self, t: TensorArrays, zeros: np.ndarray, check_crc: bool, backend,
               rows: tuple[int, int]) -> np.ndarray:
        bits, _ = self.params(t)
        a, b = rows
        codes, rc, d = self.coded(t, check_crc)
        ternary = decode_symbols(codes, rc, t.rows_cols[1], d, t.where, backend=backend,
                                 rows=slice(a, b))
        counts, cols_e, levels_e = (t.array(n, check_crc) for n in ("row_escapes", "escape_cols",
                                                                    "escape_levels"))
        ends = np.cumsum(counts, dtype=np.int64)
        if (a, b) != (0, len(counts)):
            if counts.size and int(ends[-1]) != len(cols_e):
                raise FormatError(t.where, f"row_escapes sum to {int(ends[-1])} but escape_cols "
                                           f"holds {len(cols_e)}")
            e0, e1 = (int(ends[i - 1]) if i else 0 for i in (a, b))
            counts, cols_e, levels_e = counts[a:b], cols_e[e0:e1], levels_e[e0:e1]
        return merge(ternary, zeros, t.record["group_size"], bits, counts, cols_e, levels_e,
                     t.where, first_row=a)

    def runtime(self, t: TensorArrays, check_crc: bool = True) -> DictLevelsWeight:
        codes, rc, d = self.coded(t, check_crc)
        rows, cols = t.rows_cols
        bits, _ = self.params(t)
        counts, cols_e, levels_e = (t.array(n, check_crc) for n in ("row_escapes", "escape_cols",
                                                                    "escape_levels"))
        ends = np.zeros(rows + 1, np.int64)
        np.cumsum(counts, dtype=np.int64, out=ends[1:])
        if int(ends[-1]) != len(cols_e):
            raise FormatError(t.where, f"row_escapes sum to {int(ends[-1])} but escape_cols "
                                       f"holds {len(cols_e)}")
        return DictLevelsWeight(t.where, (rows, cols), codes,
                                row_offsets(rc, codes.shape[0], cols, t.where), np.asarray(counts),
                                ends, np.asarray(cols_e), np.asarray(levels_e),
                                np.ascontiguousarray(self.float_scales(t, check_crc)),
                                np.ascontiguousarray(self.zero_points(t, check_crc)), d, bits,
                                t.record["group_size"])

    def check_params(self, t: TensorArrays) -> None:
        self.check_grid(t)
        check_escapes(self.zero_points(t, check_crc=False), t.record["group_size"],
                      self.params(t)[0], t.rows_cols[1],
                      *(t.array(n, check_crc=False) for n in ("row_escapes", "escape_cols",
                                                              "escape_levels")), t.where)

    def ternary_stream(self, t: TensorArrays, symbols: np.ndarray) -> np.ndarray:
        # symbols() checked every escape against the stream; the stream is the signs
        zeros = np.asarray(t.array("zeros", check_crc=False))
        return split(symbols, zeros, t.record["group_size"])[0]

    def encode(self, parts, counts, d, scales_bits: np.ndarray,
               zeros: np.ndarray) -> tuple[dict, dict]:
        """`split()`'s (ternary, row_escapes, escape_cols, escape_levels), the ternary
        symbol counts, a dictionary -> (record members but the dictionary's id, arrays)."""
        ternary, row_escapes, escape_cols, escape_levels = parts
        codes, row_codes = encode(ternary, d)
        return ({"codec": self.id, "symbol_counts": [int(c) for c in counts]},
                {"codes": (codes, None), "row_codes": (row_codes, None),
                 "row_escapes": (row_escapes, None), "escape_cols": (escape_cols, None),
                 "escape_levels": (escape_levels, None), **self.grid_arrays(scales_bits, zeros)})
