"""Read model checkpoints one tensor at a time, never holding the whole model.

Safetensors files are read by parsing the header here and ``readinto`` of each tensor's
byte range into a fresh array, rather than ``safe_open`` or ``np.memmap``: iterating a
2 GB file of 25 MB bf16 tensors, it added one tensor (24 MiB) to peak RSS where
memmap-and-copy added two and ``safe_open`` needs torch (~190 MiB) for bf16, and it was
the fastest of the three.
PyTorch files go through ``torch.load(weights_only=True, mmap=True)``: the pages it maps
count toward RSS as tensors are read (clean file pages the kernel can drop), and legacy
non-zip files cannot be mapped at all, so they are loaded whole. HDF5 goes through h5py.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
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
class _Entry:
    """What a format backend knows about a tensor before reading it."""

    name: str
    file: str
    shape: tuple[int, ...]
    dtype: str | None  # None, with load None, when ``problem`` says why it cannot be read
    load: Callable[[], np.ndarray] | None
    problem: str = ""


def _unreadable(name: str, file: str, shape: tuple[int, ...], problem: str) -> _Entry:
    return _Entry(name, file, shape, None, None, problem)


class Checkpoint:
    """An open checkpoint; iterate ``tensors()`` and read each one as needed."""

    def __init__(
        self, path: str, fmt: str, entries: list[_Entry], on_close: Callable[[], None]
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
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file or directory")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
        entries = sorted(_safetensors_file_entries(path), key=lambda e: e.name)
        return Checkpoint(path, "safetensors", entries, _nothing)
    if suffix in _TORCH_SUFFIXES:
        return Checkpoint(path, "torch", _torch_entries(path), _nothing)
    if suffix in _HDF5_SUFFIXES:
        entries, on_close = _hdf5_entries(path)
        return Checkpoint(path, "hdf5", entries, on_close)
    known = [".safetensors", *_TORCH_SUFFIXES, *_HDF5_SUFFIXES]
    raise CheckpointError(f"{path}: unknown extension {suffix!r}, expected one of {known}")


def _nothing() -> None:
    pass


# --- safetensors -------------------------------------------------------------------


def _safetensors_dir_entries(directory: str) -> list[_Entry]:
    index_path = os.path.join(directory, _INDEX_NAME)
    if os.path.isfile(index_path):
        return _indexed_shard_entries(directory, index_path)
    shards = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not shards:
        raise CheckpointError(f"{directory}: directory holds no *.safetensors files")
    by_name: dict[str, _Entry] = {}
    for shard in shards:
        for entry in _safetensors_file_entries(os.path.join(directory, shard)):
            if entry.name in by_name:
                other = by_name[entry.name].file
                raise CheckpointError(f"{entry.file}: tensor {entry.name!r} is also in {other}")
            by_name[entry.name] = entry
    return [by_name[name] for name in sorted(by_name)]


def _indexed_shard_entries(directory: str, index_path: str) -> list[_Entry]:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise ValueError("weight_map is not a mapping of tensor name to file name")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: invalid index: {type(e).__name__}: {e}") from e
    entries: list[_Entry] = []
    for shard in sorted(set(weight_map.values())):
        # Names from the index must stay inside the directory.
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: shard {shard!r} is not a plain file name")
        shard_path = os.path.join(directory, shard)
        if not os.path.isfile(shard_path):
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


def _safetensors_file_entries(path: str) -> list[_Entry]:
    header, data_start = _read_safetensors_header(path)
    file_size = os.path.getsize(path)
    entries: list[_Entry] = []
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
            entries.append(_unreadable(name, path, shape, f"unsupported dtype {raw_dtype}"))
            continue
        if end - begin != math.prod(shape) * _DTYPES[dtype].itemsize:
            raise CheckpointError(
                f"{path}: tensor {name!r}: {end - begin} bytes of data for {raw_dtype}{list(shape)}"
            )
        load = _safetensors_loader(path, data_start + begin, shape, dtype)
        entries.append(_Entry(name, path, shape, dtype, load))
    # As in the reference loader: tensors tile the data region, no gaps or overlaps.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise CheckpointError(f"{path}: tensor {name!r}: data offsets overlap or leave a gap")
        position = end
    return entries


def _read_safetensors_header(path: str) -> tuple[dict[str, Any], int]:
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


# --- PyTorch -----------------------------------------------------------------------


def _torch_entries(path: str) -> list[_Entry]:
    import torch  # imported here: it is slow to import and only this format needs it

    try:
        # mmap needs the zipfile format; legacy pickles are loaded into memory.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # weights_only refusals, corrupt archives, I/O errors
        problem = _torch_problem(e)
        raise CheckpointError(f"{path}: cannot load as a PyTorch state dict: {problem}") from e
    state = _find_state_dict(obj, path, torch.Tensor)
    entries = []
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: state dict key {name!r} is not a string")
        dtype = str(tensor.dtype).removeprefix("torch.")
        shape = tuple(tensor.shape)
        if dtype not in _DTYPES or tensor.layout != torch.strided:
            problem = f"unsupported dtype {tensor.dtype} / layout {tensor.layout}"
            entries.append(_unreadable(name, path, shape, problem))
        else:
            entries.append(_Entry(name, path, shape, dtype, _torch_loader(tensor, dtype)))
    return entries


def _torch_problem(error: Exception) -> str:
    # torch's refusal is a page of advice that ends in "set weights_only=False", which is
    # exactly what we must not do; keep only its one-line diagnosis.
    marker = "WeightsUnpickler error: "
    text = str(error)
    if marker in text:
        detail = text.split(marker, 1)[1].split(". ", 1)[0]
        return f"refused by weights_only unpickling, nothing was executed: {detail}"
    return f"{type(error).__name__}: {text}"


def _find_state_dict(obj: object, path: str, tensor_type: type) -> dict[Any, Any]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    if not all(isinstance(v, tensor_type) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    for name, value in obj.items():
        if not isinstance(value, tensor_type):
            kind = type(value).__name__
            raise CheckpointError(f"{path}: entry {name!r} is a {kind}, not a tensor")
    return obj


def _torch_loader(tensor: Any, dtype: str) -> Callable[[], np.ndarray]:
    import torch

    # Saved nn.Parameters come back requiring grad, which .numpy() refuses.
    tensor = tensor.detach()

    def load() -> np.ndarray:
        if dtype == "bfloat16":  # numpy has no bfloat16: reinterpret the bits
            source = tensor.view(torch.int16).numpy().view(_DTYPES[dtype])
        else:
            source = tensor.numpy()
        # Copy so the result owns its memory instead of pinning the file mapping.
        return np.array(source, dtype=_DTYPES[dtype], order="C", copy=True)

    return load


# --- HDF5 --------------------------------------------------------------------------


def _hdf5_entries(path: str) -> tuple[list[_Entry], Callable[[], None]]:
    import h5py

    try:
        h5 = h5py.File(path, "r")
    except Exception as e:
        raise CheckpointError(f"{path}: cannot open as HDF5: {type(e).__name__}: {e}") from e
    datasets: dict[str, str] = {}
    entries: list[_Entry] = []

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


def _hdf5_entry(path: str, name: str, dataset: Any) -> _Entry:
    if dataset.shape is None:
        return _unreadable(name, path, (), "HDF5 dataset has a null dataspace")
    shape = tuple(dataset.shape)
    raw = dataset.dtype
    # h5py stores ml_dtypes.bfloat16 as an untagged 2-byte opaque type, so read it back as such.
    if raw.kind == "V" and raw.itemsize == 2 and raw.fields is None:
        dtype = "bfloat16"
    else:
        try:
            dtype = dtype_of(raw)
        except ValueError:
            return _unreadable(name, path, shape, f"unsupported dtype {raw}")

    def load() -> np.ndarray:
        # read_direct converts byte order on the way in, so there is a single buffer.
        array = np.empty(shape, _DTYPES[dtype])
        dataset.read_direct(array)
        return array

    return _Entry(name, path, shape, dtype, load)
