"""Running coded weights: what sits between the decoders and a model. A codec unit gives
a tensor's `RuntimeWeight` (`Tensor.runtime()`); `ExpertCache` keeps those of the
experts in use on a device under a byte budget."""
from __future__ import annotations

from ..codecs.base import RuntimeWeight
from .budget import ExpertCache

__all__ = ["ExpertCache", "RuntimeWeight"]
