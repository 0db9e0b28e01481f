"""The 2/3/4-bit grid both k-bit codecs store (spec §12): per group of `group_size`
columns a bf16 scale and a uint8 zero point; value = scale * (level - zero)."""
from __future__ import annotations

import numpy as np

from ..dictionaries.stream import row_range
from ..errors import FormatError
from ..format import bf16
from ..format import constants as C
from .base import ArraySpec, Codec, TensorArrays, require_int


def n_groups(cols: int, group_size: int) -> int:
    return -(-cols // group_size)     # spec §12: 0 groups for 0 columns


def dequantize(levels: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int) -> np.ndarray:
    """float32 scale[g] * (level - zero[g]) with g = column // group_size."""
    if levels.size == 0:        # a width of 2^36 over no rows is still no work (§9)
        return np.zeros(levels.shape, np.float32)
    g = np.arange(levels.shape[1]) // group_size
    return (scales[:, g] * (levels.astype(np.float32) - zeros[:, g].astype(np.float32))).astype(np.float32)


class KbitGrid(Codec):
    bfloat16_arrays = ("scales",)
    members = ("bits", "group_size", "quantizer")
    # scale * (level - zero): a bf16 scale times up to 15 needs 12 significant bits, more
    # than bfloat16 (8) or float16 (11) hold
    exact_dtypes = ("float32", "float64")

    def params(self, t: TensorArrays) -> tuple[int, int]:
        """(bits, groups), validated."""
        bits = require_int(t.record, "bits", t.where, allowed=C.KBIT_BITS)
        g = require_int(t.record, "group_size", t.where, minimum=1)
        return bits, n_groups(t.rows_cols[1], g)

    def grid_specs(self, t: TensorArrays) -> dict[str, ArraySpec]:
        rows, _ = t.rows_cols
        _, groups = self.params(t)
        return {"scales": ArraySpec(("uint16",), (rows, groups)),
                "zeros": ArraySpec(("uint8",), (rows, groups))}

    def levels(self, t: TensorArrays, zeros: np.ndarray, check_crc: bool, backend,
               rows: tuple[int, int]) -> np.ndarray:
        """uint8 levels of rows [a, b), validated against their zero points `zeros`."""
        raise NotImplementedError

    def grid(self, t: TensorArrays, check_crc: bool = True, backend=None,
             rows: slice | None = None):
        """(levels, scales float32, zeros) of the rows selected, validated."""
        a, b = row_range(rows, t.rows_cols[0])
        zeros = self.zero_points(t, check_crc)
        levels = self.levels(t, zeros[a:b], check_crc, backend, (a, b))
        return levels, self.float_scales(t, check_crc, slice(a, b)), zeros[a:b]

    def zero_points(self, t: TensorArrays, check_crc: bool = True) -> np.ndarray:
        """uint8 [rows, groups], each < 2**bits."""
        bits, _ = self.params(t)
        zeros = np.asarray(t.array("zeros", check_crc))
        if zeros.size and int(zeros.max()) >= (1 << bits):
            raise FormatError(f"{t.where}/zeros", f"zero point >= 2**{bits}")
        return zeros

    def float_scales(self, t: TensorArrays, check_crc: bool = True,
                     rows: slice = slice(None)) -> np.ndarray:
        """float32 [rows, groups] of the rows selected, each finite."""
        scales = bf16.to_float32(t.array("scales", check_crc)[rows])
        if not np.isfinite(scales).all():
            raise FormatError(f"{t.where}/scales", "scales must be finite")
        return scales

    def check_grid(self, t: TensorArrays) -> None:
        """verify, shallow: every scale finite and zero point below 2^bits (§12)."""
        self.float_scales(t, check_crc=False)
        self.zero_points(t, check_crc=False)

    def check(self, t: TensorArrays, deep: bool) -> None:
        self.check_grid(t)
        if deep:
            self.grid(t, check_crc=False)

    def symbols(self, t: TensorArrays, check_crc: bool = True, backend=None,
                rows: slice | None = None) -> np.ndarray:
        return self.grid(t, check_crc, backend, rows)[0]

    def zero_point_share(self, t: TensorArrays, block_rows: int = 4096) -> float | None:
        """The share of levels that sit on their group's zero point (the weights that
        dequantize to exactly 0), read from the codes a block of rows at a time."""
        rows, cols = t.rows_cols
        if rows * cols == 0:
            return None
        g = np.arange(cols) // t.record["group_size"]
        on_zero = 0
        for a in range(0, rows, block_rows):
            levels, _, zeros = self.grid(t, rows=slice(a, min(a + block_rows, rows)))
            on_zero += int(np.count_nonzero(levels == zeros[:, g]))
        return on_zero / (rows * cols)

    def decode(self, t: TensorArrays, check_crc: bool = True, backend=None,
               rows: slice | None = None) -> np.ndarray:
        levels, scales, zeros = self.grid(t, check_crc, backend, rows)
        return dequantize(levels, scales, zeros, t.record["group_size"])

    def grid_arrays(self, scales_bits: np.ndarray, zeros: np.ndarray) -> dict:
        return {"scales": (scales_bits, self.logical_dtype("scales", "")), "zeros": (zeros, None)}
