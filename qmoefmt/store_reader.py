"""Reading stores (spec §3, §4, §9): `qmoefmt.open(path)`.

Opening reads one file, the root zarr.json, whose index describes every tensor; arrays
are memory-mapped from their single chunk file on first use. Every declared size is
checked against the limits and against the file before anything is allocated or a
decoder runs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from . import layout, uintdict, uintpack
from .codec import decode_symbols, decode_values
from .dictionary import CODEWORDS, TABLES, Dictionary, validate_tables
from .errors import FormatError, IncompleteStoreError, LimitError, VersionError
from .ternary import bf16_to_float32, scales_to_float
from .layout import crc32c

# Resource limits (spec §9), enforced before allocation.
MAX_ROOT_METADATA = 1 << 30
MAX_NODE_METADATA = 1 << 20
MAX_RANK = 8
MAX_ELEMENTS = 1 << 40
MAX_TENSORS = 10_000_000
MAX_DICTIONARIES = 1024
MAX_NAME_BYTES = 4096


def _read_metadata(path: Path, limit: int, missing: str = "missing") -> bytes:
    """A metadata file's bytes, its size checked against `limit` before it is read."""
    try:
        size = path.stat().st_size
    except OSError:
        raise FormatError(str(path), missing) from None
    if size > limit:
        raise LimitError(str(path), f"{size} bytes of metadata, limit is {limit}")
    return path.read_bytes()


def load_json(path: Path, limit: int = MAX_NODE_METADATA):
    raw = _read_metadata(path, limit)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(str(path), f"not valid JSON ({e})") from None


def read_root(root: Path) -> dict:
    """The root's qmoefmt attributes, with checksum and version checked."""
    path = root / layout.ROOT_META
    if not root.is_dir():
        raise FormatError(str(root), "not a directory (a store is a directory)")
    raw = _read_metadata(path, MAX_ROOT_METADATA, "missing: not a qmoefmt store")
    ok = layout.root_checksum_ok(raw)
    if ok is None:
        raise FormatError(str(path), "no qmoefmt checksum field")
    if not ok:
        raise FormatError(str(path), "checksum mismatch: the root metadata was modified or damaged")
    try:
        doc = json.loads(raw)
        meta = doc["attributes"]["qmoefmt"]
    except (ValueError, KeyError, TypeError):
        raise FormatError(str(path), "not a qmoefmt root group") from None
    if not isinstance(meta, dict):
        raise FormatError(str(path), "attributes.qmoefmt is not an object")
    check_version(meta.get("format_version"), str(path))
    return meta


def check_version(version, where: str) -> None:
    if not isinstance(version, str):
        raise FormatError(where, f"format_version {version!r} is not a string")
    try:
        major, minor = (int(x) for x in str(version).split("."))
    except ValueError:
        raise FormatError(where, f"format_version {version!r} is not MAJOR.MINOR") from None
    if major != layout.FORMAT_MAJOR:
        raise VersionError(where, f"format_version {version} has major {major}; this reader "
                                  f"reads major {layout.FORMAT_MAJOR} only")


def _shape(value, where: str, field: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(n, int) and not isinstance(n, bool)
                                              for n in value):
        raise FormatError(where, f"{field} is not a list of integers")
    if len(value) > MAX_RANK:
        raise LimitError(where, f"{field} has rank {len(value)}, limit is {MAX_RANK}")
    if any(n < 0 for n in value):
        raise FormatError(where, f"{field} has a negative dimension")
    if math.prod(value) > MAX_ELEMENTS or any(n > MAX_ELEMENTS for n in value):
        raise LimitError(where, f"{field} {value} exceeds {MAX_ELEMENTS} elements")
    return tuple(value)


def _check_node_path(path, group: str, where: str) -> None:
    """`<group>/<one segment>`, the segment not empty, '.' or '..' (spec §4.3)."""
    ok = isinstance(path, str) and path.startswith(group + "/")
    seg = path[len(group) + 1:] if ok else ""
    if not ok or not seg or "/" in seg or seg in (".", "..") or "\\" in seg:
        raise FormatError(where, f"bad path {path!r}")


def _check_arrays_index(arrays, where: str) -> None:
    if not isinstance(arrays, dict) or not arrays:
        raise FormatError(where, "arrays missing")
    for name, desc in arrays.items():
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise FormatError(where, f"bad array name {name!r}")
        if (not isinstance(desc, dict) or not isinstance(desc.get("data_type"), str)
                or not isinstance(desc.get("crc32c"), int) or isinstance(desc.get("crc32c"), bool)):
            raise FormatError(where, f"array {name!r}: malformed descriptor")
        _shape(desc.get("shape"), f"{where}: array {name!r}", "shape")


def check_array_file(root: Path, node: str, desc: dict, check_crc: bool = True,
                     data_type: str | None = None, shape=None) -> np.ndarray:
    """Validate one array's descriptor and chunk file; return it memory-mapped."""
    where = f"{root}/{node}"
    if not isinstance(desc, dict):
        raise FormatError(where, "array descriptor is not an object")
    dt = desc.get("data_type")
    if data_type is not None and dt not in (data_type if isinstance(data_type, tuple) else (data_type,)):
        raise FormatError(where, f"data_type {dt!r}, expected {data_type}")
    if dt not in layout.STORED_DTYPE.values():
        raise FormatError(where, f"unsupported data_type {dt!r}")
    shp = _shape(desc.get("shape"), where, "shape")
    if shape is not None and shp != tuple(shape):
        raise FormatError(where, f"shape {list(shp)}, expected {list(shape)}")
    crc = desc.get("crc32c")
    if not isinstance(crc, int):
        raise FormatError(where, "crc32c missing")
    npdt = layout.np_dtype(dt)
    if not layout.has_chunk(shp):
        if crc != crc32c(b""):
            raise FormatError(where, "crc32c mismatch")
        return np.zeros(shp, npdt)
    chunk = root / node / layout.chunk_key(shp)
    nbytes = math.prod(shp) * npdt.itemsize
    try:
        size = chunk.stat().st_size
    except OSError:
        raise FormatError(str(chunk), "chunk file missing") from None
    if not chunk.is_file():
        raise FormatError(str(chunk), "chunk is not a file")
    if size != nbytes:
        raise FormatError(str(chunk), f"{size} bytes, expected {nbytes} for shape {list(shp)} {dt}")
    if shp == ():
        arr = np.fromfile(chunk, dtype=npdt, count=1).reshape(())
    else:
        arr = np.memmap(chunk, dtype=npdt, mode="r", shape=shp)
    if check_crc and crc32c(memoryview(arr.reshape(-1).view(np.uint8))) != crc:
        raise FormatError(str(chunk), "crc32c mismatch: the data was modified or damaged")
    return arr


class Tensor:
    """One stored tensor. `decode()` gives float32 weights (dequantized for coded
    tensors), `symbols()` the ternary symbols (0 = zero, 1 = lo, 2 = hi)."""

    def __init__(self, store: "Store", record: dict):
        self._store = store
        self.record = record
        self.name: str = record["name"]
        self.path: str = record["path"]
        self.codec: str = record["codec"]
        self.dtype: str = record["dtype"]
        self.shape: tuple[int, ...] = tuple(record["shape"])

    def __repr__(self) -> str:
        return f"<Tensor {self.name} {list(self.shape)} {self.dtype} {self.codec}>"

    @property
    def rows_cols(self) -> tuple[int, int]:
        cols = self.shape[-1] if self.shape else 1
        return (math.prod(self.shape[:-1]) if self.shape else 1), cols

    @property
    def nbytes(self) -> int:
        """Bytes of every array of this tensor, metadata files included."""
        return self._store._tensor_bytes(self)

    @property
    def dictionary(self) -> str | None:
        return self.record.get("dictionary")

    def array(self, name: str, check_crc: bool = True) -> np.ndarray:
        where = f"{self._store.path}/{self.path}"
        arrays = self.record["arrays"]
        if name not in arrays:
            raise FormatError(where, f"array {name!r} missing from the index")
        rows, cols = self.rows_cols
        if self.codec in (layout.CODEC_UINT, layout.CODEC_UINT_DICT):
            bits, groups = self._uint_params()
            idx = str(uintdict.index_dtype(cols).newbyteorder("="))
            expect = {"q": ("uint8", (rows, uintpack.row_bytes(cols, bits))),
                      "scales": ("uint16", (rows, groups)),
                      "zeros": ("uint8", (rows, groups)),
                      "codes": ("uint16", None),
                      "row_codes": (("uint16", "uint32"), (rows,)),
                      "row_escapes": (idx, (rows,)),
                      "escape_cols": (idx, None),
                      "escape_levels": ("uint8", None)}.get(name)
            if name not in layout.CODEC_ARRAYS[self.codec]:
                expect = None
        else:
            expect = {
                "codes": ("uint16", None),
                "row_codes": (("uint16", "uint32"), (rows,)),
                "scales": ("uint16", (rows, 2)),
                "data": (layout.STORED_DTYPE.get(self.dtype, "?"), self.shape),
            }.get(name)
        if expect is None:
            raise FormatError(where, f"array {name!r} does not belong to codec {self.codec}")
        arr = check_array_file(self._store.path, f"{self.path}/{name}", arrays[name],
                               check_crc, *expect)
        if name == "codes" and (arr.ndim != 1 or arr.shape[0] > rows * cols):
            raise FormatError(f"{where}/codes", f"{arr.shape} codewords for {rows}x{cols} symbols")
        if name in ("escape_cols", "escape_levels") and (arr.ndim != 1 or arr.shape[0] > rows * cols):
            raise FormatError(f"{where}/{name}", f"shape {list(arr.shape)} for {rows}x{cols} levels")
        return arr

    def _uint_params(self) -> tuple[int, int]:
        """(bits, groups) of a uint-packed tensor, validated."""
        where = f"{self._store.path}/{self.path}"
        bits, g = self.record.get("bits"), self.record.get("group_size")
        if bits not in uintpack.BITS:
            raise FormatError(where, f"bits {bits!r} not one of {uintpack.BITS}")
        if not isinstance(g, int) or isinstance(g, bool) or g < 1:
            raise FormatError(where, f"group_size {g!r} is not a positive integer")
        cols = self.rows_cols[1]
        return bits, -(-cols // g)

    def _uint_decoded(self, check_crc: bool):
        """(levels, scales, zeros) of a uint-packed or uint-dict16 tensor, validated."""
        bits, _ = self._uint_params()
        where = f"{self._store.path}/{self.path}"
        zeros = np.asarray(self.array("zeros", check_crc))
        if zeros.size and int(zeros.max()) >= (1 << bits):
            raise FormatError(f"{where}/zeros", f"zero point >= 2**{bits}")
        cols = self.rows_cols[1]
        if self.codec == layout.CODEC_UINT:
            levels = uintpack.unpack_levels(self.array("q", check_crc), bits, cols, where)
        else:
            codes, rc, d = self._coded(check_crc)
            ternary = decode_symbols(codes, rc, cols, d, where)
            levels = uintdict.merge(ternary, zeros, self.record["group_size"], bits,
                                    *(self.array(a, check_crc) for a in
                                      ("row_escapes", "escape_cols", "escape_levels")), where)
        scales = bf16_to_float32(self.array("scales", check_crc))
        if not np.isfinite(scales).all():
            raise FormatError(f"{where}/scales", "scales must be finite")
        return levels, scales, zeros

    def _coded(self, check_crc: bool):
        """(codes, row_codes, dictionary) of a dictionary-coded tensor."""
        if self.codec not in layout.DICTIONARY_CODECS:
            raise TypeError(f"{self.name} is stored {self.codec}, it has no codeword stream")
        d = self._store.dictionary(self.record.get("dictionary"), self.name)
        return (self.array("codes", check_crc), self.array("row_codes", check_crc), d)

    def symbols(self, check_crc: bool = True) -> np.ndarray:
        """Ternary symbols (0, 1 = lo, 2 = hi) as int8, or the b-bit levels (uint8) of a
        uint-packed or uint-dict16 tensor."""
        if self.codec in (layout.CODEC_UINT, layout.CODEC_UINT_DICT):
            return self._uint_decoded(check_crc)[0].reshape(self.shape)
        codes, rc, d = self._coded(check_crc)
        rows, cols = self.rows_cols
        sym = decode_symbols(codes, rc, cols, d, f"{self._store.path}/{self.path}")
        return sym.reshape(self.shape)

    def scales(self, check_crc: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) per row of a ternary tensor."""
        if self.codec != layout.CODEC_TERNARY:
            raise TypeError(f"{self.name} is stored {self.codec}, it has no ternary scales")
        lo, hi = scales_to_float(self.array("scales", check_crc))
        bad = ~(np.isfinite(lo) & np.isfinite(hi) & (lo <= 0) & (hi >= 0))
        if bad.any():
            raise FormatError(f"{self._store.path}/{self.path}/scales",
                              f"row {int(np.argmax(bad))}: scales must be finite with lo <= 0 <= hi")
        return lo, hi

    def numpy(self, check_crc: bool = True) -> np.ndarray:
        """A dense tensor in its original dtype (bfloat16 as ml_dtypes.bfloat16)."""
        if self.codec != layout.CODEC_DENSE:
            raise TypeError(f"{self.name} is stored {self.codec}; use decode()")
        a = self.array("data", check_crc)
        if self.dtype == "bfloat16":
            import ml_dtypes
            return a.view(ml_dtypes.bfloat16)
        return a

    def decode(self, check_crc: bool = True) -> np.ndarray:
        if self.codec == layout.CODEC_DENSE:
            return np.asarray(self.numpy(check_crc), dtype=np.float32)
        if self.codec in (layout.CODEC_UINT, layout.CODEC_UINT_DICT):
            levels, scales, zeros = self._uint_decoded(check_crc)
            return uintpack.dequantize(levels, scales, zeros, self.record["group_size"]).reshape(self.shape)
        codes, rc, d = self._coded(check_crc)
        lo, hi = self.scales(check_crc)
        rows, cols = self.rows_cols
        w = decode_values(codes, rc, cols, d, lo, hi, f"{self._store.path}/{self.path}")
        return w.reshape(self.shape)


class Store:
    """A read-only store. Iterate for tensor names; `store[name]` is a `Tensor`."""

    def __init__(self, path, allow_incomplete: bool = False):
        self.path = Path(path)
        self.meta = read_root(self.path)
        self.format_version: str = self.meta["format_version"]
        self.complete: bool = self.meta.get("complete") is True
        if not self.complete:
            if not allow_incomplete:
                raise IncompleteStoreError(
                    f"{self.path}: store is incomplete (its pack did not finish); "
                    "finish it with `qmoefmt pack --resume`")
            records = self._scan_finished()
        else:
            records = self.meta.get("tensors")
        self._records = self._index(records)
        dicts = self.meta.get("dictionaries", [])
        where = str(self.path / layout.ROOT_META)
        if not isinstance(dicts, list):
            raise FormatError(where, "dictionaries is not a list")
        if len(dicts) > MAX_DICTIONARIES:
            raise LimitError(where, f"{len(dicts)} dictionaries, limit is {MAX_DICTIONARIES}")
        self._dict_entries = {}
        for i, e in enumerate(dicts):
            dw = f"{where}: dictionaries[{i}]"
            if not isinstance(e, dict) or not isinstance(e.get("id"), str):
                raise FormatError(dw, "not a dictionary entry with a string id")
            _check_node_path(e.get("path"), layout.DICTIONARIES, dw)
            _check_arrays_index(e.get("arrays"), dw)
            if not isinstance(e.get("params", {}), dict) or not isinstance(e.get("kind", ""), str):
                raise FormatError(dw, "kind/params malformed")
            self._dict_entries[e["id"]] = e
        self._dicts: dict[str, Dictionary] = {}

    def _scan_finished(self) -> list[dict]:
        """An incomplete store's finished tensors: those whose group metadata exists."""
        out = []
        tdir = self.path / layout.TENSORS
        for doc in sorted(tdir.glob("*/zarr.json")) if tdir.is_dir() else []:
            try:
                out.append(load_json(doc)["attributes"]["qmoefmt"])
            except (FormatError, KeyError, TypeError):
                continue
        dict_docs = sorted((self.path / layout.DICTIONARIES).glob("*/zarr.json"))
        self.meta = dict(self.meta, dictionaries=[
            load_json(p)["attributes"]["qmoefmt"] for p in dict_docs])
        return out

    def _index(self, records) -> dict[str, dict]:
        """Type-checks every record before anything uses it: a checksummed root can still
        come from a buggy or hostile writer."""
        where = str(self.path / layout.ROOT_META)
        if not isinstance(records, list):
            raise FormatError(where, "tensors is not a list")
        if len(records) > MAX_TENSORS:
            raise LimitError(where, f"{len(records)} tensors, limit is {MAX_TENSORS}")
        out: dict[str, dict] = {}
        for i, r in enumerate(records):
            if not isinstance(r, dict) or not isinstance(r.get("name"), str):
                raise FormatError(where, f"tensors[{i}]: not a tensor record")
            name = r["name"]
            if len(name.encode()) > MAX_NAME_BYTES:
                raise LimitError(where, f"tensors[{i}]: name longer than {MAX_NAME_BYTES} bytes")
            tw = f"{where}: tensor {name!r}"
            _check_node_path(r.get("path"), layout.TENSORS, tw)
            _shape(r.get("shape"), tw, "shape")
            for key in ("codec", "dtype"):
                if not isinstance(r.get(key), str):
                    raise FormatError(tw, f"{key} is not a string")
            if r["dtype"] not in layout.STORED_DTYPE:
                raise FormatError(tw, f"unknown dtype {r['dtype']!r}")
            _check_arrays_index(r.get("arrays"), tw)
            if "dictionary" in r and not isinstance(r["dictionary"], str):
                raise FormatError(tw, "dictionary is not a string")
            counts = r.get("symbol_counts")
            if counts is not None and not (isinstance(counts, list) and len(counts) == 3 and all(
                    isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)):
                raise FormatError(tw, "symbol_counts is not 3 non-negative integers")
            if r["codec"] not in layout.KNOWN_CODECS:
                # namespaced codec ids: a newer minor may add codecs; only that tensor is unreadable
                r = dict(r, unknown_codec=True)
            if name in out:
                raise FormatError(where, f"tensor {name!r} listed twice")
            out[name] = r
        return out

    def __iter__(self):
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, name) -> bool:
        return name in self._records

    def names(self) -> list[str]:
        return list(self._records)

    def __getitem__(self, name: str) -> Tensor:
        r = self._records[name]
        if r.get("unknown_codec"):
            raise FormatError(f"{self.path}/{r['path']}",
                              f"codec {r.get('codec')!r} is unknown to this reader "
                              f"(format {layout.FORMAT_VERSION})")
        return Tensor(self, r)

    def tensors(self):
        for name in self._records:
            yield self[name]

    def dictionary(self, cid: str | None, tensor: str = "") -> Dictionary:
        if cid in self._dicts:
            return self._dicts[cid]
        entry = self._dict_entries.get(cid)
        if entry is None:
            raise FormatError(str(self.path / layout.ROOT_META),
                              f"tensor {tensor!r} references unknown dictionary {cid!r}")
        node = entry.get("path")
        where = f"{self.path}/{node}"
        if node != layout.dictionary_path(str(cid)):
            raise FormatError(where, f"dictionary {cid!r} has path {node!r}")
        arrays = entry.get("arrays")
        tables = {}
        for name, np_dt in TABLES:
            dt = str(np_dt.newbyteorder("="))
            if not isinstance(arrays, dict) or name not in arrays:
                raise FormatError(where, f"array {name!r} missing from the index")
            arr = check_array_file(self.path, f"{node}/{name}", arrays[name], True, dt)
            if arr.size > MAX_DICTIONARIES * CODEWORDS * 64 * 32:
                raise LimitError(where, f"{name} too large")
            tables[name] = np.ascontiguousarray(arr)
        validate_tables(tables, where)
        d = Dictionary(kind=str(entry.get("kind")), params=entry.get("params") or {}, **tables)
        if d.content_id != cid:
            raise FormatError(where, f"content hash {d.content_id} does not match its id {cid}")
        self._dicts[cid] = d
        return d

    def _tensor_bytes(self, t: Tensor) -> int:
        total = _file_size(self.path / t.path / "zarr.json")
        for name, desc in t.record["arrays"].items():
            total += _file_size(self.path / t.path / name / "zarr.json")
            shp = desc["shape"]
            if layout.has_chunk(shp):
                total += _file_size(self.path / t.path / name / layout.chunk_key(shp))
        return total


def _file_size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def open(path, allow_incomplete: bool = False) -> Store:  # noqa: A001 - the public API name
    return Store(path, allow_incomplete=allow_incomplete)
