"""The CUDA decode backend against the shared backend suite, on the GPU. Skips without
CuPy or a CUDA device (the kernels' logic is proven without one by test_gpu_harness.py)."""
import pytest

from qmoefmt.backends import cuda
from qmoefmt.testing.backends import DecodeBackendTests

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda.available(), reason="no CUDA GPU (or no CuPy)")]


class TestCudaBackend(DecodeBackendTests):
    backend = "cuda"
