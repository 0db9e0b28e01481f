"""The store's files (spec §4, §9): metadata documents read within limits, and array
chunks checked against their index descriptor and memory-mapped. Knows keys and files,
never codecs.
"""
from __future__ import annotations

import math
import stat
from pathlib import Path

import numpy as np

from ..errors import FormatError, LimitError
from ..format import constants as C
from ..format import metadata as M
from ..format.constants import MAX_NODE_METADATA, MAX_ROOT_METADATA
from ..format.records import check_shape, check_version
from .archive import ArchivePath, map_chunk


def read_metadata(path: Path, limit: int, missing: str = "missing") -> bytes:
    """A metadata file's bytes, its size checked against `limit` before it is read."""
    try:
        st = path.stat()
    except (OSError, ValueError):       # ValueError: a NUL in the path
        raise FormatError(str(path), missing) from None
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(str(path), "not a regular file")
    if st.st_size > limit:
        raise LimitError(str(path), f"{st.st_size} bytes of metadata, limit is {limit}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise FormatError(str(path), f"cannot be read ({e.strerror or e})") from None


def load_json(path: Path, limit: int = MAX_NODE_METADATA):
    raw = read_metadata(path, limit)
    try:
        return M.loads(raw)
    except ValueError as e:
        raise FormatError(str(path), f"not valid JSON ({e})") from None


def read_root(root: Path) -> dict:
    """The root's qmoefmt attributes, with checksum and version checked."""
    path = root / C.ROOT_META
    if not root.exists():
        raise FormatError(str(root), "does not exist")
    if not root.is_dir():
        raise FormatError(str(root), "not a directory (a store is a directory)")
    raw = read_metadata(path, MAX_ROOT_METADATA, "missing: not a qmoefmt store")
    ok = M.root_checksum_ok(raw)
    if ok is None:
        raise FormatError(str(path), "no qmoefmt checksum field")
    if not ok:
        raise FormatError(str(path), "checksum mismatch: the root metadata was modified or damaged")
    too_big = M.root_size_problem(raw)
    if too_big:
        raise LimitError(str(path), too_big)
    try:
        doc = M.loads(raw)
    except ValueError as e:
        raise FormatError(str(path), f"not a qmoefmt root group: not valid JSON ({e})") from None
    try:
        meta = doc["attributes"]["qmoefmt"]
    except (KeyError, TypeError):
        raise FormatError(str(path), "not a qmoefmt root group") from None
    if not isinstance(meta, dict):
        raise FormatError(str(path), "attributes.qmoefmt is not an object")
    check_version(meta.get("format_version"), str(path))
    return meta


def check_array_file(root: Path, node: str, desc: dict, check_crc: bool = True,
                     data_type: str | None = None, shape=None) -> np.ndarray:
    """Validate one array's descriptor and chunk file; return it memory-mapped."""
    where = f"{root}/{node}"
    if not isinstance(desc, dict):
        raise FormatError(where, "array descriptor is not an object")
    dt = desc.get("data_type")
    if data_type is not None and dt not in (data_type if isinstance(data_type, tuple) else (data_type,)):
        raise FormatError(where, f"data_type {dt!r}, expected {data_type}")
    if dt not in C.STORED_DTYPE.values():
        raise FormatError(where, f"unsupported data_type {dt!r}")
    shp = check_shape(desc.get("shape"), where, "shape")
    if shape is not None and shp != tuple(shape):
        raise FormatError(where, f"shape {list(shp)}, expected {list(shape)}")
    crc = desc.get("crc32c")
    if not isinstance(crc, int):
        raise FormatError(where, "crc32c missing")
    npdt = M.np_dtype(dt)
    if not M.has_chunk(shp):
        if crc != M.crc32c(b""):
            raise FormatError(where, "crc32c mismatch")
        return np.zeros(shp, npdt)
    chunk = root / node / M.chunk_key(shp)
    nbytes = math.prod(shp) * npdt.itemsize
    try:
        size = chunk.stat().st_size
    except OSError:
        raise FormatError(str(chunk), "chunk file missing") from None
    if not chunk.is_file():
        raise FormatError(str(chunk), "chunk is not a file")
    if size != nbytes:
        raise FormatError(str(chunk), f"{size} bytes, expected {nbytes} for shape {list(shp)} {dt}")
    arr = map_chunk(chunk, npdt, shp)
    if check_crc and M.crc32c(memoryview(arr.reshape(-1).view(np.uint8))) != crc:
        raise FormatError(str(chunk), "crc32c mismatch: the data was modified or damaged")
    return arr




def file_size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def tree_size(root) -> int:
    """Bytes of every file under `root` (of the archive, for one)."""
    if isinstance(root, ArchivePath):
        return root.archive.size if not root.key else sum(
            p.stat().st_size for p in root.rglob("*") if p.is_file())
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
