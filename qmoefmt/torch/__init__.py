"""PyTorch modules that run straight from a store: expert weights multiply from their
compressed arrays (`Tensor.matmul`), never held dense.

`CompressedLinear` stands in for an `nn.Linear`, `CompressedExperts` for a transformers 5
fused experts module, and `load_model` puts them into a model and loads the rest dense.
A module runs on its input's device: the Numba kernels for CPU tensors, the CUDA kernels
(`qmoefmt[gpu]`, qmoefmt.backends.cuda) for CUDA tensors.
"""
from __future__ import annotations

from .experts import CompressedExperts
from .linear import CompressedLinear
from .load import load_model
from .pretrained import from_pretrained
from .sources import StoreMismatchError

__all__ = ["CompressedExperts", "CompressedLinear", "StoreMismatchError", "from_pretrained",
           "load_model"]
