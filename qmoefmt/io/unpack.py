"""unpack: a store back to dense safetensors, experts dequantized, one tensor at a time:
one file, or (given a shard size) a directory laid out as transformers' `save_pretrained`
writes it: shards, their index and the store's attachments (config.json), so that
`from_pretrained(OUTPUT)` loads it."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass

import numpy as np

from ..errors import QmoeError
from ..store.reader import Store
from .checkpoint import numpy_dtype
from .safetensors_writer import SafetensorsWriter

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(|B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# transformers' default format check reads this; a store of a torch or HDF5 source has none
DEFAULT_METADATA = {"format": "pt"}


class OutputExistsError(QmoeError):
    """The output path is taken and --force was not given, or is of the wrong kind."""


def parse_size(text: str) -> int:
    """'5GB' (decimal, as transformers' max_shard_size), '500MiB' (binary) or bytes."""
    m = _SIZE.fullmatch(text.strip())
    if not m or float(m.group(1)) * _UNITS[m.group(2).upper()] < 1:
        raise ValueError(f"{text!r} is not a size such as 5GB, 500MiB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: list[int]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * numpy_dtype(self.dtype).itemsize


def unpack(store: Store, output, progress=None, force: bool = False,
           max_shard_size: int | None = None) -> dict:
    """Write `store` to the safetensors file `output`, or with `max_shard_size` to the
    directory `output` in shards of at most that many bytes (a larger tensor gets a shard of
    its own). An existing output is replaced only with force=True. Returns what was written:
    {"output", "tensors", "files", "bytes"} (the bytes of the files written)."""
    path = os.fspath(output)
    entries = [Entry(t.name, t.value_dtype, list(t.shape)) for t in store.tensors()]
    metadata = store.source_metadata or DEFAULT_METADATA
    if max_shard_size is None:
        _check_file_output(path, force)
        _write_file(store, path, entries, metadata, progress)
        files, size = [os.path.basename(path)], os.path.getsize(path)
    else:
        _check_directory_output(path, force)
        files = _write_directory(store, path, _shards(entries, max_shard_size), metadata,
                                 progress)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in files)
    return {"output": path, "tensors": len(entries), "files": files, "bytes": size}


def _check_file_output(path: str, force: bool) -> None:
    # Checked before anything is written: else a directory in the way is found only by the
    # final rename, after every tensor was decoded into OUTPUT.partial.
    if os.path.isdir(path):
        raise OutputExistsError(f"{path}: is a directory; give a file path for the output "
                                "(or --max-shard-size to write shards into a directory)")
    # lexists: a dangling symlink is in the way too, and the rename would replace it.
    if os.path.lexists(path) and not force:
        raise OutputExistsError(f"{path}: already exists; use --force to overwrite it")


def _check_directory_output(path: str, force: bool) -> None:
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputExistsError(f"{path}: is not a directory; --max-shard-size writes its "
                                "shards into a directory")
    if os.path.isdir(path) and os.listdir(path) and not force:
        raise OutputExistsError(f"{path}: is a directory that is not empty; use --force to "
                                "write the shards into it")


def _shards(entries: list[Entry], limit: int) -> list[list[Entry]]:
    """Greedy, in store order, as transformers shards: a shard is closed when the next
    tensor would take it past `limit`."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def _write_file(store: Store, path: str, entries: list[Entry], metadata, progress) -> None:
    with SafetensorsWriter(path, [(e.name, e.dtype, e.shape) for e in entries],
                           metadata=metadata) as w:
        for e in entries:
            w.write(e.name, _dense(store, e))
            if progress:
                progress(1)


def _dense(store: Store, e: Entry) -> np.ndarray:
    t = store[e.name]
    return np.asarray(t.numpy()) if not t.unit.expert else \
        t.decode().astype(numpy_dtype(e.dtype))


def _write_directory(store: Store, path: str, shards: list[list[Entry]], metadata,
                     progress) -> list[str]:
    """Everything is written into PATH.partial first and moved in at the end, the index
    last: an interrupted unpack never leaves a directory that loads as complete."""
    staging = path.rstrip(os.sep) + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        names = [SINGLE] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            _write_file(store, os.path.join(staging, name), shard, metadata, progress)
        written = list(names)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for s in shards for e in s)},
                     "weight_map": {e.name: n for n, s in zip(names, shards) for e in s}}
            with open(os.path.join(staging, INDEX), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
            written.append(INDEX)
        for name in store.attachments:      # verbatim, checked against their hashes
            with open(os.path.join(staging, name), "wb") as f:
                f.write(store.attachment(name))
            written.append(name)
        _move_in(staging, path, written)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def _move_in(staging: str, path: str, written: list[str]) -> None:
    if not os.path.isdir(path):
        os.rename(staging, path)
        return
    # Into an existing directory (--force): weights of an earlier save that this one does
    # not overwrite would be loaded beside it, so they go first, and the index comes last.
    for name in os.listdir(path):
        if (name in (SINGLE, INDEX) or _SHARD.fullmatch(name)) and name not in written:
            os.remove(os.path.join(path, name))
    for name in sorted(written, key=lambda n: n == INDEX):
        os.replace(os.path.join(staging, name), os.path.join(path, name))
