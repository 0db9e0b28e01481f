"""The single-file form of a store (spec §15): a ZIP archive of the store's files, each
member stored uncompressed with its data aligned to 64 bytes, so that a chunk is a byte
range of one file, memory-mapped like a chunk file; zarr-python's ZipStore and
tensorstore's zip kvstore read it as the same Zarr hierarchy.

The archive's structure (headers, padding, central directory, end records) is a function
of its members' names, sizes and CRC-32s: `layout` computes it for the writer, and
`Archive.structure_problems` compares every structural byte with it for verify. Reading
validates the end records and central directory before any member is used, and a
member's local header before its bytes are.

`store_root(path)` gives a directory store's Path, or for an archive an `ArchivePath`:
the few pathlib operations the reader and verify use, over the archive's members."""
from __future__ import annotations

import bisect
import functools
import itertools
import mmap
import operator
import os
import shutil
import stat
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import FormatError, LimitError

LOCAL_SIG, CENTRAL_SIG, END_SIG = 0x04034B50, 0x02014B50, 0x06054B50
ZIP64_END_SIG, ZIP64_LOCATOR_SIG = 0x06064B50, 0x07064B50
LOCAL = struct.Struct("<IHHHHHIIIHH")            # 30 bytes
CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")    # 46 bytes
END = struct.Struct("<IHHHHIIH")                 # 22 bytes
ZIP64_END = struct.Struct("<IQHHIIQQQQ")         # 56 bytes
ZIP64_LOCATOR = struct.Struct("<IIQI")           # 20 bytes
ALIGN = 64
PAD_ID = 0xD935                 # the zipalign extra field: alignment (2 bytes), then zeros
ZIP64_ID = 0x0001
FLAGS = 0x0800                  # bit 11: names are UTF-8
DOS_TIME, DOS_DATE = 0, 0x0021  # 1980-01-01 00:00, the earliest a ZIP can say
VERSION, VERSION_ZIP64 = 20, 45
U16, U32 = 0xFFFF, 0xFFFFFFFF
MAGIC = struct.pack("<I", LOCAL_SIG)


def is_archive(path: Path) -> bool:
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except (OSError, ValueError):
        return False


def store_root(path) -> Path | "ArchivePath":
    """What the reader walks: the directory, or the archive's root."""
    p = Path(path)
    return ArchivePath(Archive(p), "") if is_archive(p) else p


# ------------------------------------------------------------------ layout

def _local(name: bytes, size: int, crc: int, offset: int) -> bytes:
    zip64 = size >= U32 or offset >= U32
    extra = struct.pack("<HHQQ", ZIP64_ID, 16, size, size) if zip64 else b""
    base = offset + LOCAL.size + len(name) + len(extra)
    pad = 6 + (-(base + 6)) % ALIGN
    extra += struct.pack("<HHH", PAD_ID, pad - 4, ALIGN) + bytes(pad - 6)
    small = U32 if zip64 else size
    return LOCAL.pack(LOCAL_SIG, VERSION_ZIP64 if zip64 else VERSION, FLAGS, 0, DOS_TIME,
                      DOS_DATE, crc, small, small, len(name), len(extra)) + name + extra


def _central(name: bytes, size: int, crc: int, offset: int) -> bytes:
    zip64 = size >= U32 or offset >= U32
    extra = struct.pack("<HHQQQ", ZIP64_ID, 24, size, size, offset) if zip64 else b""
    version = VERSION_ZIP64 if zip64 else VERSION
    small, at = (U32, U32) if zip64 else (size, offset)
    return CENTRAL.pack(CENTRAL_SIG, version, version, FLAGS, 0, DOS_TIME, DOS_DATE, crc,
                        small, small, len(name), len(extra), 0, 0, 0, 0, at) + name + extra


def _end(entries: int, cd_size: int, cd_offset: int) -> bytes:
    if entries < U16 and cd_size < U32 and cd_offset < U32:
        return END.pack(END_SIG, 0, 0, entries, entries, cd_size, cd_offset, 0)
    end64_at = cd_offset + cd_size
    return (ZIP64_END.pack(ZIP64_END_SIG, ZIP64_END.size - 12, VERSION_ZIP64, VERSION_ZIP64,
                           0, 0, entries, entries, cd_size, cd_offset)
            + ZIP64_LOCATOR.pack(ZIP64_LOCATOR_SIG, 0, end64_at, 1)
            + END.pack(END_SIG, 0, 0, U16, U16, U32, U32, 0))


def layout(members):
    """members: (name bytes, size, crc32) in archive order. Returns ([(offset of local
    header, header bytes)], offset of the central directory, central directory and end
    records as bytes): everything in the archive but the members' data."""
    headers, offset = [], 0
    for name, size, crc in members:
        h = _local(name, size, crc, offset)
        headers.append((offset, h))
        offset += len(h) + size
    central = b"".join(_central(n, s, c, at) for (n, s, c), (at, _) in zip(members, headers))
    return headers, offset, central + _end(len(members), len(central), offset)


def order(keys) -> list[str]:
    """Members in archive order: by their names' UTF-8 bytes."""
    return sorted(keys, key=lambda k: k.encode("utf-8", "surrogatepass"))


def archive_bytes(members: dict[str, bytes]) -> bytes:
    """The archive of in-memory members {key: bytes} (a staged tensor's files, one file
    in place of seven: `bundles`)."""
    keys = order(members)
    entries = [(k.encode("utf-8"), len(members[k]), zlib.crc32(members[k])) for k in keys]
    headers, _, tail = layout(entries)
    return b"".join(itertools.chain.from_iterable(
        (h, members[k]) for (_, h), k in zip(headers, keys))) + tail


def _files(src: Path, skip: str | None) -> dict[str, tuple[str, int]]:
    """key -> (path, size) of every regular file under `src`, but the top-level `skip`."""
    files = {}
    for top, dirs, names in os.walk(src):
        rel = os.path.relpath(top, src).replace(os.sep, "/")
        if rel == "." and skip in dirs:
            dirs.remove(skip)
        for n in names:
            path = os.path.join(top, n)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):        # what a file is to Path.is_file
                files[n if rel == "." else f"{rel}/{n}"] = (path, st.st_size)
    return files


def write_archive(src: Path, out: Path, progress=None, bundled: dict | None = None,
                  skip: str | None = None) -> int:
    """The archive of the complete store directory `src`, written to `out` (through a
    temporary name, flushed, then renamed), but its top-level folder `skip`. `bundled`:
    {key: Archive} of members held in other archives (how a pack into an archive stages
    its tensors: `bundles`). Returns its size in bytes."""
    bundled = bundled or {}
    files = _files(src, skip)
    both = files.keys() & bundled.keys()
    if both:
        raise OSError(f"{src}: {min(both)} is staged twice (a file and in a bundle)")
    size_of = {k: size for k, (_, size) in files.items()}
    size_of.update((k, ar.members[k][1]) for k, ar in bundled.items())
    keys = order(size_of)
    tmp = out.with_name(f"{out.name}.partial.{os.getpid()}")
    members = []
    try:
        with open(tmp, "wb") as f:
            at = 0
            for key in keys:
                name, size = key.encode("utf-8"), size_of[key]
                if key in bundled:
                    ar = bundled[key]
                    data = ar.map[ar.data_offset(key):][:size]
                    crc = zlib.crc32(data)
                    head = f.write(_local(name, size, crc, at))
                    f.write(data)
                else:
                    path = files[key][0]
                    with open(path, "rb") as g:
                        if size <= WHOLE_MEMBER:
                            # most members: read whole, so the header goes out with its CRC
                            data = g.read(size + 1)
                            if len(data) != size:
                                raise OSError(f"{path}: changed while it was archived")
                            crc = zlib.crc32(data)
                            head = f.write(_local(name, size, crc, at))
                            f.write(data)
                        else:
                            crc, head = _copy_member(f, g, name, size, at, path)
                at += head + size
                members.append((name, size, crc))
                if progress:
                    progress(1)
            _, cd_offset, tail = layout(members)
            if f.tell() != cd_offset:
                raise OSError(f"{src}: a file changed while it was archived")
            f.write(tail)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out.stat().st_size


WHOLE_MEMBER = 1 << 22      # members up to this size are read whole, larger ones in blocks


def _copy_member(f, g, name: bytes, size: int, at: int, path: str) -> tuple[int, int]:
    """A member too large to hold: header, data in blocks, then its CRC written back.
    -> (its CRC-32, the header's length)."""
    head = f.write(_local(name, size, 0, at))
    crc = 0
    while block := g.read(WHOLE_MEMBER):
        crc = zlib.crc32(block, crc)
        f.write(block)
    end = f.tell()
    if end - at - size != head:
        raise OSError(f"{path}: changed while it was archived")
    f.seek(at + 14)          # the CRC-32 field of the local header
    f.write(struct.pack("<I", crc))
    f.seek(end)
    return crc, head


def extract_archive(archive: "Archive", out: Path, progress=None) -> int:
    """The archive's members as a store directory at `out` (staged in OUT.partial/, then
    renamed): the same files, byte for byte. Returns the bytes written."""
    tmp = out.with_name(f"{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    total = 0
    try:
        for key in archive.members:
            dst = tmp.joinpath(*key.split("/"))
            dst.parent.mkdir(parents=True, exist_ok=True)
            data = archive.view(key)
            with open(dst, "wb") as f:
                f.write(memoryview(data))
            total += data.size
            if progress:
                progress(1)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return total


# ------------------------------------------------------------------ reading

class Archive:
    """A store archive, its central directory validated (spec §15)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        where = str(self.path)
        try:
            with open(self.path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                self.map = (np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ),
                                          np.uint8) if self.size else np.zeros(0, np.uint8))
        except OSError as e:
            raise FormatError(where, f"cannot be read ({e.strerror or e})") from None
        self.entries, self.cd_offset, self.cd_end = self._end_records(where)
        # key -> (header at, size, crc): vectorised, or entry by entry where that refuses
        # the directory, for the one-line error naming the first bad entry and field
        members = self._central_fast()
        if members is None:
            members = self._read_central(where)
        self.members: Mapping[str, tuple[int, int, int]] = members
        self._data: dict[str, int] = {}

    @functools.cached_property
    def dirs(self) -> set[str]:
        """Every directory the members imply, the root "" among them (computed when first
        asked: opening and reading a store asks only for files and the root)."""
        dirs, level = {""}, {k.rpartition("/")[0] for k in self.members}
        while level := level - dirs:
            dirs |= level
            level = {d.rpartition("/")[0] for d in level}
        return dirs

    def _bytes(self, at: int, n: int) -> bytes:
        return self.map[at:at + n].tobytes()

    def _end_records(self, where: str) -> tuple[int, int, int]:
        if self.size < END.size:
            raise FormatError(where, "not a store archive: too short for a ZIP end record")
        sig, disk, cd_disk, n_disk, n, cd_size, cd_offset, comment = END.unpack(
            self._bytes(self.size - END.size, END.size))
        if sig != END_SIG or comment != 0:
            raise FormatError(where, "not a store archive: no ZIP end record in its last 22 "
                                     "bytes (an archive comment is not allowed, spec §15)")
        if disk or cd_disk or n_disk != n:
            raise FormatError(where, "a multi-disk ZIP archive (spec §15 allows one file)")
        cd_end = self.size - END.size
        if n == U16 or cd_size == U32 or cd_offset == U32:
            at = self.size - END.size - ZIP64_LOCATOR.size
            if at < 0:
                raise FormatError(where, "ZIP64 end locator missing")
            lsig, _, end64_at, disks = ZIP64_LOCATOR.unpack(self._bytes(at, ZIP64_LOCATOR.size))
            if lsig != ZIP64_LOCATOR_SIG or disks != 1 or end64_at != at - ZIP64_END.size:
                raise FormatError(where, "ZIP64 end locator missing or not just before the "
                                         "end record")
            (esig, _, _, _, d, dcd, n_disk, n, cd_size, cd_offset) = ZIP64_END.unpack(
                self._bytes(end64_at, ZIP64_END.size))
            if esig != ZIP64_END_SIG or d or dcd or n_disk != n:
                raise FormatError(where, "ZIP64 end record is not valid")
            cd_end = end64_at
        if cd_offset + cd_size != cd_end:
            raise FormatError(where, f"central directory at {cd_offset} of {cd_size} bytes "
                                     f"does not end where the end records begin ({cd_end})")
        if n > cd_size // CENTRAL.size:
            raise LimitError(where, f"{n} members cannot fit a central directory of "
                                    f"{cd_size} bytes")
        return n, cd_offset, cd_end

    def _central_fast(self) -> _Members | None:
        """The members, from the central directory read with numpy over the whole of it,
        or None where any entry fails a check `_read_central` makes (or one this does not
        make vectorised): that then reads it entry by entry and names the first problem.
        What this accepts, `_read_central` accepts, with the same members in the same
        order."""
        cd = self.map[self.cd_offset:self.cd_end]
        size, n = len(cd), self.entries
        if n == 0 or size < CENTRAL.size:
            return {} if n == 0 and size == 0 else None
        # The entries: the chain from offset 0, each entry's lengths giving the next one,
        # through the offsets holding the signature (with its 46 bytes in the directory).
        # Offsets a name or extra field happens to hold the signature at are off the chain.
        at = np.flatnonzero(cd[:size - CENTRAL.size + 1] == 0x50)
        at = at[_window(cd, 4)[at].view("<u4")[:, 0] == CENTRAL_SIG]
        if len(at) < n or at[0] != 0:
            return None
        e = _window(cd, CENTRAL.size)[at].view(_CENTRAL_DT)[:, 0]
        nxt = at + CENTRAL.size + e["n"].astype(np.int64) + e["e"] + e["c"]
        if len(at) != n or nxt[-1] != size or not np.array_equal(nxt[:-1], at[1:]):
            j = np.minimum(np.searchsorted(at, nxt), len(at) - 1)
            succ = np.where(at[j] == nxt, j, np.where(nxt == size, -1, -2)).tolist()
            chain, k = [0], 0
            for _ in range(n - 1):
                k = succ[k]
                if k < 0:
                    return None
                chain.append(k)
            if succ[k] != -1:
                return None
            at, e = at[chain], e[chain]
        if (e["method"] != 0).any() or (e["flags"] & 0x0009).any():
            return None
        usize, csize, offset = (e[f].astype(np.uint64) for f in ("usize", "csize", "at"))
        if not self._zip64_fast(cd, at, e, usize, csize, offset):
            return None
        limit = self.cd_offset - LOCAL.size             # at + 30 + usize <= cd_offset
        if (limit < 0 or not np.array_equal(csize, usize) or (offset > limit).any()
                or (usize > np.uint64(limit) - offset).any()):
            return None
        # the names, back to back, each but the last followed by a NUL: UTF-8 store keys
        nl = e["n"].astype(np.int64)
        if not nl.all():
            return None
        start, span = at + CENTRAL.size, nl + 1
        span[-1] -= 1
        runs = np.empty(2 * n, np.int64)
        runs[0], runs[2::2] = start[0], start[1:] - start[:-1] - span[:-1]
        runs[1::2] = span
        keep = np.repeat(np.tile(np.array([False, True]), n), runs)
        names = cd[:len(keep)][keep]
        sep = np.cumsum(span)[:-1] - 1
        names[sep] = 0x2F
        if not names.all() or (names == 0x5C).any():   # a NUL or a backslash in a name
            return None
        names[sep] = 0
        # every segment of every key (split at '/' and at the NULs): not '', '.' or '..'
        cut = np.flatnonzero((names == 0x2F) | (names == 0))
        cut = np.concatenate(([-1], cut, [len(names)]))
        seg = np.diff(cut) - 1
        one, two = cut[:-1][seg == 1] + 1, cut[:-1][seg == 2] + 1
        if (not seg.all() or (names[one] == 0x2E).any()
                or ((names[two] == 0x2E) & (names[two + 1] == 0x2E)).any()):
            return None
        try:
            keys = names.tobytes().decode("utf-8").split("\0")
        except UnicodeDecodeError:
            return None
        members = _Members(keys, offset, usize, e["crc"].copy())
        return members if members.unique() else None

    @staticmethod
    def _zip64_fast(cd, at, e, usize, csize, offset) -> bool:
        """`_zip64` for every entry whose sizes or offset say ZIP64, in place; False where
        one fails it."""
        ks = np.flatnonzero((usize == U32) | (csize == U32) | (offset == U32))
        if not len(ks):
            return True
        x = at[ks] + CENTRAL.size + e["n"][ks]              # each one's extra field
        el = e["e"][ks].astype(np.int64)
        want = np.stack([usize[ks] == U32, csize[ks] == U32, offset[ks] == U32])
        q = 8 * (np.cumsum(want, axis=0) - want)            # each value's place in its field
        # the usual case: the ZIP64 field comes first (as `layout` writes it)
        head = _window(cd, 4)[np.minimum(x, len(cd) - 4)]
        head = head.view("<u2")
        first = (el >= 4) & (head[:, 0] == ZIP64_ID)
        first &= 8 * want.sum(axis=0) <= np.minimum(head[:, 1], el - 4)
        vals = np.zeros((3, len(ks)), np.uint64)
        words = _window(cd, 8)
        for f in range(3):
            src = np.minimum(x + 4 + q[f], len(cd) - 8)
            vals[f] = words[src].view("<u8")[:, 0]
        for i in np.flatnonzero(~first).tolist():           # others: field by field
            k, p = int(ks[i]), int(x[i])
            try:
                vals[:, i] = _zip64(cd[p:p + int(el[i])].tobytes(), int(usize[k]),
                                    int(csize[k]), int(offset[k]), "")
            except FormatError:
                return False
            want[:, i] = True
        for f, arr in enumerate((usize, csize, offset)):
            arr[ks] = np.where(want[f], vals[f], arr[ks])
        return True

    def _read_central(self, where: str) -> dict[str, tuple[int, int, int]]:
        """The members, the central directory read entry by entry, refusing it at its first
        problem; the reference for `_central_fast`."""
        cd = self._bytes(self.cd_offset, self.cd_end - self.cd_offset)
        members: dict[str, tuple[int, int, int]] = {}
        p = 0
        for i in range(self.entries):
            if p + CENTRAL.size > len(cd):
                raise FormatError(where, f"central directory entry {i} runs past its end")
            (sig, _, _, flags, method, _, _, crc, csize, usize, n, e, c, _, _, _,
             at) = CENTRAL.unpack_from(cd, p)
            if sig != CENTRAL_SIG:
                raise FormatError(where, f"central directory entry {i}: bad signature")
            if p + CENTRAL.size + n + e + c > len(cd):
                raise FormatError(where, f"central directory entry {i} runs past its end")
            raw = cd[p + CENTRAL.size:p + CENTRAL.size + n]
            extra = cd[p + CENTRAL.size + n:p + CENTRAL.size + n + e]
            p += CENTRAL.size + n + e + c
            try:
                key = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError(where, f"member {i}: name is not UTF-8") from None
            at_where = f"{where}/{key}"
            if method != 0 or flags & 0x0009:
                raise FormatError(at_where, "member is compressed, encrypted or has a data "
                                            "descriptor (spec §15: stored only)")
            if usize == U32 or csize == U32 or at == U32:
                usize, csize, at = _zip64(extra, usize, csize, at, at_where)
            if csize != usize:
                raise FormatError(at_where, "stored member whose sizes differ")
            _check_key(key, at_where)
            if key in members:
                raise FormatError(at_where, "member appears twice in the archive")
            if at + LOCAL.size + usize > self.cd_offset:
                raise FormatError(at_where, "member's data would run into the central directory")
            members[key] = (at, usize, crc)
        if p != len(cd):
            raise FormatError(where, f"{len(cd) - p} bytes after the last central directory "
                                     "entry")
        return members

    def data_offset(self, key: str) -> int:
        """Where a member's bytes begin, its local header checked against the directory."""
        if key in self._data:
            return self._data[key]
        at, size, crc = self.members[key]
        where = f"{self.path}/{key}"
        (sig, _, flags, method, _, _, lcrc, csize, usize, n, e) = LOCAL.unpack(
            self._bytes(at, LOCAL.size))
        name = self._bytes(at + LOCAL.size, n)
        if sig != LOCAL_SIG or name != key.encode("utf-8") or method != 0 or flags & 0x0009:
            raise FormatError(where, "local header does not match the central directory")
        if lcrc != crc or (csize, usize) not in ((size, size), (U32, U32)):
            raise FormatError(where, "local header's CRC or sizes differ from the central "
                                     "directory's")
        start = at + LOCAL.size + n + e
        if start + size > self.cd_offset:
            raise FormatError(where, "member's data would run into the central directory")
        self._data[key] = start
        return start

    def view(self, key: str) -> np.ndarray:
        """A member's bytes, uint8, mapped."""
        start = self.data_offset(key)
        return self.map[start:start + self.members[key][1]]

    def structure_problems(self) -> list[tuple[str, str]]:
        """(where, what) for each structural byte range that differs from the canonical
        archive of these members (spec §15): with the data checked by the store's own
        CRCs, every byte of the file is then accounted for."""
        keys = list(self.members)
        where = str(self.path)
        if keys != order(keys):
            return [(where, "members are not in the order of their names' UTF-8 bytes")]
        members = []
        for key in keys:
            try:
                data = self.view(key)
            except FormatError as e:
                return [(e.where, e.what)]
            members.append((key.encode("utf-8"), data.size, zlib.crc32(data)))
        headers, cd_offset, tail = layout(members)
        out = []
        for key, (at, want) in zip(keys, headers):
            if self._bytes(at, len(want)) != want or self.members[key][0] != at:
                out.append((f"{where}/{key}", "local header is not the canonical one "
                                              "(spec §15): its fields, padding or CRC-32"))
        if cd_offset != self.cd_offset or self.size != cd_offset + len(tail):
            out.append((where, "members, padding or end records are not where the "
                               "canonical archive has them (spec §15)"))
        elif self._bytes(cd_offset, len(tail)) != tail:
            out.append((where, "central directory or end records are not the canonical "
                               "ones (spec §15)"))
        return out


class _Members(Mapping):
    """key -> (local header at, size, CRC-32) of a central directory read by numpy: the
    keys in directory order, found by bisection where that order is the canonical one
    (then the keys are known distinct without a dict of them), else by a dict."""

    def __init__(self, keys: list[str], at: np.ndarray, size: np.ndarray, crc: np.ndarray):
        self._keys, self._at, self._size, self._crc = keys, at, size, crc
        self._index: dict[str, int] | None = None
        # str order is code point order, which is UTF-8 byte order: the archive's (§15)
        if not all(map(operator.lt, keys, itertools.islice(keys, 1, None))):
            self._index = dict(zip(keys, range(len(keys))))

    def unique(self) -> bool:
        return self._index is None or len(self._index) == len(self._keys)

    def _find(self, key) -> int:
        if self._index is not None:
            return self._index.get(key, -1) if isinstance(key, str) else -1
        if not isinstance(key, str):
            return -1
        i = bisect.bisect_left(self._keys, key)
        return i if i < len(self._keys) and self._keys[i] == key else -1

    def __getitem__(self, key) -> tuple[int, int, int]:
        i = self._find(key)
        if i < 0:
            raise KeyError(key)
        return int(self._at[i]), int(self._size[i]), int(self._crc[i])

    def __contains__(self, key) -> bool:
        return self._find(key) >= 0

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


_CENTRAL_DT = np.dtype({
    "names": ["sig", "flags", "method", "crc", "csize", "usize", "n", "e", "c", "at"],
    "formats": ["<u4", "<u2", "<u2", "<u4", "<u4", "<u4", "<u2", "<u2", "<u2", "<u4"],
    "offsets": [0, 8, 10, 16, 20, 24, 28, 30, 32, 42], "itemsize": CENTRAL.size})


def _window(buf: np.ndarray, n: int) -> np.ndarray:
    """The n bytes at each offset of `buf` (a view): indexed by offsets, their copies, to
    view as n-byte records."""
    return np.lib.stride_tricks.sliding_window_view(buf, n)


def _zip64(extra: bytes, usize: int, csize: int, at: int, where: str):
    p = 0
    while p + 4 <= len(extra):
        hid, n = struct.unpack_from("<HH", extra, p)
        if hid == ZIP64_ID:
            fields = extra[p + 4:p + 4 + n]
            vals, q = [], 0
            for v in (usize, csize, at):
                if v == U32:
                    if q + 8 > len(fields):
                        raise FormatError(where, "ZIP64 extra field too short")
                    vals.append(struct.unpack_from("<Q", fields, q)[0])
                    q += 8
                else:
                    vals.append(v)
            return tuple(vals)
        p += 4 + n
    raise FormatError(where, "sizes say ZIP64 but there is no ZIP64 extra field")


def _check_key(key: str, where: str) -> None:
    parts = key.split("/")
    if (not key or "\\" in key or "\0" in key or any(s in ("", ".", "..") for s in parts)):
        raise FormatError(where, "member name is not a store key (spec §15: relative, '/'-"
                                 "separated, no empty, '.' or '..' segment)")


# ------------------------------------------------------------------ paths

class _Stat:
    def __init__(self, size: int, mode: int):
        self.st_size, self.st_mode = size, mode


class ArchivePath:
    """A key of an archive, with the pathlib operations the reader and verify use."""

    def __init__(self, archive: Archive, key: str):
        self.archive, self.key = archive, key

    def __truediv__(self, other) -> "ArchivePath":
        other = str(other)
        return ArchivePath(self.archive, f"{self.key}/{other}" if self.key else other)

    def __str__(self) -> str:
        return f"{self.archive.path}/{self.key}" if self.key else str(self.archive.path)

    def __repr__(self) -> str:
        return f"ArchivePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return (isinstance(other, ArchivePath) and other.archive is self.archive
                and other.key == self.key)

    def __hash__(self) -> int:
        return hash((id(self.archive), self.key))

    def __lt__(self, other) -> bool:
        return self.key < other.key

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def is_file(self) -> bool:
        return self.key in self.archive.members

    def is_dir(self) -> bool:
        return not self.key or self.key in self.archive.dirs     # the root without `dirs`

    def exists(self) -> bool:
        return self.is_file() or self.is_dir()

    def stat(self) -> _Stat:
        if self.is_file():
            return _Stat(self.archive.members[self.key][1], stat.S_IFREG | 0o444)
        if self.is_dir():
            return _Stat(0, stat.S_IFDIR | 0o555)
        raise FileNotFoundError(str(self))

    def read_bytes(self) -> bytes:
        if not self.is_file():
            raise FileNotFoundError(str(self))
        return self.archive.view(self.key).tobytes()

    def rglob(self, pattern: str):
        assert pattern == "*"
        prefix = f"{self.key}/" if self.key else ""
        for key in sorted(self.archive.members.keys() | self.archive.dirs):
            if key.startswith(prefix) and key != self.key:
                yield ArchivePath(self.archive, key)

    def glob(self, pattern: str):
        """Only '*/NAME': the members NAME one level down."""
        star, _, leaf = pattern.partition("/")
        assert star == "*" and "/" not in leaf and "*" not in leaf
        depth = self.key.count("/") + 2 if self.key else 1
        for p in self.rglob("*"):
            if p.key.count("/") == depth and p.name == leaf and p.is_file():
                yield p


def map_chunk(chunk, dtype: np.dtype, shape: tuple) -> np.ndarray:
    """A chunk's values, mapped: from its file, or from its archive member (copied when the
    member is not aligned to the data type, as another tool's archive may not be)."""
    if isinstance(chunk, ArchivePath):
        raw = chunk.archive.view(chunk.key)
        if raw.ctypes.data % dtype.itemsize:
            raw = raw.copy()
        return raw.view(dtype).reshape(shape)
    if shape == ():
        return np.fromfile(chunk, dtype=dtype, count=1).reshape(())
    return np.memmap(chunk, dtype=dtype, mode="r", shape=shape)
