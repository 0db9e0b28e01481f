"""PyTorch is an optional dependency (the `torch` extra): reading, verifying, decoding and
unpacking stores, and ternary RTN packs of safetensors or HDF5, need none of it; GPTQ,
k-bit quantization, calibration, `.pt`/`.bin` checkpoints and the bundled model do."""
from __future__ import annotations

from .errors import MissingExtraError

INSTALL_HINT = ("pip install 'qmoefmt[torch]' (install a CPU wheel of torch first to avoid "
                "CUDA packages)")


def require_torch(feature: str):
    """The torch module, or a MissingExtraError naming the feature and the extra."""
    try:
        import torch
    except ImportError as e:
        # An installed torch that fails to load (a missing shared library, say) needs another
        # remedy than a missing one, so say which it is.
        missing = isinstance(e, ModuleNotFoundError) and e.name == "torch"
        first = (str(e).splitlines() or [type(e).__name__])[0]
        why = "which is not installed" if missing else f"which failed to import ({first})"
        raise MissingExtraError(f"{feature} needs PyTorch, {why}; {INSTALL_HINT}") from None
    return torch


def numpy_of(tensor):
    """A CPU torch tensor's values as numpy, viewing its memory; bfloat16 (which numpy
    lacks) as ml_dtypes.bfloat16, bit for bit."""
    import torch
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
