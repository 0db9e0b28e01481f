"""unpack: a store back to dense safetensors, experts dequantized, one tensor at a time."""
from __future__ import annotations

import os

import numpy as np

from ..errors import QmoeError
from ..store.reader import Store
from .checkpoint import numpy_dtype
from .safetensors_writer import SafetensorsWriter


class OutputExistsError(QmoeError):
    """The output path is taken: a directory, or a file without force=True."""


def unpack(store: Store, output, progress=None, force: bool = False) -> int:
    """Write `store` to the safetensors file `output`; an existing file is replaced only
    with force=True, a directory never."""
    path = os.fspath(output)
    # Checked before anything is written: else a directory in the way is found only by the
    # final rename, after every tensor was decoded into OUTPUT.partial.
    if os.path.isdir(path):
        raise OutputExistsError(f"{path}: is a directory; give a file path for the output")
    # lexists: a dangling symlink is in the way too, and the rename would replace it.
    if os.path.lexists(path) and not force:
        raise OutputExistsError(f"{path}: already exists; use --force to overwrite it")
    tensors = list(store.tensors())
    entries = [(t.name, t.value_dtype, list(t.shape)) for t in tensors]
    with SafetensorsWriter(path, entries, metadata={"qmoefmt": store.format_version}) as w:
        for t, (_, dtype, _) in zip(tensors, entries):
            a = np.asarray(t.numpy()) if not t.unit.expert else t.decode().astype(numpy_dtype(dtype))
            w.write(t.name, a)
            if progress:
                progress(1)
    return len(tensors)
