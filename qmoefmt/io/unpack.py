"""unpack: a store back to dense safetensors, experts dequantized, one tensor at a time."""
from __future__ import annotations

import numpy as np

from ..store.reader import Store, Tensor
from .checkpoint import numpy_dtype
from .safetensors_writer import SafetensorsWriter

# Dequantized experts are exact in bfloat16 (their scales are bf16); a float16 source
# might not hold them, so those come back as float32.
EXACT_DEQUANT_DTYPES = ("bfloat16", "float32", "float64")


def output_dtype(t: Tensor) -> str:
    if not t.unit.expert or t.dtype in EXACT_DEQUANT_DTYPES:
        return t.dtype
    return "float32"


def unpack(store: Store, output, progress=None) -> int:
    tensors = list(store.tensors())
    entries = [(t.name, output_dtype(t), list(t.shape)) for t in tensors]
    with SafetensorsWriter(output, entries, metadata={"qmoefmt": store.format_version}) as w:
        for t, (_, dtype, _) in zip(tensors, entries):
            a = np.asarray(t.numpy()) if not t.unit.expert else t.decode().astype(numpy_dtype(dtype))
            w.write(t.name, a)
            if progress:
                progress(1)
    return len(tensors)
