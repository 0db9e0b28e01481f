"""verify: is a store sound and complete? Every problem comes back as (where, what).

Shallow: the root's self-checksum and version, every other zarr.json against the bytes
the index implies, every chunk's size and CRC32C, no unexpected files, every dictionary
valid and matching its content hash, every record consistent. Deep (`deep=True`) also
decodes every coded tensor, checks the row invariants, the scales, the symbol counts, and
that re-encoding gives the stored codewords (the stream is canonical).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import layout, uintdict
from .codec import encode
from .dict_golomb import build_golomb
from .dict_qmoe import build_qmoe2023
from .errors import FormatError, IncompleteStoreError, QmoeError
from .store_reader import Store
from .store_writer import dictionary_group_doc, tensor_group_doc


@dataclass(frozen=True)
class Problem:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def _expect_bytes(path: Path, expected: bytes, problems: list, what: str) -> None:
    try:
        actual = path.read_bytes()
    except FileNotFoundError:
        problems.append(Problem(str(path), "missing"))
        return
    if actual != expected:
        problems.append(Problem(str(path), f"{what} differs from what the index implies "
                                           "(modified or damaged)"))


def _check_arrays(root: Path, node: str, arrays: dict, codec: str | None, dtype: str | None,
                  problems: list, expected_files: set) -> None:
    for name, desc in arrays.items():
        base = root / node / name
        expected_files.add(base / "zarr.json")
        try:
            shape = desc["shape"]
            ld = layout.logical_dtype(codec, dtype, name) if codec else None
            _expect_bytes(base / "zarr.json", layout.array_doc(desc["data_type"], shape, ld),
                          problems, "array metadata")
            if layout.has_chunk(shape):
                expected_files.add(base / layout.chunk_key(shape))
            from .store_reader import check_array_file
            check_array_file(root, f"{node}/{name}", desc, check_crc=True)
        except FormatError as e:
            problems.append(Problem(e.where, e.what))
        except (KeyError, TypeError):
            problems.append(Problem(str(base), "malformed array descriptor in the index"))


def _wrong_version(declared: str, needed: str) -> bool:
    """Too low for the codecs used, or higher than they need while within the versions
    this code knows (a newer minor may add members we cannot see, spec §3)."""
    v = tuple(map(int, declared.split(".")))
    n = tuple(map(int, needed.split(".")))
    return v < n or (v != n and v <= (layout.FORMAT_MAJOR, layout.FORMAT_MINOR))


def _canonical_dictionary(entry: dict):
    kind, params = entry.get("kind"), entry.get("params") or {}
    if kind == "qmoe-2023":
        return build_qmoe2023()
    if kind == "golomb-v2f":
        return build_golomb(float(params["p_zero"]), int(params["k"]))
    return None


def verify(path, deep: bool = False, progress=None, on_open=None) -> list[Problem]:
    """`on_open(n_tensors)` is called once the root is read (the CLI sizes its progress
    bar with it); `progress(1)` after each tensor."""
    root = Path(path)
    problems: list[Problem] = []
    try:
        store = Store(root)          # the one read of the root: checksum, version, index
    except IncompleteStoreError:
        return [Problem(str(root / layout.ROOT_META),
                        "store is incomplete: its pack did not finish (use pack --resume)")]
    except QmoeError as e:
        return [Problem(getattr(e, "where", str(root)), getattr(e, "what", str(e)))]
    meta = store.meta
    if on_open:
        on_open(len(store))
    codecs = {r["codec"] for r in store._records.values()}
    if codecs <= set(layout.KNOWN_CODECS) and _wrong_version(store.format_version,
                                                             layout.lowest_version(codecs)):
        problems.append(Problem(str(root / layout.ROOT_META),
                                f"format_version {store.format_version} is not "
                                f"{layout.lowest_version(codecs)}, the lowest defining the "
                                f"codecs used ({', '.join(sorted(codecs))}), spec §3"))

    expected_files = {root / layout.ROOT_META}
    for group in (layout.TENSORS, layout.DICTIONARIES):
        expected_files.add(root / group / "zarr.json")
        _expect_bytes(root / group / "zarr.json", layout.group_doc(), problems, "group metadata")

    for entry in store._dict_entries.values():
        node = entry["path"]
        expected_files.add(root / node / "zarr.json")
        _expect_bytes(root / node / "zarr.json", dictionary_group_doc(entry), problems,
                      "dictionary metadata")
        _check_arrays(root, node, entry["arrays"], None, None, problems, expected_files)
        try:
            store.dictionary(entry["id"])
        except FormatError as e:
            problems.append(Problem(e.where, e.what))

    for name in store:
        t = store._records[name]
        node = t["path"]
        expected_files.add(root / node / "zarr.json")
        try:
            _expect_bytes(root / node / "zarr.json", tensor_group_doc(t), problems, "tensor metadata")
            _check_arrays(root, node, t["arrays"], t.get("codec"), t.get("dtype"), problems,
                          expected_files)
            problems.extend(_check_record(store, name, deep))
        except (TypeError, ValueError, KeyError, AttributeError, OSError) as e:
            # the reader type-checks the index; this catches what slips past it
            problems.append(Problem(f"{root}/{node}", f"tensor {name!r}: malformed record ({e})"))
        if progress:
            progress(1)

    for p in sorted(root.rglob("*")):
        if p.is_file() and p not in expected_files:
            problems.append(Problem(str(p), "unexpected file (not part of the store)"))
    return problems


def _check_record(store: Store, name: str, deep: bool) -> list[Problem]:
    r = store._records[name]
    where = f"{store.path}/{r['path']}"
    if r.get("unknown_codec"):
        return [Problem(where, f"tensor {name!r}: unknown codec {r.get('codec')!r}")]
    codec = r["codec"]
    want = set(layout.CODEC_ARRAYS[codec])
    if set(r["arrays"]) != want:
        return [Problem(where, f"tensor {name!r}: arrays {sorted(r['arrays'])}, expected {sorted(want)}")]
    t = store[name]
    try:
        for a in want:
            t.array(a, check_crc=False)
        if codec == layout.CODEC_DENSE:
            return []
        if codec == layout.CODEC_UINT:
            if deep:
                t._uint_decoded(check_crc=False)
            return []
        rows, cols = t.rows_cols
        counts = r.get("symbol_counts")
        if (not isinstance(counts, list) or len(counts) != 3
                or sum(c for c in counts if isinstance(c, int)) != rows * cols):
            return [Problem(where, f"tensor {name!r}: symbol_counts {counts!r} do not add up "
                                   f"to {rows * cols} elements")]
        codes, row_codes, d = t._coded(check_crc=False)
        if codec == layout.CODEC_TERNARY:
            t.scales(check_crc=False)
        want_dt = "uint16" if cols < (1 << 16) else "uint32"
        if r["arrays"]["row_codes"]["data_type"] != want_dt:
            return [Problem(f"{where}/row_codes", f"tensor {name!r}: row_codes is "
                            f"{r['arrays']['row_codes']['data_type']}, the spec requires "
                            f"{want_dt} for {cols} columns")]
        if not deep:
            return []
        sym = t.symbols(check_crc=False).reshape(rows, cols)
        if codec == layout.CODEC_UINT_DICT:
            # symbols() checked every escape against the stream; the stream is the signs
            zeros = np.asarray(t.array("zeros", check_crc=False))
            sym = uintdict.split(sym, zeros, r["group_size"])[0]
        got = np.bincount(sym.reshape(-1), minlength=3)[:3]
        if list(map(int, got)) != counts:
            return [Problem(where, f"tensor {name!r}: decoded symbol counts {list(map(int, got))} "
                                   f"!= recorded {counts}")]
        canon = _canonical_dictionary(store._dict_entries[r["dictionary"]])
        if canon is not None and canon.content_id == d.content_id:
            c2, rc2 = encode(sym, canon)
            if not (np.array_equal(c2, codes) and np.array_equal(rc2.astype(np.int64),
                                                                  np.asarray(row_codes, np.int64))):
                return [Problem(f"{where}/codes", f"tensor {name!r}: codeword stream is not the "
                                                  "canonical encoding of its symbols")]
    except FormatError as e:
        return [Problem(e.where, e.what)]
    return []
