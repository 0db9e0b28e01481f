"""What a decode backend is: the kernels that turn validated arrays into symbols, values
and levels. The codec units validate everything first (offsets against the codes array,
dictionaries against §5.6, shapes against the record), so a backend may trust its inputs
and need not bounds-check; what only decoding can show (a row's stream too short or too
long, nonzero padding) it reports per row in `status`, never by reading out of range.

`qmoefmt.testing.backends.DecodeBackendTests` is the suite every backend passes.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

# Per-row status of a ternary stream decode (spec §5.2's row invariants).
ROW_OK = 0
ROW_EXTRA_CODES = 1     # a codeword starts at or past the row's end
ROW_SHORT = 2           # the codewords expand to fewer symbols than the row has
ROW_NONZERO_PAD = 3     # a nonzero symbol falls past the row's end
ROW_STATUS = {
    ROW_EXTRA_CODES: "codeword starts past the end of the row",
    ROW_SHORT: "codewords expand to fewer symbols than the row width",
    ROW_NONZERO_PAD: "nonzero symbol past the end of the row (padding must be zero)",
}


class DecodeBackend:
    """Kernels over validated inputs. Arrays are numpy on the host; a device backend
    copies in and out itself. Every method fills `out` (and `status`/`bad`) in place."""

    name: ClassVar[str]

    def ternary_symbols(self, codes: np.ndarray, offsets: np.ndarray, cols: int, d,
                        out: np.ndarray, status: np.ndarray) -> None:
        """Rows of a §5.2 stream: row r's codewords are codes[offsets[r]:offsets[r+1]],
        read through dictionary `d` from state 0. out int8 [rows, cols] gets 0/1/2,
        status uint8 [rows] a ROW_* code."""
        raise NotImplementedError

    def ternary_values(self, codes: np.ndarray, offsets: np.ndarray, cols: int, d,
                       lo: np.ndarray, hi: np.ndarray, out: np.ndarray,
                       status: np.ndarray) -> None:
        """As `ternary_symbols`, writing float32 0, lo[r] or hi[r]."""
        raise NotImplementedError

    def ternary_matmul(self, codes: np.ndarray, offsets: np.ndarray, cols: int, d,
                       lo: np.ndarray, hi: np.ndarray, xt: np.ndarray, y: np.ndarray,
                       status: np.ndarray) -> None:
        """Y = X W^T with W the rows of a §5.2 stream (as `ternary_values` would decode
        them), never materialised: xt float32 [cols, batch] is X transposed, y float32
        [batch, rows]; fp32 accumulation; status as in `ternary_symbols`."""
        raise NotImplementedError

    def kbit_matmul(self, packed: np.ndarray, bits: int, cols: int, group_size: int,
                    scales: np.ndarray, zeros: np.ndarray, xt: np.ndarray, y: np.ndarray,
                    bad: np.ndarray) -> None:
        """Y = X W^T with W the §12 rows `packed` dequantize to (float32 scales and uint8
        zeros [rows, groups]), never materialised: xt float32 [cols, batch], y float32
        [batch, rows]; bad[r] = 1 where row r's padding bits are not zero."""
        raise NotImplementedError

    def unpack_levels(self, packed: np.ndarray, bits: int, cols: int, out: np.ndarray,
                      bad: np.ndarray) -> None:
        """§12 bit-packed rows [rows, ceil(cols * bits / 8)] -> out uint8 [rows, cols];
        bad[r] = 1 where row r's padding bits are not zero."""
        raise NotImplementedError
