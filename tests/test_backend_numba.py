"""The Numba CPU decode backend against the shared backend suite."""
from qmoefmt.testing.backends import DecodeBackendTests


class TestNumbaBackend(DecodeBackendTests):
    backend = "numba"
