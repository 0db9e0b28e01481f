"""Reading stores (spec §3, §4, §9): `qmoefmt.open(path)`.

Opening reads one file, the root zarr.json, whose index describes every tensor; arrays
are memory-mapped from their single chunk file on first use. Every declared size is
checked against the limits and against the file before anything is allocated or a
decoder runs. What a tensor's arrays mean is its codec unit's (`qmoefmt.codecs`).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import codecs
from ..dictionaries import compact
from ..dictionaries.tables import (CODEWORDS, TABLES, Dictionary, stored_content_id,
                                   validate_tables)
from ..errors import FormatError, IncompleteStoreError, LimitError, NotApplicableError
from ..format import attachments as attachments_
from ..format import constants as C
from ..format import metadata as M
from ..format import records as records_
from ..format import source as source_
from ..format.constants import MAX_DICTIONARIES, MAX_TENSORS
from .archive import store_root
from .files import check_array_file, file_size, load_json, read_root




class Tensor:
    """One stored tensor. `decode()` gives its values (float32, dequantized for coded
    tensors; integer and bool tensors in their own dtype), `symbols()` the ternary symbols
    (0 = zero, 1 = lo, 2 = hi) or k-bit levels."""

    def __init__(self, store: "Store", record: dict, codec: codecs.Codec):
        self._store = store
        self._codec = codec
        self.record = record
        self.name: str = record["name"]
        self.path: str = record["path"]
        self.codec: str = record["codec"]
        self.dtype: str = record["dtype"]
        self.shape: tuple[int, ...] = tuple(record["shape"])
        self.where = f"{store.path}/{self.path}"
        self._runtime: dict[bool, object] = {}     # check_crc -> its RuntimeWeight

    def __repr__(self) -> str:
        return f"<Tensor {self.name} {list(self.shape)} {self.dtype} {self.codec}>"

    @property
    def unit(self) -> codecs.Codec:
        """The codec unit that gives this tensor's arrays their meaning."""
        return self._codec

    @property
    def value_dtype(self) -> str:
        """The dtype that holds this tensor's values exactly: its stored dtype for dense
        tensors, and for coded ones where the codec's values fit it (ternary values are
        bf16 scales; k-bit values need float32), else float32."""
        if not self._codec.expert or self.dtype in self._codec.exact_dtypes:
            return self.dtype
        return "float32"

    @property
    def rows_cols(self) -> tuple[int, int]:
        cols = self.shape[-1] if self.shape else 1
        return (math.prod(self.shape[:-1]) if self.shape else 1), cols

    @property
    def nbytes(self) -> int:
        """Bytes of every array of this tensor, metadata files included."""
        root = self._store.path / self.path
        total = file_size(root / "zarr.json")
        for name, desc in self.record["arrays"].items():
            total += file_size(root / name / "zarr.json")
            if M.has_chunk(desc["shape"]):
                total += file_size(root / name / M.chunk_key(desc["shape"]))
        return total

    @property
    def dictionary(self) -> str | None:
        """The content id of the dictionary its codewords are read through, if any."""
        return self.record.get("dictionary")

    def load_dictionary(self) -> Dictionary:
        """That dictionary, validated (loaded once per store)."""
        return self._store.dictionary(self.dictionary, self.name)

    def array(self, name: str, check_crc: bool = True) -> np.ndarray:
        """One array, validated against its codec's rules and its descriptor, mapped."""
        if name not in self.record["arrays"]:
            raise FormatError(self.where, f"array {name!r} missing from the index")
        spec = self._codec.array_specs(self).get(name)
        if spec is None:
            raise FormatError(self.where, f"array {name!r} does not belong to codec {self.codec}")
        arr = check_array_file(self._store.path, f"{self.path}/{name}", self.record["arrays"][name],
                               check_crc, spec.data_types, spec.shape)
        rows, cols = self.rows_cols
        if spec.shape is None and (arr.ndim != 1 or arr.shape[0] > rows * cols):
            raise FormatError(f"{self.where}/{name}",
                              f"shape {list(arr.shape)} for {rows}x{cols} weights")
        return arr

    def symbols(self, check_crc: bool = True, backend: str | None = None,
                rows: slice | None = None) -> np.ndarray:
        """Ternary symbols (0, 1 = lo, 2 = hi) as int8, or the b-bit levels (uint8) of a
        k-bit tensor; `rows` as in `decode`."""
        return self._shaped(self._codec.symbols(self, check_crc, backend, rows=rows), rows)

    def scales(self, check_crc: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) per row of a ternary tensor."""
        if not hasattr(self._codec, "scales"):
            raise NotApplicableError(f"{self.name} is stored {self.codec}, it has no ternary scales")
        return self._codec.scales(self, check_crc)

    def numpy(self, check_crc: bool = True) -> np.ndarray:
        """A dense tensor in its original dtype (bfloat16 as ml_dtypes.bfloat16)."""
        if not hasattr(self._codec, "native"):
            raise NotApplicableError(f"{self.name} is stored {self.codec}; use decode()")
        return self._codec.native(self, check_crc)

    def runtime(self, check_crc: bool = True):
        """The weight as a `RuntimeWeight` (arrays validated once, held as the kernels
        take them): what the torch modules and the expert budget hold. 2-D expert codecs."""
        if self._codec.multiplies and len(self.shape) != 2:
            raise NotApplicableError(f"{self.name} has shape {list(self.shape)}; matmul takes "
                                     "a 2-D weight [out, in]")
        # Built once a tensor object: repeated products neither re-check the arrays nor,
        # for uint-dict16, re-decode to check the escapes.
        if check_crc not in self._runtime:
            self._runtime[check_crc] = self._codec.runtime(self, check_crc)
        return self._runtime[check_crc]

    def matmul(self, x, check_crc: bool = True, backend: str | None = None) -> np.ndarray:
        """`x @ W.T` as nn.Linear computes it, W never decoded whole: x [batch, in] or
        [in] (float32 or bfloat16), fp32 accumulation -> float32 [batch, out] (or [out])."""
        x = np.asarray(x)
        vector = x.ndim == 1
        x = np.asarray(x[None] if vector else x, dtype=np.float32)
        y = self.runtime(check_crc).matmul(x, backend)
        return y[0] if vector else y

    def decode(self, check_crc: bool = True, backend: str | None = None,
               rows: slice | None = None) -> np.ndarray:
        """The values in the tensor's shape: float32 (dequantized for coded tensors), but
        dense integer and bool tensors in their own dtype (spec §7); `backend` names the decode
        backend (`qmoefmt.backends`; None: Numba on the CPU). `rows=slice(a, b)` decodes
        rows a..b-1 of the [prod(shape[:-1]), cols] view only (rows are independent, like
        safetensors' get_slice), as a [b - a, cols] array."""
        return self._shaped(self._codec.decode(self, check_crc, backend, rows=rows), rows)

    def _shaped(self, a: np.ndarray, rows) -> np.ndarray:
        if rows is None:
            return a.reshape(self.shape)
        return a.reshape(len(range(*rows.indices(self.rows_cols[0]))), self.rows_cols[1])

    def torch(self, device=None, dtype=None, check_crc: bool = True):
        """The tensor as a dense torch tensor: dequantized for coded tensors, in `dtype`
        (default: `value_dtype`) on `device`."""
        from .._torch import require_torch
        torch = require_torch("Tensor.torch()")
        if hasattr(self._codec, "native"):
            a = np.asarray(self._codec.native(self, check_crc))
            out = (torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
                   if self.dtype == "bfloat16" else torch.from_numpy(np.array(a)))
        else:
            out = torch.from_numpy(self.decode(check_crc))
            if dtype is None:
                dtype = getattr(torch, self.value_dtype)
        return out.to(device=device, dtype=dtype)


class Store:
    """A read-only store. Iterate for tensor names; `store[name]` is a `Tensor`."""

    def __init__(self, path, allow_incomplete: bool = False):
        self.path = store_root(path)
        self.meta = read_root(self.path)
        records_.root_members(self.meta, str(self.path / C.ROOT_META))
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
        where = str(self.path / C.ROOT_META)
        if not isinstance(dicts, list):
            raise FormatError(where, "dictionaries is not a list")
        if len(dicts) > MAX_DICTIONARIES:
            raise LimitError(where, f"{len(dicts)} dictionaries, limit is {MAX_DICTIONARIES}")
        self._dict_entries = {}
        for i, e in enumerate(dicts):
            cid = records_.dictionary_entry(e, i, where)
            if any("logical_dtype" in d for d in e["arrays"].values()):
                raise FormatError(where, f"dictionary {cid!r}: an array with a logical_dtype "
                                         "(dictionary tables have none, spec §4.6)")
            if cid in self._dict_entries:
                raise FormatError(where, f"dictionary {cid!r} listed twice")
            self._dict_entries[cid] = e
        self._dicts: dict[str, Dictionary] = {}
        self._attachments = attachments_.check_entries(self.meta.get("attachments"), where)
        src = self.meta.get("source")
        self._source_metadata = source_.check_metadata(
            src.get("metadata") if isinstance(src, dict) else None, where)

    def _scan_finished(self) -> list[dict]:
        """An incomplete store's finished tensors: those whose group metadata exists."""
        out = []
        tdir = self.path / C.TENSORS
        for doc in sorted(tdir.glob("*/zarr.json")) if tdir.is_dir() else []:
            try:
                out.append(_node_record(doc))
            except FormatError:
                continue
        dict_docs = sorted((self.path / C.DICTIONARIES).glob("*/zarr.json"))
        self.meta = dict(self.meta, dictionaries=[_node_record(p) for p in dict_docs])
        return out

    def _index(self, records) -> dict[str, dict]:
        """Type-checks every record before anything uses it: a checksummed root can still
        come from a buggy or hostile writer."""
        where = str(self.path / C.ROOT_META)
        if not isinstance(records, list):
            raise FormatError(where, "tensors is not a list")
        if len(records) > MAX_TENSORS:
            raise LimitError(where, f"{len(records)} tensors, limit is {MAX_TENSORS}")
        out: dict[str, dict] = {}
        paths: set[str] = set()
        for i, r in enumerate(records):
            name = records_.tensor_record(r, i, where)
            if name in out:
                raise FormatError(where, f"tensor {name!r} listed twice")
            # case-insensitive file systems would give two such tensors one directory
            if r["path"].lower() in paths:
                raise FormatError(where, f"tensor {name!r}: path {r['path']!r} is another "
                                         "tensor's (ignoring case, spec §4.3)")
            paths.add(r["path"].lower())
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

    def record(self, name: str) -> dict:
        """A tensor's index record as validated (its codec possibly unknown to this
        reader), for tools that check records without decoding."""
        return self._records[name]

    @property
    def dictionary_entries(self) -> dict[str, dict]:
        """The index's dictionary entries by content id."""
        return self._dict_entries

    @property
    def attachments(self) -> list[str]:
        """The names of the files the store carries from its source checkpoint (§14)."""
        return list(self._attachments)

    @property
    def source_metadata(self) -> dict[str, str] | None:
        """The source safetensors file's `__metadata__`, when the store recorded it (§4.4)."""
        return None if self._source_metadata is None else dict(self._source_metadata)

    @property
    def attachment_entries(self) -> dict[str, dict]:
        """The root's attachment entries by name, as type-checked (their text unchecked
        against its hash: `attachment` checks it)."""
        return self._attachments

    def attachment(self, name: str) -> bytes:
        """An attachment's bytes, verbatim as in the source checkpoint, hash checked."""
        if name not in self._attachments:
            raise KeyError(f"{self.path}: no attachment {name!r} (it has "
                           f"{self.attachments or 'none'})")
        return attachments_.content(self._attachments[name], self._attachment_where(name))

    def attachment_json(self, name: str) -> dict:
        """An attachment's JSON object (§14 attachments are JSON objects)."""
        return attachments_.parse_object(self.attachment(name), self._attachment_where(name))

    @property
    def config(self) -> dict | None:
        """The model's config.json (Hugging Face), if the store carries one."""
        return self.attachment_json(C.CONFIG) if C.CONFIG in self._attachments else None

    def _attachment_where(self, name: str) -> str:
        return f"{self.path / C.ROOT_META}: attachment {name!r}"

    def __getitem__(self, name: str) -> Tensor:
        r = self._records[name]
        unit = codecs.get(r["codec"])
        if unit is None:
            # namespaced codec ids: a newer minor may add codecs; only that tensor is unreadable
            raise FormatError(f"{self.path}/{r['path']}",
                              f"codec {r.get('codec')!r} is unknown to this reader "
                              f"(format {C.FORMAT_VERSION})")
        missing = [m for m in unit.members if m not in r]
        if missing:
            raise FormatError(f"{self.path}/{r['path']}", f"tensor {name!r}: member "
                              f"{missing[0]!r} missing, which codec {unit.id} requires (spec §4.5)")
        self._check_logical_dtypes(name, r, unit)
        return Tensor(self, r, unit)

    @property
    def logical_dtypes_in_index(self) -> bool:
        """Since 1.5 the index says which arrays hold bfloat16 bits (§4.5); before, only
        their codecs do."""
        return C.version_tuple(self.format_version) >= C.version_tuple(C.LOGICAL_DTYPE_SINCE)

    def _check_logical_dtypes(self, name: str, r: dict, unit: codecs.Codec) -> None:
        """The bits are reinterpreted by what the codec says: an index that says otherwise
        describes another store than the decoder reads."""
        for a, desc in r["arrays"].items():
            if self.logical_dtypes_in_index or "logical_dtype" in desc:
                want, got = unit.logical_dtype(a, r["dtype"]), desc.get("logical_dtype")
                if got != want:
                    raise FormatError(f"{self.path}/{r['path']}", f"tensor {name!r}: array "
                                      f"{a!r} has logical_dtype {got!r} in the index; codec "
                                      f"{unit.id} makes it {want!r} (spec §4.5)")

    def tensors(self):
        for name in self._records:
            yield self[name]

    def dictionary(self, cid: str | None, tensor: str = "") -> Dictionary:
        if cid in self._dicts:
            return self._dicts[cid]
        entry = self._dict_entries.get(cid)
        if entry is None:
            raise FormatError(str(self.path / C.ROOT_META),
                              f"tensor {tensor!r} references unknown dictionary {cid!r}")
        d = read_dictionary(self.path, str(cid), entry)
        self._dicts[cid] = d
        return d


def read_dictionary(root: Path, cid: str, entry: dict) -> Dictionary:
    """A dictionary entry's stored arrays read, checked against its content id and, for a
    compact form, derived into tables (§5.7); the tables validated (§5.6)."""
    node = entry.get("path")
    where = f"{root}/{node}"
    if node != M.dictionary_path(str(cid)):
        raise FormatError(where, f"dictionary {cid!r} has path {node!r}")
    form = entry.get("form", compact.TABLES_FORM)
    if form == compact.TABLES_FORM:
        specs = [(name, dt, None) for name, dt in TABLES]
    elif isinstance(form, str) and form in compact.COMPACT_KIND:
        n_states, max_nnz = (_count(entry, key, limit, where) for key, limit in
                             (("n_states", C.MAX_STATES), ("max_nnz", C.MAX_NNZ)))
        if entry.get("kind") != compact.COMPACT_KIND[form]:
            raise FormatError(where, f"form {form!r} is for kind "
                                     f"{compact.COMPACT_KIND[form]!r}, not {entry.get('kind')!r}")
        k = (entry.get("params") or {}).get("k") if isinstance(entry.get("params"), dict) else None
        if form == compact.TREE_FORM and k != n_states - 2:
            raise FormatError(where, f"params.k {k!r} is not n_states - 2 = {n_states - 2} "
                                     "(spec §5.7.1)")
        specs = compact.arrays(form, n_states)
    else:
        raise FormatError(where, f"dictionary form {form!r} is unknown to this reader "
                                 f"(format {C.FORMAT_VERSION})")
    arrays = entry.get("arrays")
    stored = {}
    for name, np_dt, shape in specs:
        dt = str(np_dt.newbyteorder("="))
        if not isinstance(arrays, dict) or name not in arrays:
            raise FormatError(where, f"array {name!r} missing from the index")
        arr = check_array_file(root, f"{node}/{name}", arrays[name], True, dt, shape)
        if arr.size > MAX_DICTIONARIES * CODEWORDS * 64 * 32:
            raise LimitError(where, f"{name} too large")
        stored[name] = np.ascontiguousarray(arr)
    content_id = stored_content_id(stored)
    if content_id != cid:
        raise FormatError(where, f"content hash {content_id} does not match its id {cid}")
    if form == compact.TABLES_FORM:
        tables, stored = stored, None
    else:
        # Derived by integers alone (§5.7), then validated as stored tables are.
        tables, problem = compact.derive(form, stored, n_states, max_nnz)
        if problem is not None:
            raise FormatError(where, f"{form}: {problem}")
    validate_tables(tables, where)
    d = Dictionary(kind=str(entry.get("kind")), params=entry.get("params") or {},
                   form=form, stored=stored, _content_id=content_id, **tables)
    return d


def _count(entry: dict, key: str, limit: int, where: str) -> int:
    """A dictionary entry's S or K, which sizes what a compact form derives (§9)."""
    v = entry.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= limit:
        raise FormatError(where, f"{key} {v!r} is not an integer 1..{limit}")
    return v


def _node_record(doc: Path) -> dict:
    """attributes.qmoefmt of a tensor's or dictionary's group document."""
    try:
        return load_json(doc)["attributes"]["qmoefmt"]
    except (KeyError, TypeError):
        raise FormatError(str(doc), "not a qmoefmt group (no attributes.qmoefmt)") from None


def open(path, allow_incomplete: bool = False) -> Store:  # noqa: A001 - the public API name
    return Store(path, allow_incomplete=allow_incomplete)
