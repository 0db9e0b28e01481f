"""What a codec unit is: one class per codec id (spec §2), holding everything the format
says about it. The reader, verify, inspect, unpack and pack ask the unit; none of them
switches on codec ids.

A unit sees a tensor through `TensorArrays`: its record, its (rows, cols) and a way to get
one validated array or its dictionary by name. It never sees a path; `where` strings
name what to report.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

import numpy as np

from ..errors import FormatError, NotApplicableError


@dataclass(frozen=True)
class ArraySpec:
    """One array a codec stores: the zarr data types it may have, and its shape (None:
    1-D, at most one element per weight)."""
    data_types: tuple[str, ...]
    shape: tuple[int, ...] | None = None


class TensorArrays(Protocol):
    """What a codec reads a tensor through (the reader's Tensor provides it)."""
    name: str
    record: dict
    shape: tuple[int, ...]
    where: str

    @property
    def rows_cols(self) -> tuple[int, int]: ...
    def array(self, name: str, check_crc: bool = True) -> np.ndarray: ...
    def load_dictionary(self): ...


@dataclass(eq=False)
class RuntimeWeight:
    """A coded 2-D weight ready to multiply: its arrays validated once and held as the
    kernels take them, so that a forward pass checks nothing again. Backend-neutral: the
    CPU and GPU kernels, the torch modules and the expert budget all take this. Its
    per-tensor arrays are the fields listed in `moved` (a device copy moves those; the
    dictionary's tables are shared per dictionary and stay where they are)."""
    where: str
    shape: tuple[int, int]
    moved: ClassVar[tuple[str, ...]] = ()

    def arrays(self) -> dict[str, np.ndarray]:
        return {n: getattr(self, n) for n in self.moved}

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays().values())

    def copy(self, move: Callable[[np.ndarray], object]) -> RuntimeWeight:
        """The same weight with every per-tensor array replaced by move(array)."""
        return dataclasses.replace(self, **{n: move(a) for n, a in self.arrays().items()})

    def matmul(self, x: np.ndarray, backend=None) -> np.ndarray:
        """x float32 [batch, in] -> float32 [batch, out] = x W^T, fp32 accumulation."""
        raise NotImplementedError

    def check_input(self, x: np.ndarray) -> None:
        if x.ndim != 2 or x.shape[1] != self.shape[1]:
            raise ValueError(f"{self.where}: input of shape {list(x.shape)} for a weight of "
                             f"{self.shape[1]} columns")


class Codec:
    """A codec id's meaning. Subclasses set the class attributes and override what applies."""

    id: ClassVar[str]
    since: ClassVar[str]                  # the format version that defines it (spec §3)
    arrays: ClassVar[tuple[str, ...]]     # the arrays a tensor of this codec has, exactly
    members: ClassVar[tuple[str, ...]] = ()   # record members it requires beyond §4.5's
    expert: ClassVar[bool] = True         # quantized expert weights (inspect's "experts")
    uses_dictionary: ClassVar[bool] = False
    multiplies: ClassVar[bool] = False     # has a decode-matmul (`runtime`)
    # arrays whose bytes are bfloat16 bits, declared as such in their zarr.json (spec §7)
    bfloat16_arrays: ClassVar[tuple[str, ...]] = ()
    # float dtypes that hold every value decode() gives exactly
    exact_dtypes: ClassVar[tuple[str, ...]] = ("float32", "float64")

    def logical_dtype(self, array: str, dtype: str) -> str | None:
        """The logical dtype an array declares when its stored data_type does not say it."""
        return "bfloat16" if array in self.bfloat16_arrays else None

    def array_specs(self, t: TensorArrays) -> dict[str, ArraySpec]:
        """Expected data types and shapes of every array, from the validated record."""
        raise NotImplementedError

    def decode(self, t: TensorArrays, check_crc: bool = True, backend=None,
               rows: slice | None = None) -> np.ndarray:
        """float32 [rows, cols]: the weights, dequantized (coded ones by the decode
        backend named `backend`, None for the default); `rows` a contiguous range of the
        [prod(shape[:-1]), cols] view, all by default."""
        raise NotImplementedError

    def symbols(self, t: TensorArrays, check_crc: bool = True, backend=None,
                rows: slice | None = None) -> np.ndarray:
        """[rows, cols] of what the codec quantized to (ternary symbols or levels)."""
        raise NotApplicableError(f"{t.name} is stored {self.id}; it has no symbols (use decode())")

    def runtime(self, t: TensorArrays, check_crc: bool = True) -> RuntimeWeight:
        """The 2-D weight as a RuntimeWeight (codecs with a decode-matmul define it)."""
        raise NotApplicableError(f"{t.name} is stored {self.id}; it has no decode-matmul "
                                 "(decode() it)")

    def check(self, t: TensorArrays, deep: bool) -> None:
        """verify's codec part, after every array was checked against `array_specs`:
        the record's own invariants; `deep` decodes and checks what only decoding shows.
        Raises FormatError."""

    def summary(self, t: TensorArrays) -> dict:
        """What inspect shows beside size: the fraction of weights quantized to zero."""
        counts = t.record.get("symbol_counts")
        n = int(np.prod(t.shape))
        return {"zero_fraction": counts[0] / n if counts and n else None}


def require_int(record: dict, key: str, where: str, allowed=None,
                minimum: int | None = None) -> int:
    """An integer member of a record, validated (booleans are not integers)."""
    v = record.get(key)
    if (not isinstance(v, int) or isinstance(v, bool) or (allowed is not None and v not in allowed)
            or (minimum is not None and v < minimum)):
        want = f"one of {tuple(allowed)}" if allowed is not None else f"an integer >= {minimum}"
        raise FormatError(where, f"{key} {v!r} is not {want}")
    return v
