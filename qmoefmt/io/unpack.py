"""unpack: a store back to dense safetensors, experts dequantized, one tensor at a time."""
from __future__ import annotations

import numpy as np

from ..store.reader import Store
from .checkpoint import numpy_dtype
from .safetensors_writer import SafetensorsWriter


def unpack(store: Store, output, progress=None) -> int:
    tensors = list(store.tensors())
    entries = [(t.name, t.value_dtype, list(t.shape)) for t in tensors]
    with SafetensorsWriter(output, entries, metadata={"qmoefmt": store.format_version}) as w:
        for t, (_, dtype, _) in zip(tensors, entries):
            a = np.asarray(t.numpy()) if not t.unit.expert else t.decode().astype(numpy_dtype(dtype))
            w.write(t.name, a)
            if progress:
                progress(1)
    return len(tensors)
