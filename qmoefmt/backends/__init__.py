"""Decode backends by name. A new backend (CUDA, C) is one module subclassing
`base.DecodeBackend`, registered here, and one test module subclassing
`qmoefmt.testing.backends.DecodeBackendTests`."""
from __future__ import annotations

from .base import DecodeBackend

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
