"""verify: is a store sound and complete? Every problem comes back as (where, what).

Shallow: the root's self-checksum, version, canonical form and members, every other
zarr.json against the bytes the index implies, every chunk's size and CRC32C, no
unexpected files, every dictionary valid and matching its content hash, every record
consistent, the scales, k-bit zero points, padding and escapes, bool data, every
attachment a JSON object matching its hash. Deep (`deep=True`) also
decodes every coded tensor, checks the row invariants, the symbol counts, and
that re-encoding gives the stored codewords (the stream is canonical).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import codecs, dictionaries
from ..errors import FormatError, IncompleteStoreError, QmoeError
from ..format import constants as C
from ..format import metadata as M
from ..format import records as R
from .archive import ArchivePath
from .files import check_array_file, read_metadata
from .reader import Store
from .version import needed_version


@dataclass(frozen=True)
class Problem:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def _expect_bytes(path: Path, expected: bytes, problems: list, what: str) -> None:
    try:
        actual = read_metadata(path, C.MAX_NODE_METADATA)
    except FormatError as e:
        problems.append(Problem(e.where, e.what))
        return
    if actual != expected:
        problems.append(Problem(str(path), f"{what} differs from what the index implies "
                                           "(modified or damaged)"))


def _check_arrays(root: Path, node: str, arrays: dict, unit: codecs.Codec | None,
                  dtype: str | None, problems: list, expected_files: set,
                  from_index: bool) -> None:
    """`from_index`: the store's index records logical dtypes (1.5), so every array
    document follows from it, whatever the codec; before, the codec says."""
    for name, desc in arrays.items():
        base = root / node / name
        expected_files.add(base / "zarr.json")
        try:
            shape = desc["shape"]
            if from_index:
                ld = desc.get("logical_dtype")
            else:
                ld = unit.logical_dtype(name, dtype) if unit else None
            _expect_bytes(base / "zarr.json", M.array_doc(desc["data_type"], shape, ld),
                          problems, "array metadata")
            if M.has_chunk(shape):
                expected_files.add(base / M.chunk_key(shape))
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
    return v < n or (v != n and v <= (C.FORMAT_MAJOR, C.FORMAT_MINOR))


def _check_version(store: Store, used: set) -> list[Problem]:
    entries = list(store.dictionary_entries.values())
    needed = needed_version(used, entries, store.meta)
    if not _wrong_version(store.format_version, needed):
        return []
    what = f"the codecs used ({', '.join(sorted(used))})"
    if dictionaries.lowest_version(entries) != "1.0":
        what += " and compact dictionaries (§5.7)"
    if store.attachments:
        what += " and attachments (§14)"
    if store.source_metadata is not None:
        what += " and source.metadata (§4.4)"
    if any(isinstance(d, dict) and "logical_dtype" in d
           for r in store.meta.get("tensors") or [] for d in r["arrays"].values()):
        what += " and logical dtypes in the index (§4.5)"
    return [Problem(str(store.path / C.ROOT_META),
                    f"format_version {store.format_version} is not {needed}, the lowest "
                    f"defining {what}, spec §3")]


def _check_attachments(store: Store) -> list[Problem]:
    """Sorted by name, each its size and hash and a JSON object (spec §14); the reader
    type-checked the entries when it opened the store."""
    problems = []
    if store.attachments != sorted(store.attachments):
        problems.append(Problem(str(store.path / C.ROOT_META),
                                "attachments are not sorted by name (spec §14)"))
    for name in store.attachments:
        try:
            store.attachment_json(name)
        except FormatError as e:
            problems.append(Problem(e.where, e.what))
    return problems


def _check_root_form(store: Store) -> list[Problem]:
    """The root's bytes are the canonical document of what it holds (spec §4.1): its
    checksum covers bytes only, so a root re-signed with reordered members, other escapes
    or other number spellings passes that check, and only this comparison sees them."""
    path = store.path / C.ROOT_META
    try:
        raw = read_metadata(path, C.MAX_ROOT_METADATA)
        want = M.root_doc(store.meta)
    except FormatError as e:
        return [Problem(e.where, e.what)]
    except RecursionError:
        return [Problem(str(path), "nested too deeply to be written canonically (spec §4.1)")]
    if raw == want:
        return []
    at = next((i for i, (a, b) in enumerate(zip(raw, want)) if a != b), min(len(raw), len(want)))
    return [Problem(str(path), f"not canonical JSON (spec §4.1): from byte {at} it reads "
                               f"{raw[at:at + 24]!r} where the canonical form has "
                               f"{want[at:at + 24]!r}")]


def _unknown(obj, known, where: str, what: str) -> list[Problem]:
    extra = sorted(set(obj) - known) if isinstance(obj, dict) else []
    return [Problem(where, f"{what}member {m!r} is not defined by the store's format_version "
                           "(spec §3)") for m in extra]


def _check_members(store: Store) -> list[Problem]:
    """Members no version up to the store's own defines. Readers ignore them (a newer
    minor may add members), but a store of a version this code implements cannot have
    any: a writer's mistake, or data hidden from readers."""
    if C.version_tuple(store.format_version) > (C.FORMAT_MAJOR, C.FORMAT_MINOR):
        return []
    where = str(store.path / C.ROOT_META)
    meta = store.meta
    problems = _unknown(meta, R.ROOT_MEMBERS, where, "")
    for key, known in R.OBJECT_MEMBERS.items():
        problems += _unknown(meta.get(key), known, where, f"{key}: ")
    for name in store:
        r = store.record(name)
        unit = codecs.get(r["codec"])
        if unit is None:
            continue
        tw = f"{store.path}/{r['path']}"
        problems += _unknown(r, R.RECORD_MEMBERS | set(unit.members), tw, f"tensor {name!r}: ")
        for a, desc in r["arrays"].items():
            problems += _unknown(desc, R.DESCRIPTOR_MEMBERS, f"{tw}/{a}", "array descriptor: ")
    for name, e in store.attachment_entries.items():
        problems += _unknown(e, R.ATTACHMENT_MEMBERS, where, f"attachment {name!r}: ")
    return problems


def verify(path, deep: bool = False, progress=None, on_open=None, on_note=None) -> list[Problem]:
    """`on_open(n_tensors)` is called once the root is read (the CLI sizes its progress
    bar with it); `progress(1)` after each tensor; `on_note(Problem)` for what was not
    checked, which is not a problem."""
    root = Path(path)
    problems: list[Problem] = []
    try:
        store = Store(root)          # the one read of the root: checksum, version, index
    except IncompleteStoreError:
        return [Problem(str(root / C.ROOT_META),
                        "store is incomplete: its pack did not finish (use pack --resume)")]
    except QmoeError as e:
        return [Problem(getattr(e, "where", str(root)), getattr(e, "what", str(e)))]
    root = store.path                # the directory, or the archive's root (spec §15)
    if isinstance(root, ArchivePath):
        problems.extend(Problem(w, what) for w, what in root.archive.structure_problems())
    if on_open:
        on_open(len(store))
    used = {store.record(n)["codec"] for n in store}
    if all(codecs.get(c) for c in used):
        problems.extend(_check_version(store, used))
    problems.extend(_check_root_form(store))
    problems.extend(_check_members(store))
    problems.extend(_check_attachments(store))

    expected_files = {root / C.ROOT_META}
    for group in (C.TENSORS, C.DICTIONARIES):
        expected_files.add(root / group / "zarr.json")
        _expect_bytes(root / group / "zarr.json", M.group_doc(), problems, "group metadata")

    for entry in store.dictionary_entries.values():
        node = entry["path"]
        expected_files.add(root / node / "zarr.json")
        _expect_bytes(root / node / "zarr.json", M.node_doc(entry), problems,
                      "dictionary metadata")
        _check_arrays(root, node, entry["arrays"], None, None, problems, expected_files,
                      store.logical_dtypes_in_index)
        try:
            d = store.dictionary(entry["id"])
        except FormatError as e:
            problems.append(Problem(e.where, e.what))
            continue
        if deep and on_note and not _rebuilds(d):
            users = sum(1 for n in store if store.record(n).get("dictionary") == d.content_id)
            on_note(Problem(f"{root}/{node}", f"dictionary {d.content_id[:19]}...: its kind "
                            f"{d.kind!r} and params {d.params} do not rebuild its tables, so "
                            f"the canonical-stream check of its {users} tensors was skipped "
                            "(their symbols were checked)"))

    for name in store:
        t = store.record(name)
        node = t["path"]
        expected_files.add(root / node / "zarr.json")
        try:
            _expect_bytes(root / node / "zarr.json", M.node_doc(t), problems, "tensor metadata")
            _check_arrays(root, node, t["arrays"], codecs.get(t.get("codec")), t.get("dtype"),
                          problems, expected_files, store.logical_dtypes_in_index)
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


def _rebuilds(d) -> bool:
    """Whether this code's construction of the dictionary's kind and params gives its very
    tables, so that a codeword stream can be checked for being the canonical one (§5.4)."""
    canon = dictionaries.canonical(d.kind, d.params, d.form)
    return canon is not None and canon.content_id == d.content_id


def _check_record(store: Store, name: str, deep: bool) -> list[Problem]:
    r = store.record(name)
    where = f"{store.path}/{r['path']}"
    if codecs.get(r["codec"]) is None:
        return [Problem(where, f"tensor {name!r}: unknown codec {r.get('codec')!r}")]
    try:
        t = store[name]
    except FormatError as e:
        return [Problem(e.where, e.what)]
    want = set(t.unit.arrays)
    if set(r["arrays"]) != want:
        return [Problem(where, f"tensor {name!r}: arrays {sorted(r['arrays'])}, expected {sorted(want)}")]
    try:
        for a in t.unit.arrays:
            t.array(a, check_crc=False)
        t.unit.check(t, deep)
    except FormatError as e:
        return [Problem(e.where, e.what)]
    return []
