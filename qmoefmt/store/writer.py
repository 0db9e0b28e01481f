"""Writing stores (spec §8): atomic files, one writer per object, a commit marker last.

Division of labour, so packing can fan out over processes later: `write_arrays` touches
only the arrays of one tensor and can run anywhere; everything else (group metadata,
dictionaries, the root) is the coordinator's, i.e. `StoreWriter`'s. A tensor counts as
done when its group zarr.json exists (or, staging a pack into an archive, its bundle:
`bundles`); the store counts as complete when the root says so.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
from pathlib import Path

import numpy as np

from .. import codecs
from ..dictionaries.tables import Dictionary
from ..errors import QmoeError
from ..format import constants as C
from ..format import metadata as M
from .archive import Archive, ArchivePath, archive_bytes
from .bundles import bundle_path
from .files import check_array_file, load_json, read_root
from .version import needed_version


class StoreExistsError(QmoeError):
    pass


_PARTIAL = re.compile(r".+\.partial\.\d+")
# What a writer creates before its root: a directory holding only these was never started.
_BEFORE_ROOT = {C.TENSORS, C.DICTIONARIES, f"{C.TENSORS}/zarr.json",
                f"{C.DICTIONARIES}/zarr.json"}


def _never_started(root: Path) -> bool:
    """Empty, or holding only the layout's first files and temporary files: a writer (of
    this or an older version, which wrote the groups before the root) killed before its
    root existed. Such a directory starts over; anything else is a user's and is refused."""
    return all(p.relative_to(root).as_posix() in _BEFORE_ROOT or _PARTIAL.fullmatch(p.name)
               for p in root.rglob("*"))


def _lock(root: Path) -> int:
    """An exclusive lock on the store directory for this writer's lifetime: a second pack
    or resume into it is refused at once rather than racing the first for its files."""
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreExistsError(f"{root}: another qmoefmt process is writing this store; "
                               "wait for it to finish (or end it) and --resume") from None
    return fd


def _write_file(path: Path, data, durable: bool = False, mkdir: bool = True) -> None:
    """Write-to-temporary and rename: a reader never sees a half-written file, and a
    killed writer leaves only `*.partial.*` files, which resume removes. Data files are
    not fsynced one by one (3-4 ms each here, 7 files a tensor): `commit` flushes
    everything once before it writes the commit marker."""
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.partial.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def array_files(node: str, arr: np.ndarray, logical_dtype: str | None = None):
    """One array's files: (its index descriptor, {key: bytes} of its chunk, if it has one,
    and its zarr.json). The descriptor records the logical dtype where the array's
    document declares one (since 1.5, spec §4.5: the index alone then gives every
    document, §10). Dictionary arrays have none."""
    data_type = str(arr.dtype) if arr.dtype != np.bool_ else "bool"
    # np.require keeps a 0-d array 0-d (ascontiguousarray would make it 1-d)
    arr = np.require(arr, dtype=M.np_dtype(data_type), requirements="C")
    files = {}
    if M.has_chunk(arr.shape):
        view = memoryview(arr.reshape(-1).view(np.uint8))
        files[f"{node}/{M.chunk_key(arr.shape)}"] = view
        crc = M.crc32c(view)
    else:
        crc = M.crc32c(b"")
    files[f"{node}/zarr.json"] = M.array_doc(data_type, arr.shape, logical_dtype)
    desc = {"data_type": data_type, "shape": list(arr.shape), "crc32c": crc}
    if logical_dtype:
        desc["logical_dtype"] = logical_dtype
    return desc, files


def write_array(root: Path, node: str, arr: np.ndarray, logical_dtype: str | None = None) -> dict:
    """One array's files written (the chunk first, its zarr.json last); its descriptor."""
    desc, files = array_files(node, arr, logical_dtype)
    os.makedirs((root / next(iter(files))).parent, exist_ok=True)   # one call for all dirs
    for key, data in files.items():
        _write_file(root / key, data, mkdir=False)
    return desc


def write_arrays(root: Path, tensor_path: str, arrays: dict) -> dict:
    """The worker's part: arrays = {name: (ndarray, logical_dtype or None)}."""
    return {name: write_array(root, f"{tensor_path}/{name}", a, ld)
            for name, (a, ld) in arrays.items()}


def write_bundle(root: Path, record: dict, arrays: dict) -> None:
    """The worker's part when staging for an archive: the tensor's arrays and group, one
    bundle (`bundles`), written whole; sets the record's descriptors."""
    members, descs = {}, {}
    for name, (a, ld) in arrays.items():
        descs[name], files = array_files(f"{record['path']}/{name}", a, ld)
        members.update(files)
    record["arrays"] = descs
    members[f"{record['path']}/zarr.json"] = M.node_doc(record)
    _write_file(bundle_path(root, record["path"]), archive_bytes(members))


def _logical_dtypes_as_written(record: dict) -> bool:
    """Whether every descriptor of a finished tensor's record carries the logical dtype
    its codec gives, and no other (what `write_array` records since 1.5)."""
    unit = codecs.get(record["codec"])
    return unit is not None and all(
        desc.get("logical_dtype") == unit.logical_dtype(name, record["dtype"])
        for name, desc in record["arrays"].items())


def _shown(key: str, value) -> str:
    """A root member as a refused resume names it: attachments by name and hash, since
    their text runs to kilobytes."""
    if key != "attachments":
        return repr(value)
    if not isinstance(value, list):
        return "none"
    return ", ".join(f"{e.get('name')} sha256 {str(e.get('sha256'))[:12]}"
                     for e in value if isinstance(e, dict))


class StoreWriter:
    """The coordinator. `StoreWriter(path, meta, resume=...)` starts (or picks up) a
    store whose root says complete: false until `commit`."""

    def __init__(self, path, meta: dict, resume: bool = False, bundled: bool = False):
        self.root = Path(path)
        self.bundled = bundled      # tensors staged as bundles, for an archive
        self.meta = {"format_version": C.FORMAT_VERSION, **meta}
        self.dictionaries: dict[str, dict] = {}
        root_meta = self.root / C.ROOT_META
        if resume and not self.root.exists():
            raise StoreExistsError(f"{self.root}: nothing to resume (no such store)")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.root)
        try:
            if root_meta.exists() or not _never_started(self.root):
                if not resume:
                    raise StoreExistsError(f"{self.root}: already exists and is not empty; "
                                           "use --resume to finish an interrupted pack")
                self._check_resumable(root_meta)
            self._remove_partials()
            # The root first: from here on the directory is a store that says incomplete,
            # so a kill at any later instant leaves something --resume accepts.
            _write_file(root_meta, M.root_doc(dict(self.meta, complete=False)))
            _write_file(self.root / C.TENSORS / "zarr.json", M.group_doc())
            _write_file(self.root / C.DICTIONARIES / "zarr.json", M.group_doc())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Lets another writer at the store (the lock is the process's until then)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _check_resumable(self, root_meta: Path) -> None:
        old = read_root(self.root)
        if old.get("complete"):
            raise StoreExistsError(f"{self.root}: store is already complete")
        # The attachments too: the finished store's config must be the one its tensors'
        # run saw, as an uninterrupted pack would have recorded (spec §8).
        for key in ("pack", "plan", "attachments"):
            if old.get(key) != self.meta.get(key):
                raise StoreExistsError(
                    f"{root_meta}: cannot resume: the interrupted pack had different "
                    f"{key} ({_shown(key, old.get(key))}); start over in a new directory")

    def _remove_partials(self) -> None:
        """The temporary files of a killed writer; a tensor's directory can match the
        glob too (names are data, §4.3), so only files of the temporary form go."""
        for p in self.root.rglob("*.partial.*"):
            if _PARTIAL.fullmatch(p.name) and p.is_file():
                p.unlink()

    # -- resume support -------------------------------------------------------------
    def finished_record(self, tensor_path: str) -> dict | None:
        """The record of a tensor a previous run finished, if its files are intact and its
        record is what this writer would write: one left by a writer before 1.5, whose
        descriptors lack the logical dtypes its codec gives (spec §4.5), is redone, as an
        uninterrupted pack would record them and a 1.5 store without them is refused."""
        found = self._finished_bundle(tensor_path) if self.bundled else None
        if found is not None:
            # the bundle holds the tensor: any files of it beside would be staged twice
            shutil.rmtree(self.root / tensor_path, ignore_errors=True)
            return found
        doc_path = self.root / tensor_path / "zarr.json"
        if not doc_path.exists():
            if self.bundled:    # arrays a killed file-by-file writer left: the bundle redoes them
                shutil.rmtree(self.root / tensor_path, ignore_errors=True)
            return None
        return self._kept(self.root, tensor_path, lambda: shutil.rmtree(
            self.root / tensor_path, ignore_errors=True))

    def _finished_bundle(self, tensor_path: str) -> dict | None:
        path = bundle_path(self.root, tensor_path)
        if not path.is_file():
            return None
        try:
            root = ArchivePath(Archive(path), "")
        except QmoeError:
            path.unlink(missing_ok=True)
            return None
        if not all(k.startswith(f"{tensor_path}/") for k in root.archive.members):
            path.unlink(missing_ok=True)    # a member of another node: not this writer's
            return None
        return self._kept(root, tensor_path, lambda: path.unlink(missing_ok=True))

    @staticmethod
    def _kept(root, tensor_path: str, remove) -> dict | None:
        """The record of a tensor's files under `root` (a directory or a bundle), or
        None, its files removed, when they are damaged or not what this writer writes."""
        try:
            record = load_json(root / tensor_path / "zarr.json")["attributes"]["qmoefmt"]
            for name, desc in record["arrays"].items():
                check_array_file(root, f"{tensor_path}/{name}", desc, check_crc=True)
            kept = _logical_dtypes_as_written(record)
        except (QmoeError, KeyError, TypeError, AttributeError):
            kept = False
        if not kept:
            remove()
            return None
        return record

    # -- coordinator writes -------------------------------------------------------------
    def add_dictionary(self, d: Dictionary) -> str:
        cid = d.content_id
        if cid in self.dictionaries:
            return cid
        node = M.dictionary_path(cid)
        entry = {"id": cid, "path": node, "kind": d.kind, "params": d.params,
                 "n_states": d.n_states, "max_nnz": d.max_nnz}
        if d.form != "tables":      # absent, the 1.0 form: such entries keep their bytes
            entry["form"] = d.form
        entry["arrays"] = {name: write_array(self.root, f"{node}/{name}", a)
                           for name, a in d.stored_arrays().items()}
        _write_file(self.root / node / "zarr.json", M.node_doc(entry))
        self.dictionaries[cid] = entry
        return cid

    def adopt_dictionary(self, cid: str) -> None:
        """Takes over a dictionary a previous (interrupted) run wrote."""
        if cid in self.dictionaries:
            return
        node = M.dictionary_path(cid)
        entry = load_json(self.root / node / "zarr.json")["attributes"]["qmoefmt"]
        for name, desc in entry["arrays"].items():
            check_array_file(self.root, f"{node}/{name}", desc, check_crc=True)
        self.dictionaries[cid] = entry

    def write_tensor(self, record: dict, arrays: dict) -> None:
        """The writer thread's work: a tensor's arrays, then its group, marking it done
        (or, staging for an archive, its bundle); sets the record's descriptors."""
        if self.bundled:
            write_bundle(self.root, record, arrays)
            return
        record["arrays"] = write_arrays(self.root, record["path"], arrays)
        self.finish_tensor(record)

    def finish_tensor(self, record: dict) -> None:
        """Marks one tensor done: its group metadata, written after all its arrays."""
        _write_file(self.root / record["path"] / "zarr.json", M.node_doc(record))

    def commit(self, records: list[dict]) -> None:
        used = {r["dictionary"] for r in records if "dictionary" in r}
        # The incomplete root declared the newest version the pack might need; the final
        # one declares the lowest its codecs, root members and index need (spec §3): 1.5
        # where a descriptor records a logical dtype (§4.5).
        entries = [self.dictionaries[c] for c in sorted(used)]
        meta = dict(self.meta, complete=True, dictionaries=entries, tensors=records)
        meta["format_version"] = needed_version({r["codec"] for r in records}, entries, meta)
        doc = M.root_doc(meta)
        too_big = M.root_size_problem(doc)
        if too_big:
            # the reader's limit, checked before the marker: a store readers refuse is not complete
            raise QmoeError(f"{self.root / C.ROOT_META}: the completed root would be {too_big}")
        os.sync()   # every array and group durable before the marker says complete
        _write_file(self.root / C.ROOT_META, doc, durable=True)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.close()
