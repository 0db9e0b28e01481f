"""bfloat16 as the format stores it (spec §7): raw uint16 bits, the high half of a float32."""
from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(nogil=True, cache=True)
def bf16_bits(x):
    """float32 -> bfloat16 bits, round to nearest even (finite inputs); for Numba kernels."""
    u = np.float32(x).view(np.uint32)
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@nb.njit(nogil=True, cache=True)
def bf16_value(b):
    return np.uint32(np.uint32(b) << np.uint32(16)).view(np.float32)


def to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits -> float32 values (exact)."""
    return (np.asarray(bits, np.uint32) << 16).view(np.float32)


def exact_bits(values) -> np.ndarray:
    """Float32 values that are exact in bf16 (the grids make them so) -> their bits."""
    return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def widen(a: np.ndarray) -> np.ndarray:
    """A bfloat16 array (ml_dtypes or its uint16 bits) as float32, by a shift: exact, and
    numpy releases the GIL for it, unlike ml_dtypes' cast."""
    return (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
