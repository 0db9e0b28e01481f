"""The CUDA kernels' decode logic on the CPU: the host harness (gpu/host_harness.cpp, the
same warp drivers with the 32 lanes simulated) as the decode backend "cuda-host", so that
the backend suite, the conformance vectors and the GPU runtime's own operations
(cuda_ops.Runtime over numpy) prove the kernels where there is no GPU. Slow by design
(one lane after another); it exists to be compared, not to be used."""
from __future__ import annotations

import ctypes
from functools import lru_cache

import numpy as np

from . import cuda_build
from .base import DecodeBackend
from .cuda_ops import Launch, Ops, Runtime

_C_ARG = {"i": ctypes.c_int, "l": ctypes.c_longlong}


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    return ctypes.CDLL(str(cuda_build.harness_library()))


def run(launch: Launch) -> None:
    """Calls the harness function of `launch`: its selectors, then the kernel's arguments."""
    args = [ctypes.c_int(s) for s in launch.select]
    for kind, v in launch.args:
        args.append(ctypes.c_void_p(v.ctypes.data) if kind == "p" else _C_ARG[kind](int(v)))
    fn = getattr(library(), launch.host)
    fn.restype = None
    fn(*args)


def tables(d) -> tuple[np.ndarray, np.ndarray]:
    rec = d.runtime_records()[0]
    return np.ascontiguousarray(rec), np.ascontiguousarray(d.runtime_next())


OPS = Ops(np, run, tables)
RUNTIME = Runtime(OPS)


class CudaHostHarness(DecodeBackend):
    """DecodeBackend over the host harness: numpy in, numpy out, the kernels' code."""
    name = "cuda-host"

    def ternary_symbols(self, codes, offsets, cols, d, out, status) -> None:
        OPS.ternary_symbols(codes, offsets, cols, d, out, status)

    def ternary_values(self, codes, offsets, cols, d, lo, hi, out, status) -> None:
        OPS.ternary_values(codes, offsets, cols, d, lo, hi, out, status)

    def ternary_matmul(self, codes, offsets, cols, d, lo, hi, xt, y, status) -> None:
        OPS.ternary_matmul(codes, offsets, cols, d, lo, hi, xt.T, y, status)

    def kbit_matmul(self, packed, bits, cols, group_size, scales, zeros, xt, y, bad) -> None:
        OPS.kbit_matmul(packed, bits, cols, group_size, scales, zeros, xt.T, y, bad)

    def unpack_levels(self, packed, bits, cols, out, bad) -> None:
        OPS.unpack_levels(packed, bits, cols, out, bad)
