"""Streaming safetensors writer: the header goes out first, then one tensor at a time.

``safetensors.save_file`` needs every tensor in memory at once; here only the tensor
being written is. Output goes to ``path + ".partial"`` and is renamed on a successful
``close()``, so an interrupted run never leaves a file that looks complete.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from types import TracebackType

import numpy as np

from .checkpoint import MAX_SAFETENSORS_HEADER, SAFETENSORS_DTYPES, dtype_of, numpy_dtype


class SafetensorsWriter:
    """Write tensors declared up front, in declaration order, without holding them all.

    Use as a context manager: leaving the block normally calls ``close()``; leaving it
    with an exception calls ``abort()``, which deletes the partial file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Sequence[tuple[str, str, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.partial_path = self.path + ".partial"
        self._entries = [_check_entry(entry) for entry in entries]
        counts = Counter(name for name, _, _ in self._entries)
        dupes = sorted(name for name, count in counts.items() if count > 1)
        if dupes:
            raise ValueError(f"{self.path}: duplicate tensor names {dupes}")
        header = _build_header(self._entries, metadata, self.path)
        self._next = 0
        self._file = open(self.partial_path, "wb")
        try:
            self._file.write(struct.pack("<Q", len(header)))
            self._file.write(header)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, array: np.ndarray) -> None:
        """Append the next tensor; it must match the next declared (name, dtype, shape)."""
        if self._file is None:
            raise ValueError(f"{self.path}: writer is closed")
        if self._next >= len(self._entries):
            raise ValueError(f"{self.path}: all tensors already written, got extra {name!r}")
        want_name, want_dtype, want_shape = self._entries[self._next]
        if name != want_name:
            raise ValueError(f"{self.path}: expected tensor {want_name!r} next, got {name!r}")
        array = np.asarray(array)
        got_dtype = dtype_of(array)
        if got_dtype != want_dtype:
            raise ValueError(f"{self.path}: tensor {name!r} declared {want_dtype}, got {got_dtype}")
        if array.shape != want_shape:
            raise ValueError(
                f"{self.path}: tensor {name!r} declared shape {want_shape}, got {array.shape}"
            )
        # reshape(-1) makes 0-d arrays viewable as bytes; the dtype forces little-endian.
        data = np.ascontiguousarray(array, dtype=numpy_dtype(want_dtype)).reshape(-1)
        self._file.write(data.view(np.uint8))
        self._next += 1

    def close(self) -> None:
        """Finish the file and move it into place; fails if any tensor is missing."""
        if self._file is None:
            return
        if self._next < len(self._entries):
            missing = [name for name, _, _ in self._entries[self._next :]]
            self.abort()
            raise ValueError(f"{self.path}: closed before writing tensors {missing}")
        try:
            # fsync before the rename, or a crash could leave a complete-looking file of zeros.
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self.partial_path, self.path)
        except BaseException:
            # __exit__ does not abort when close() itself fails (a full disk, a directory
            # at the final path): without this the whole partial file would stay behind.
            self.abort()
            raise

    def abort(self) -> None:
        """Close and delete the partial file; the final path is never created."""
        if self._file is not None:
            self._file.close()
            self._file = None
        try:
            os.remove(self.partial_path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_entry(entry: tuple[str, str, Sequence[int]]) -> tuple[str, str, tuple[int, ...]]:
    name, dtype, shape = entry
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise ValueError(f"invalid tensor name {name!r}")
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name!r}: unsupported dtype {dtype!r}")
    dims = tuple(shape)
    if not all(_is_dim(d) for d in dims):
        raise ValueError(f"tensor {name!r}: invalid shape {shape!r}")
    return name, dtype, tuple(int(d) for d in dims)


def _is_dim(d: object) -> bool:
    return isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0


def _build_header(
    entries: list[tuple[str, str, tuple[int, ...]]],
    metadata: Mapping[str, str] | None,
    path: str,
) -> bytes:
    header: dict[str, object] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"{path}: metadata keys and values must all be str")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * numpy_dtype(dtype).itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad with spaces to 8 bytes, as the reference writer does, so tensor data is aligned.
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_SAFETENSORS_HEADER:
        raise ValueError(f"{path}: header of {len(raw)} bytes exceeds the safetensors limit")
    return raw
