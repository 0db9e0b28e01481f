"""Decode backends by name. A new backend (CUDA, C) is one module subclassing
`base.DecodeBackend`, registered here, and one test module subclassing
`qmoefmt.testing.backends.DecodeBackendTests`."""
from __future__ import annotations

import ctypes
import os
import sys

import numba

from .base import DecodeBackend

# Here, before any parallel kernel runs (the layer is fixed at the first launch): Numba's
# pip wheels default to GNU OpenMP, whose forked children die at their first parallel
# kernel, and multiprocessing, DataLoader workers and Dask's process pools fork. "forksafe"
# takes TBB if installed (it also survives kernels launched from several threads at once),
# else workqueue, which does not: install tbb for that. NUMBA_THREADING_LAYER still rules.
if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "forksafe"


def _preload_tbb() -> None:
    """The tbb wheel puts libtbb in the environment's lib/, where Numba's TBB layer (no
    RPATH) does not look, so it silently fell back to workqueue; loaded here, it is found."""
    lib = os.path.join(sys.prefix, "lib", "libtbb.so.12")
    if sys.platform.startswith("linux") and os.path.exists(lib):
        try:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass        # an unusable copy: Numba falls back to workqueue, as without one


if numba.config.THREADING_LAYER in ("forksafe", "threadsafe", "tbb"):
    _preload_tbb()

DEFAULT = "numba"
_BACKENDS: dict[str, DecodeBackend] = {}


def register(backend: DecodeBackend) -> None:
    _BACKENDS[backend.name] = backend


def get(name: str | None = None) -> DecodeBackend:
    """The backend called `name` (None: the default, Numba on the CPU)."""
    name = name or DEFAULT
    if name == "numba" and name not in _BACKENDS:
        from .cpu import NumbaCPU     # imported on first use: Numba compiles lazily anyway
        register(NumbaCPU())
    if name == "cuda" and name not in _BACKENDS:
        from .cuda import CudaBackend     # imports CuPy: only when asked for
        register(CudaBackend())
    if name == "cuda-host" and name not in _BACKENDS:
        from .cuda_host import CudaHostHarness    # the kernels' logic on the CPU (tests)
        register(CudaHostHarness())
    if name not in _BACKENDS:
        raise ValueError(f"no decode backend {name!r}; known: {sorted(_BACKENDS) or [DEFAULT]}")
    return _BACKENDS[name]


__all__ = ["DEFAULT", "DecodeBackend", "get", "register"]
