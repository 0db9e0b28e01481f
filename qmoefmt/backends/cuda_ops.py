"""The GPU runtime's operations, written once over an array module and an executor: with
numpy and the host harness (cuda_host.py) they run the kernels' warp drivers on the CPU,
with CuPy and the CUDA kernels (cuda.py) on the device. Each operation turns arrays the
codec units validated into `Launch`es (a kernel, its arguments) and reads back what the
kernels report per row.

Every kernel takes one warp a row; products take X transposed in tiles of at most 16
inputs (the kernels' widths B: 1, 2, 4, 8, 16), so any batch runs.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..backends.base import ROW_STATUS
from ..codecs.base import RuntimeWeight
from ..codecs.ternary_dict16 import TernaryWeight
from ..codecs.uint_dict16 import DictLevelsWeight, merge
from ..codecs.uint_packed import PackedWeight, row_bytes
from ..dictionaries.tables import Dictionary
from ..errors import FormatError

WIDTHS = (1, 2, 4, 8, 16)
# bytes of dynamic shared memory a block may take without opting in (every sm_80+ part)
SHARED_BYTES = 48 * 1024
# dense output dtypes -> (kernel name suffix, the harness's `kind`, storage dtype)
OUTPUTS = {"float32": ("f32", 0, np.float32), "float16": ("f16", 1, np.uint16),
           "bfloat16": ("bf16", 2, np.uint16)}
INDEX_SUFFIX = {2: "u16", 4: "u32"}
# rows a uint-dict16 weight is densified in at a time, for its first check and grouped grids
DENSE_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class Launch:
    """One kernel run: `name` the device kernel, `host` the harness function, `select` the
    harness's leading arguments that the kernel's name suffix stands for, `args` (kind,
    value) with kind "p" an array, "i" an int32, "l" an int64; `rows` one warp each;
    `shared` bytes of dynamic shared memory."""
    name: str
    host: str
    select: tuple[int, ...]
    args: tuple
    rows: int
    shared: int = 0


def width(n: int) -> int:
    """The narrowest kernel width that takes n (1..16) inputs."""
    return next(w for w in WIDTHS if w >= n)


class Ops:
    """The operations over array module `xp`: `run` executes a Launch, `tables(d)` gives
    dictionary d's runtime records and next-state table as `xp` arrays."""

    def __init__(self, xp, run: Callable[[Launch], None],
                 tables: Callable[[Dictionary], tuple]):
        self.xp, self.run, self.tables = xp, run, tables

    # ---- argument helpers

    def _arr(self, a, dtype) -> tuple[str, object]:
        """A kernel's array argument: C-contiguous of `dtype` (outputs must be already)."""
        if a.dtype != dtype or not a.flags.c_contiguous:
            raise ValueError(f"a kernel needs a C-contiguous {np.dtype(dtype)} array, "
                             f"got {a.dtype} {'' if a.flags.c_contiguous else 'strided'}")
        return ("p", a)

    def _in(self, a, dtype) -> tuple[str, object]:
        return self._arr(self.xp.ascontiguousarray(a, dtype=dtype), dtype)

    def _dict(self, d: Dictionary) -> tuple:
        rec, nxt = self.tables(d)
        _, lb, kb, s0, sp = d.runtime_records()
        return (("p", rec), ("p", nxt), ("i", rec.shape[1]), ("i", lb), ("i", kb), ("i", s0),
                ("i", sp), ("i", d.n_states))

    def _stream(self, codes, offsets, cols, d) -> tuple:
        rows = offsets.shape[0] - 1
        return (self._in(codes, np.uint16), self._in(offsets, np.int64), ("l", rows),
                ("l", cols), *self._dict(d))

    def _tiles(self, x):
        """x float32 [batch, cols] -> (first input, inputs, kernel width, X^T [cols, width])
        per tile of at most 16 inputs; an empty batch is one tile of none, so that the
        rows' status is computed all the same."""
        xp = self.xp
        for b0 in range(0, max(1, x.shape[0]), WIDTHS[-1]):
            n = min(WIDTHS[-1], x.shape[0] - b0)
            w = width(max(1, n))
            if n == w:          # one input: X^T is x itself
                xt = xp.ascontiguousarray(x[b0:b0 + n].T)
            else:
                xt = xp.zeros((x.shape[1], w), np.float32)
                xt[:, :n] = x[b0:b0 + n].T
            yield b0, n, w, xt

    def _staged(self, cols: int, w: int) -> tuple[int, int]:
        """(staged flag, shared bytes): X^T goes to shared memory when it fits."""
        n = cols * w * 4
        return (1, n) if n <= SHARED_BYTES else (0, 0)

    # ---- ternary streams (§5.2); status uint8 [rows] gets ROW_* codes

    def ternary_symbols(self, codes, offsets, cols, d, out, status) -> None:
        rows = offsets.shape[0] - 1
        self.run(Launch("qm_ternary_symbols", "qm_host_ternary_symbols", (),
                        (*self._stream(codes, offsets, cols, d), self._arr(out, np.int8),
                         self._arr(status, np.uint8)), rows))

    def ternary_values(self, codes, offsets, cols, d, lo, hi, out, status,
                       dtype: str = "float32") -> None:
        """out [rows, cols] of OUTPUTS[dtype]'s storage (float16/bfloat16 as bits)."""
        sfx, kind, store = OUTPUTS[dtype]
        rows = offsets.shape[0] - 1
        self.run(Launch(f"qm_ternary_values_{sfx}", "qm_host_ternary_values", (kind,),
                        (*self._stream(codes, offsets, cols, d), self._in(lo, np.float32),
                         self._in(hi, np.float32), self._arr(out, store),
                         self._arr(status, np.uint8)), rows))

    def ternary_matmul(self, codes, offsets, cols, d, lo, hi, x, y, status) -> None:
        """y float32 [batch, rows] = x [batch, cols] W^T."""
        rows = offsets.shape[0] - 1
        stream = self._stream(codes, offsets, cols, d)
        lo, hi = self._in(lo, np.float32), self._in(hi, np.float32)
        for b0, n, w, xt in self._tiles(x):
            staged, shared = self._staged(cols, w)
            self.run(Launch(f"qm_ternary_matmul_b{w}", "qm_host_ternary_matmul", (w,),
                            (*stream, lo, hi, self._arr(xt, np.float32), ("i", n),
                             ("i", staged), self._arr(y[b0:b0 + n], np.float32),
                             self._arr(status, np.uint8)), rows, shared))

    # ---- packed levels (§12); bad uint8 [rows] = 1 where padding bits are set

    def _kbit(self, q, bits, cols, group_size, scales, zeros) -> tuple:
        rows = q.shape[0]
        return (self._in(q, np.uint8), ("l", rows), ("l", row_bytes(cols, bits)), ("l", cols),
                ("i", bits), ("l", group_size), self._in(scales, np.float32),
                self._in(zeros, np.uint8), ("l", scales.shape[1]))

    def unpack_levels(self, q, bits, cols, out, bad) -> None:
        rows = q.shape[0]
        self.run(Launch("qm_unpack_levels", "qm_host_unpack_levels", (),
                        (self._in(q, np.uint8), ("l", rows), ("l", row_bytes(cols, bits)),
                         ("l", cols), ("i", bits), self._arr(out, np.uint8),
                         self._arr(bad, np.uint8)), rows))

    def kbit_values(self, q, bits, cols, group_size, scales, zeros, out, bad,
                    dtype: str = "float32") -> None:
        sfx, kind, store = OUTPUTS[dtype]
        self.run(Launch(f"qm_kbit_values_{sfx}", "qm_host_kbit_values", (kind,),
                        (*self._kbit(q, bits, cols, group_size, scales, zeros),
                         self._arr(out, store), self._arr(bad, np.uint8)), q.shape[0]))

    def kbit_matmul(self, q, bits, cols, group_size, scales, zeros, x, y, bad) -> None:
        grid = self._kbit(q, bits, cols, group_size, scales, zeros)
        for b0, n, w, xt in self._tiles(x):
            staged, shared = self._staged(cols, w)
            self.run(Launch(f"qm_kbit_matmul_b{w}", "qm_host_kbit_matmul", (w,),
                            (*grid, self._arr(xt, np.float32), ("i", n), ("i", staged),
                             self._arr(y[b0:b0 + n], np.float32), self._arr(bad, np.uint8)),
                            q.shape[0], shared))

    # ---- escapes (§13)

    def _grid(self, rows, cols, bits, group_size, scales, zeros, ends) -> tuple:
        return (("l", rows), ("l", cols), ("i", bits), ("l", group_size),
                self._in(scales, np.float32), self._in(zeros, np.uint8), ("l", scales.shape[1]),
                self._in(ends, np.int64))

    def dict_values(self, sym, bits, group_size, scales, zeros, ends, ecols, elevels, out,
                    bad, dtype: str = "float32") -> None:
        """Rows of uint-dict16 values from their ternary symbols (int8 [rows, cols]) and
        escapes (`ends` [rows + 1] into ecols/elevels); bad[r] = 1 where row r breaks §13."""
        rows, cols = sym.shape
        sfx, kind, store = OUTPUTS[dtype]
        it = ecols.dtype.itemsize
        self.run(Launch(f"qm_dict_values_{sfx}_{INDEX_SUFFIX[it]}", "qm_host_dict_values",
                        (kind, it),
                        (self._arr(sym, np.int8),
                         *self._grid(rows, cols, bits, group_size, scales, zeros, ends),
                         self._in(ecols, ecols.dtype), self._in(elevels, np.uint8),
                         self._arr(out, store), self._arr(bad, np.uint8)), rows))

    def escape_corrections(self, cols, bits, group_size, scales, zeros, ends, ecols, elevels,
                           x, y) -> None:
        """y [batch, rows] += the escapes' share of a one-group-a-row product."""
        rows = scales.shape[0]
        it = ecols.dtype.itemsize
        grid = self._grid(rows, cols, bits, group_size, scales, zeros, ends)
        for b0, n, w, xt in self._tiles(x):
            self.run(Launch(f"qm_escape_corrections_b{w}_{INDEX_SUFFIX[it]}",
                            "qm_host_escape_corrections", (w, it),
                            (*grid, self._in(ecols, ecols.dtype), self._in(elevels, np.uint8),
                             self._arr(xt, np.float32), ("i", n),
                             self._arr(y[b0:b0 + n], np.float32)), rows))


# ---------------------------------------------------------------- runtime weights


def _host(xp, a) -> np.ndarray:
    return a if xp is np else xp.asnumpy(a)


def _raise_rows(xp, status, where: str, what: dict[int, str], first: int = 0) -> None:
    """FormatError for the first nonzero per-row flag, the flags' rows counted from
    `first` (one read back of [rows] bytes)."""
    s = _host(xp, status)
    bad = np.flatnonzero(s)
    if bad.size:
        r = int(bad[0])
        more = f" (and {bad.size - 1} more rows)" if bad.size > 1 else ""
        raise FormatError(where, f"row {first + r}: {what[int(s[r])]}{more}")


_PADDING = {1: "nonzero padding bits in q"}


class Runtime:
    """Products and dense decodes of RuntimeWeights whose arrays live in `ops.xp`.

    A weight's rows decode the same for every input, so what only decoding shows (a bad
    stream, set padding bits, escapes against §13) is read back once a weight, on its
    first use; later products launch their kernels and return without waiting."""

    def __init__(self, ops: Ops):
        self.ops, self.xp = ops, ops.xp
        self._checked: weakref.WeakSet[RuntimeWeight] = weakref.WeakSet()

    def _check(self, weight: RuntimeWeight, flags, what: dict[int, str]) -> None:
        """Reads back a weight's per-row flags unless a use before passed, and raises for
        the first bad row."""
        if weight not in self._checked:
            _raise_rows(self.xp, flags, weight.where, what)
            self._checked.add(weight)

    def matmul(self, weight: RuntimeWeight, x):
        """x float32 [batch, in] (an `xp` array) -> y float32 [batch, out] = x W^T."""
        xp = self.xp
        rows, cols = weight.shape
        if x.ndim != 2 or x.shape[1] != cols:
            raise ValueError(f"{weight.where}: input of shape {list(x.shape)} for a weight of "
                             f"{cols} columns")
        x = xp.ascontiguousarray(x, dtype=np.float32)
        # every kernel writes all of y (and of status / bad), so nothing is cleared first
        y = xp.zeros((x.shape[0], rows), np.float32) if not cols else \
            xp.empty((x.shape[0], rows), np.float32)
        if isinstance(weight, TernaryWeight):
            self._ternary_matmul(weight, x, y)
        elif isinstance(weight, PackedWeight):
            self._kbit_matmul(weight, x, y)
        elif isinstance(weight, DictLevelsWeight):
            self._dict_matmul(weight, x, y)
        else:
            raise TypeError(f"{weight.where}: no GPU product for {type(weight).__name__}")
        return y

    def _ternary_matmul(self, w: TernaryWeight, x, y) -> None:
        rows, cols = w.shape
        if not (rows and cols):     # row_offsets allowed no codewords in 0 columns
            return
        status = self.xp.empty(rows, np.uint8)
        self.ops.ternary_matmul(w.codes, w.offsets, cols, w.dictionary, w.lo, w.hi, x, y, status)
        self._check(w, status, ROW_STATUS)

    def _kbit_matmul(self, w: PackedWeight, x, y) -> None:
        rows, cols = w.shape
        if not (rows and cols):
            return
        bad = self.xp.empty(rows, np.uint8)
        self.ops.kbit_matmul(w.q, w.bits, cols, w.group_size, w.scales, w.zeros, x, y, bad)
        self._check(w, bad, _PADDING)

    def _dict_matmul(self, w: DictLevelsWeight, x, y) -> None:
        rows, cols = w.shape
        if not w.checked:
            self._dict_check(w)
            w.checked = True
        if not (rows and cols and x.shape[0]):
            return
        if w.group_size >= cols:
            # W = s * t + E (see DictLevelsWeight): the ternary product with (lo, hi) =
            # (-s, s), then the escapes' corrections
            s = self.xp.ascontiguousarray(w.scales[:, 0])
            status = self.xp.empty(rows, np.uint8)
            self.ops.ternary_matmul(w.codes, w.offsets, cols, w.dictionary, -s, s, x, y, status)
            if w.escape_cols.shape[0]:
                self.ops.escape_corrections(cols, w.bits, w.group_size, w.scales, w.zeros,
                                            w.ends, w.escape_cols, w.escape_levels, x, y)
            return
        for a, b in self._blocks(w):
            y[:, a:b] = x @ self._dict_block(w, a, b, "float32").T

    def _blocks(self, w: RuntimeWeight):
        rows, cols = w.shape
        step = max(1, DENSE_BLOCK_BYTES // max(1, 4 * cols))
        for a in range(0, rows, step):
            yield a, min(rows, a + step)

    def _dict_block(self, w: DictLevelsWeight, a: int, b: int, dtype: str, check=False):
        """Rows a..b of a uint-dict16 weight, dense; `check` reads back their flags and
        raises the reader's own error for the first bad row."""
        xp = self.xp
        cols = w.shape[1]
        sym = xp.empty((b - a, cols), np.int8)      # all written, as are the flags
        status = xp.empty(b - a, np.uint8)
        self.ops.ternary_symbols(w.codes, w.offsets[a:b + 1], cols, w.dictionary, sym, status)
        out = xp.empty((b - a, cols), OUTPUTS[dtype][2])
        bad = xp.empty(b - a, np.uint8)
        ends = w.ends[a:b + 1] - w.ends[a]
        e0, e1 = (int(w.ends[i]) for i in (a, b))
        self.ops.dict_values(sym, w.bits, w.group_size, w.scales[a:b], w.zeros[a:b], ends,
                             w.escape_cols[e0:e1], w.escape_levels[e0:e1], out, bad, dtype)
        if check:
            _raise_rows(xp, status, w.where, ROW_STATUS, first=a)
            if _host(xp, bad).any():
                # the CPU's check names the row, column and rule
                merge(_host(xp, sym), _host(xp, w.zeros[a:b]), w.group_size, w.bits,
                      _host(xp, w.counts[a:b]), _host(xp, w.escape_cols[e0:e1]),
                      _host(xp, w.escape_levels[e0:e1]), w.where, first_row=a)
                raise FormatError(w.where, f"rows {a}..{b - 1}: escapes break spec §13")
        return out

    def _dict_check(self, w: DictLevelsWeight) -> None:
        for a, b in self._blocks(w):
            self._dict_block(w, a, b, "float32", check=True)

    def decode(self, weight: RuntimeWeight, dtype: str = "float32"):
        """The dense weight [out, in] as float32, or float16 / bfloat16 (rounded to
        nearest even) as their bits in uint16."""
        xp = self.xp
        rows, cols = weight.shape
        store = OUTPUTS[dtype][2]
        if isinstance(weight, DictLevelsWeight):
            out = xp.empty((rows, cols), store)
            for a, b in self._blocks(weight):
                out[a:b] = self._dict_block(weight, a, b, dtype, check=not weight.checked)
            weight.checked = True
            return out
        if not isinstance(weight, (TernaryWeight, PackedWeight)):
            raise TypeError(f"{weight.where}: no GPU decode for {type(weight).__name__}")
        if not (rows and cols):
            return xp.zeros((rows, cols), store)
        out = xp.empty((rows, cols), store)     # the kernels write every element
        flags = xp.empty(rows, np.uint8)
        if isinstance(weight, TernaryWeight):
            self.ops.ternary_values(weight.codes, weight.offsets, cols, weight.dictionary,
                                    weight.lo, weight.hi, out, flags, dtype)
            self._check(weight, flags, ROW_STATUS)
        else:
            self.ops.kbit_values(weight.q, weight.bits, cols, weight.group_size,
                                 weight.scales, weight.zeros, out, flags, dtype)
            self._check(weight, flags, _PADDING)
        return out


__all__ = ["Launch", "Ops", "Runtime", "OUTPUTS", "WIDTHS"]
