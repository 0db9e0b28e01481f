"""Read model checkpoints one tensor at a time, never holding the whole model.

Safetensors files are read by parsing the header here and ``readinto`` of each tensor's
byte range into a fresh array, rather than ``safe_open`` or ``np.memmap``: iterating a
2 GB file of 25 MB bf16 tensors, it added one tensor (24 MiB) to peak RSS where
memmap-and-copy added two and ``safe_open`` needs torch (~190 MiB) for bf16, and it was
the fastest of the three.
PyTorch files (`checkpoint_torch`) and HDF5 files (`checkpoint_hdf5`) have their own
modules.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import ml_dtypes
import numpy as np

from ..errors import QmoeError

_DTYPES: dict[str, np.dtype] = {
    "bool": np.dtype("bool"),
    "int8": np.dtype("int8"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint8": np.dtype("uint8"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}

# Names of the safetensors header dtypes, keyed by our dtype strings.
SAFETENSORS_DTYPES: dict[str, str] = {
    "bool": "BOOL",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
}
_FROM_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# The reference implementation rejects larger headers; so do we, before allocating one.
MAX_SAFETENSORS_HEADER = 100_000_000

_TORCH_SUFFIXES = (".pt", ".bin", ".pth")
_HDF5_SUFFIXES = (".h5", ".hdf5")
_INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(QmoeError):
    """A checkpoint cannot be read; the message names the file and, if any, the tensor."""


def numpy_dtype(name: str) -> np.dtype:
    """The little-endian numpy (or ml_dtypes) dtype for one of our dtype strings."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def dtype_of(array: np.ndarray | np.dtype) -> str:
    """Our dtype string for an array (or dtype), whatever its byte order."""
    dt = np.dtype(getattr(array, "dtype", array))
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    for name, candidate in _DTYPES.items():
        if dt == candidate:
            return name
    raise ValueError(f"unsupported dtype {dt}")


class TensorSource:
    """One tensor of a checkpoint: metadata now, data only when ``read()`` is called."""

    __slots__ = ("name", "shape", "dtype", "_load", "_checkpoint")

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: str,
        load: Callable[[], np.ndarray],
        checkpoint: Checkpoint,
    ) -> None:
        self.name = name
        self.shape = shape
        self.dtype = dtype
        self._load = load
        self._checkpoint = checkpoint

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPES[self.dtype].itemsize

    def read(self) -> np.ndarray:
        """A fresh C-contiguous little-endian array owning its memory."""
        where = f"{self._checkpoint.path}: tensor {self.name!r}"
        if self._checkpoint.closed:
            raise CheckpointError(f"{where}: checkpoint is closed")
        try:
            array = self._load()
        except Exception as e:  # any library failure becomes a CheckpointError
            raise CheckpointError(f"{where}: read failed: {type(e).__name__}: {e}") from e
        return array

    def __repr__(self) -> str:
        return f"TensorSource({self.name!r}, {self.dtype}, {list(self.shape)})"


@dataclass(frozen=True)
class Entry:
    """What a format backend knows about a tensor before reading it."""

    name: str
    file: str
    shape: tuple[int, ...]
    dtype: str | None  # None, with load None, when ``problem`` says why it cannot be read
    load: Callable[[], np.ndarray] | None
    problem: str = ""


def unreadable(name: str, file: str, shape: tuple[int, ...], problem: str) -> Entry:
    return Entry(name, file, shape, None, None, problem)


class Checkpoint:
    """An open checkpoint; iterate ``tensors()`` and read each one as needed."""

    def __init__(
        self, path: str, fmt: str, entries: list[Entry], on_close: Callable[[], None]
    ) -> None:
        self.path = path
        self.format = fmt
        self.closed = False
        self._entries = entries
        self._on_close = on_close

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return [entry.name for entry in self._entries]

    def tensors(self) -> Iterator[TensorSource]:
        """Yield every tensor in order; an unreadable one raises when it is reached.

        Nothing is read here, so ``list(ckpt.tensors())`` is a cheap way to find an
        unsupported tensor before starting a long job.
        """
        for entry in self._entries:
            if entry.dtype is None or entry.load is None:
                raise CheckpointError(f"{entry.file}: tensor {entry.name!r}: {entry.problem}")
            yield TensorSource(entry.name, entry.shape, entry.dtype, entry.load, self)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._on_close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, format={self.format!r}, tensors={len(self)})"


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a safetensors file or shard directory, a PyTorch state dict, or an HDF5 file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return Checkpoint(path, "safetensors", _safetensors_dir_entries(path), _nothing)
    _check_regular(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        entries = sorted(_safetensors_file_entries(path), key=lambda e: e.name)
        return Checkpoint(path, "safetensors", entries, _nothing)
    # The PyTorch and HDF5 readers are imported here: torch and h5py are slow to import and
    # only their format needs them (torch is an optional extra).
    if suffix in _TORCH_SUFFIXES:
        from .checkpoint_torch import torch_entries
        return Checkpoint(path, "torch", torch_entries(path), _nothing)
    if suffix in _HDF5_SUFFIXES:
        from .checkpoint_hdf5 import hdf5_entries
        entries, on_close = hdf5_entries(path)
        return Checkpoint(path, "hdf5", entries, on_close)
    known = [".safetensors", *_TORCH_SUFFIXES, *_HDF5_SUFFIXES]
    raise CheckpointError(f"{path}: unknown extension {suffix!r}, expected one of {known}")


def _nothing() -> None:
    pass


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISDIR, "a directory"))


def _check_regular(path: str) -> None:
    """A regular file, before anything opens it: reading /dev/zero or a FIFO never ends."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file or directory") from None
    except (OSError, ValueError) as e:       # ValueError: a NUL in the path
        raise CheckpointError(f"{path}: cannot be read: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(mode):
        kind = next((what for test, what in _KINDS if test(mode)), "not a regular file")
        raise CheckpointError(f"{path}: {kind}, not a regular file: a checkpoint is a file "
                              "or a directory of safetensors files")


# --- safetensors -------------------------------------------------------------------


def _safetensors_dir_entries(directory: str) -> list[Entry]:
    index_path = os.path.join(directory, _INDEX_NAME)
    if os.path.isfile(index_path):
        return _indexed_shard_entries(directory, index_path)
    shards = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not shards:
        raise CheckpointError(f"{directory}: directory holds no *.safetensors files")
    by_name: dict[str, Entry] = {}
    for shard in shards:
        for entry in _safetensors_file_entries(os.path.join(directory, shard)):
            if entry.name in by_name:
                other = by_name[entry.name].file
                raise CheckpointError(f"{entry.file}: tensor {entry.name!r} is also in {other}")
            by_name[entry.name] = entry
    return [by_name[name] for name in sorted(by_name)]


def _indexed_shard_entries(directory: str, index_path: str) -> list[Entry]:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise ValueError("weight_map is not a mapping of tensor name to file name")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{index_path}: invalid index: {type(e).__name__}: {e}") from e
    entries: list[Entry] = []
    for shard in sorted(set(weight_map.values())):
        # Names from the index must stay inside the directory.
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: shard {shard!r} is not a plain file name")
        shard_path = os.path.join(directory, shard)
        if not os.path.lexists(shard_path):
            raise CheckpointError(f"{index_path}: shard {shard_path} does not exist")
        shard_entries = _safetensors_file_entries(shard_path)
        listed = {name for name, file in weight_map.items() if file == shard}
        present = {entry.name for entry in shard_entries}
        if listed != present:
            raise CheckpointError(
                f"{shard_path}: disagrees with {index_path}: "
                f"missing {sorted(listed - present)[:5]}, unlisted {sorted(present - listed)[:5]}"
            )
        entries.extend(shard_entries)
    return sorted(entries, key=lambda e: e.name)


def _safetensors_file_entries(path: str) -> list[Entry]:
    header, data_start = _read_safetensors_header(path)
    file_size = os.path.getsize(path)
    entries: list[Entry] = []
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            raw_dtype = info["dtype"]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            if not (
                isinstance(raw_dtype, str)
                and all(type(d) is int and d >= 0 for d in shape)
                and type(begin) is int
                and type(end) is int
                and 0 <= begin <= end
            ):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: tensor {name!r}: malformed header entry {info!r}"
            ) from None
        if data_start + end > file_size:
            raise CheckpointError(
                f"{path}: tensor {name!r}: data ends at byte {data_start + end} but the file "
                f"has {file_size} bytes (truncated?)"
            )
        spans.append((begin, end, name))
        dtype = _FROM_SAFETENSORS.get(raw_dtype)
        if dtype is None:
            entries.append(unreadable(name, path, shape, f"unsupported dtype {raw_dtype}"))
            continue
        if end - begin != math.prod(shape) * _DTYPES[dtype].itemsize:
            raise CheckpointError(
                f"{path}: tensor {name!r}: {end - begin} bytes of data for {raw_dtype}{list(shape)}"
            )
        load = _safetensors_loader(path, data_start + begin, shape, dtype)
        entries.append(Entry(name, path, shape, dtype, load))
    # As in the reference loader: tensors tile the data region, no gaps or overlaps.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise CheckpointError(f"{path}: tensor {name!r}: data offsets overlap or leave a gap")
        position = end
    return entries


def _read_safetensors_header(path: str) -> tuple[dict[str, Any], int]:
    _check_regular(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_SAFETENSORS_HEADER or length > os.path.getsize(path) - 8:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header length {length})"
                )
            raw = f.read(length)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt safetensors header: nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: not a JSON object")
    return header, 8 + length


def _safetensors_loader(
    path: str, offset: int, shape: tuple[int, ...], dtype: str
) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        array = np.empty(shape, _DTYPES[dtype])
        # Opening per read keeps no descriptors alive across thousands of shards.
        with open(path, "rb") as f:
            f.seek(offset)
            got = f.readinto(array.reshape(-1).view(np.uint8))
        if got != array.nbytes:
            raise EOFError(f"got {got} of {array.nbytes} bytes, file truncated?")
        return array

    return load


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """A safetensors checkpoint's `__metadata__` (of a shard directory: the one its shards
    share), or None where there is none, or the shards disagree, or it is not the
    string-to-string map the safetensors format defines."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted({e.file for e in _safetensors_dir_entries(path)})
    elif path.lower().endswith(".safetensors"):
        files = [path]
    else:
        return None
    found = [_read_safetensors_header(f)[0].get("__metadata__") for f in files]
    first = found[0] if found else None
    if not isinstance(first, dict) or any(m != first for m in found) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in first.items()):
        return None
    return first
