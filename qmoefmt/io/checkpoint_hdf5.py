"""HDF5 checkpoints through h5py: every dataset a tensor, its path with dots."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .checkpoint import _DTYPES, CheckpointError, Entry, dtype_of, unreadable


def hdf5_entries(path: str) -> tuple[list[Entry], Callable[[], None]]:
    import h5py

    try:
        h5 = h5py.File(path, "r")
    except Exception as e:
        raise CheckpointError(f"{path}: cannot open as HDF5: {type(e).__name__}: {e}") from e
    datasets: dict[str, str] = {}
    entries: list[Entry] = []

    def visit(h5_name: str, obj: object) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        name = h5_name.replace("/", ".")
        if name in datasets:
            raise CheckpointError(
                f"{path}: datasets /{datasets[name]} and /{h5_name} both map to tensor {name!r}"
            )
        datasets[name] = h5_name
        entries.append(_hdf5_entry(path, name, obj))

    try:
        h5.visititems(visit)
    except CheckpointError:
        h5.close()
        raise
    except Exception as e:
        h5.close()
        raise CheckpointError(f"{path}: cannot list HDF5 datasets: {type(e).__name__}: {e}") from e
    return entries, h5.close


def _hdf5_entry(path: str, name: str, dataset: Any) -> Entry:
    if dataset.shape is None:
        return unreadable(name, path, (), "HDF5 dataset has a null dataspace")
    shape = tuple(dataset.shape)
    raw = dataset.dtype
    # h5py stores ml_dtypes.bfloat16 as an untagged 2-byte opaque type, so read it back as such.
    if raw.kind == "V" and raw.itemsize == 2 and raw.fields is None:
        dtype = "bfloat16"
    else:
        try:
            dtype = dtype_of(raw)
        except ValueError:
            return unreadable(name, path, shape, f"unsupported dtype {raw}")

    def load() -> np.ndarray:
        # read_direct converts byte order on the way in, so there is a single buffer.
        array = np.empty(shape, _DTYPES[dtype])
        dataset.read_direct(array)
        return array

    return Entry(name, path, shape, dtype, load)
