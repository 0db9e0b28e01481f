"""PyTorch is an optional dependency (the `torch` extra): reading, verifying, decoding and
unpacking stores need none of it; GPTQ, k-bit quantization, calibration, `.pt`/`.bin`
checkpoints and the bundled model do."""
from __future__ import annotations

from .errors import MissingExtraError

INSTALL_HINT = "pip install 'qmoefmt[torch]' (install a CPU wheel of torch first to avoid CUDA packages)"


def require_torch(feature: str):
    """The torch module, or a MissingExtraError naming the feature and the extra."""
    try:
        import torch
    except ImportError:
        raise MissingExtraError(f"{feature} needs PyTorch, which is not installed; "
                                f"{INSTALL_HINT}") from None
    return torch
