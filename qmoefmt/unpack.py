"""unpack: a store back to dense safetensors, experts dequantized, one tensor at a time."""
from __future__ import annotations

import numpy as np

from . import layout
from .checkpoint import numpy_dtype
from .safetensors_writer import SafetensorsWriter
from .store_reader import Store

# Dequantized experts are exact in bfloat16 (their scales are bf16); a float16 source
# might not hold them, so those come back as float32.
EXACT_DEQUANT_DTYPES = ("bfloat16", "float32", "float64")


def output_dtype(codec: str, dtype: str) -> str:
    if codec == layout.CODEC_DENSE or dtype in EXACT_DEQUANT_DTYPES:
        return dtype
    return "float32"


def unpack(store: Store, output, progress=None) -> int:
    tensors = list(store.tensors())
    entries = [(t.name, output_dtype(t.codec, t.dtype), list(t.shape)) for t in tensors]
    with SafetensorsWriter(output, entries, metadata={"qmoefmt": store.format_version}) as w:
        for t, (_, dtype, _) in zip(tensors, entries):
            if t.codec == layout.CODEC_DENSE:
                a = np.asarray(t.numpy())
            else:
                a = t.decode().astype(numpy_dtype(dtype))
            w.write(t.name, a)
            if progress:
                progress(1)
    return len(tensors)
