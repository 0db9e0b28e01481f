"""Codec `qmoe.ternary-dict16` (spec §5, §6): ternary expert weights {lo, 0, hi} per row,
the symbols dictionary-coded, bf16 (lo, hi) per row."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..dictionaries.stream import (decode_symbols, decode_values, encode, matmul_rows,
                                  row_offsets)
from ..dictionaries.tables import Dictionary
from ..errors import FormatError
from ..format import bf16
from ..format import constants as C
from .base import ArraySpec, RuntimeWeight, TensorArrays
from .coded_stream import DictionaryCoded


@dataclass(eq=False)
class TernaryWeight(RuntimeWeight):
    """A ternary-dict16 weight: codewords, checked row offsets, float32 (lo, hi) per row,
    and its dictionary (whose runtime tables are built once per dictionary)."""
    codes: np.ndarray
    offsets: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    dictionary: Dictionary
    moved = ("codes", "offsets", "lo", "hi")

    def matmul(self, x: np.ndarray, backend=None) -> np.ndarray:
        """Per row only two sums, of the inputs under lo symbols and of those under hi."""
        return matmul_rows(self.codes, self.offsets, self.shape[1], self.dictionary, self.lo,
                           self.hi, x, self.where, backend)


class TernaryDict16(DictionaryCoded):
    id = C.CODEC_TERNARY
    since = "1.0"
    multiplies = True
    arrays = ("codes", "row_codes", "scales")
    bfloat16_arrays = ("scales",)
    exact_dtypes = ("bfloat16", "float32", "float64")     # the values are the bf16 scales

    def array_specs(self, t: TensorArrays) -> dict[str, ArraySpec]:
        rows, _ = t.rows_cols
        return {**self.stream_specs(t), "scales": ArraySpec(("uint16",), (rows, 2))}

    def scales(self, t: TensorArrays, check_crc: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) float32 per row, validated: finite, lo <= 0 <= hi."""
        f = bf16.to_float32(t.array("scales", check_crc))
        lo, hi = np.ascontiguousarray(f[:, 0]), np.ascontiguousarray(f[:, 1])
        bad = ~(np.isfinite(lo) & np.isfinite(hi) & (lo <= 0) & (hi >= 0))
        if bad.any():
            raise FormatError(f"{t.where}/scales",
                              f"row {int(np.argmax(bad))}: scales must be finite with lo <= 0 <= hi")
        return lo, hi

    def symbols(self, t: TensorArrays, check_crc: bool = True, backend=None,
                rows: slice | None = None) -> np.ndarray:
        codes, rc, d = self.coded(t, check_crc)
        return decode_symbols(codes, rc, t.rows_cols[1], d, t.where, backend=backend, rows=rows)

    def decode(self, t: TensorArrays, check_crc: bool = True, backend=None,
               rows: slice | None = None) -> np.ndarray:
        codes, rc, d = self.coded(t, check_crc)
        lo, hi = self.scales(t, check_crc)
        return decode_values(codes, rc, t.rows_cols[1], d, lo, hi, t.where, backend=backend,
                             rows=rows)

    def runtime(self, t: TensorArrays, check_crc: bool = True) -> TernaryWeight:
        codes, rc, d = self.coded(t, check_crc)
        lo, hi = self.scales(t, check_crc)
        rows, cols = t.rows_cols
        return TernaryWeight(t.where, (rows, cols), codes,
                             row_offsets(rc, codes.shape[0], cols, t.where), lo, hi, d)

    def check_params(self, t: TensorArrays) -> None:
        self.scales(t, check_crc=False)

    def encode(self, symbols: np.ndarray, scales: np.ndarray, counts, d) -> tuple[dict, dict]:
        """symbols int8 [rows, cols], scales uint16 bf16 bits [rows, 2] of (lo, hi), their
        symbol counts, a dictionary -> (record members but the dictionary's id, arrays)."""
        codes, row_codes = encode(symbols, d)
        return ({"codec": self.id, "symbol_counts": [int(c) for c in counts]},
                {"codes": (codes, None), "row_codes": (row_codes, None),
                 "scales": (scales, self.logical_dtype("scales", ""))})
