"""Quantizers: QMoE's ternary RTN (Numba, no torch), the torch grids, GPTQ and its batch
API for experts, calibration files, the Hessian collector and sequential mode. Everything
but `rtn` needs PyTorch (the `torch` extra)."""
