"""The single-file form (spec §15): a store as one ZIP archive, read like its directory,
by qmoefmt and by plain Zarr readers, written deterministically by pack and convert, and
every single-byte change of it detected."""
from __future__ import annotations

import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import qmoefmt
from qmoefmt.errors import FormatError
from qmoefmt.pack import PackOptions, pack
from qmoefmt.store import archive as A
from qmoefmt.store.verify import verify
from qmoefmt.testing import kill, paths
from qmoefmt.testing.fuzz_targets import checkpoint
from qmoefmt.testing.trees import files_of
from qmoefmt_cli.main import main as cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("archives")
    out = {}
    for name in paths.STORES:
        out[name] = d / f"{name}.zip"
        A.write_archive(paths.store(name), out[name])
    return out


@pytest.mark.parametrize("name", paths.STORES)
def test_an_archive_reads_as_its_directory(name, archives):
    a, b = qmoefmt.open(paths.store(name)), qmoefmt.open(archives[name])
    assert list(a) == list(b) and a.meta == b.meta
    for t in a:
        assert np.array_equal(a[t].decode(), b[t].decode(), equal_nan=True), t
        for arr in a[t].record["arrays"]:
            assert np.array_equal(a[t].array(arr), b[t].array(arr))
    assert verify(archives[name], deep=True) == []
    with zipfile.ZipFile(archives[name]) as z:
        assert z.testzip() is None          # the zip CRC-32s hold
        names = z.namelist()
        assert names == A.order(names)
        assert sorted(names) == sorted(files_of(paths.store(name)))
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())


def test_members_are_aligned_for_mapping(archives):
    ar = A.Archive(archives["switch-tiny.qmoe"])
    for key in ar.members:
        assert ar.data_offset(key) % A.ALIGN == 0, key
    st = qmoefmt.open(archives["switch-tiny.qmoe"])
    t = next(st[n] for n in st if st[n].codec == "qmoe.ternary-dict16")
    codes = t.array("codes")
    assert codes.base is not None and not codes.flags.writeable     # a view of the mapping


def test_archiving_is_deterministic_and_convert_round_trips(tmp_path, archives):
    src = paths.store("edge-auto.qmoe")
    assert run("convert", src, tmp_path / "a.zip").exit_code == 0
    assert (tmp_path / "a.zip").read_bytes() == archives["edge-auto.qmoe"].read_bytes()
    r = run("convert", tmp_path / "a.zip", tmp_path / "back.qmoe", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["form"] == "directory"
    assert files_of(tmp_path / "back.qmoe") == files_of(src)
    r = run("convert", src, tmp_path / "a.zip")
    assert r.exit_code == 1 and "already exists" in r.output
    r = run("convert", src, tmp_path / "a.tar")
    assert r.exit_code == 2 and "*.zip" in r.output


def test_zarr_python_and_tensorstore_read_every_array(archives):
    import zarr
    from zarr.storage import ZipStore
    ts = pytest.importorskip("tensorstore")
    path = archives["switch-tiny-2bit-dict16.qmoe"]
    st = qmoefmt.open(path)
    group = zarr.open_group(ZipStore(path, mode="r"), mode="r")
    n = 0
    nodes = [(st[t].path, st[t].record["arrays"], st[t].array) for t in st]
    for node, arrays, get in nodes:
        for a in arrays:
            want = np.asarray(get(a))
            z = group[f"{node}/{a}"][...]
            spec = {"driver": "zarr3", "kvstore": {"driver": "zip", "base": f"file://{path}",
                                                   "path": f"{node}/{a}/"}}
            t = ts.open(spec, read=True).result().read().result()
            assert np.array_equal(z, want.view(z.dtype)) and np.array_equal(t, want.view(t.dtype))
            n += 1
    assert n > 60


def test_pack_to_an_archive_equals_archiving_the_directory(tmp_path):
    (tmp_path / "src").mkdir()
    ckpt = checkpoint(tmp_path / "src" / "model.safetensors")
    opts = PackOptions(experts=("experts.*",), dictionary="qmoe-2023")
    pack(ckpt, tmp_path / "d.qmoe", opts)
    s = pack(ckpt, tmp_path / "z.qmoe.zip", opts)
    assert not (tmp_path / "z.qmoe.zip.partial").exists()
    A.write_archive(tmp_path / "d.qmoe", tmp_path / "ref.zip")
    assert (tmp_path / "z.qmoe.zip").read_bytes() == (tmp_path / "ref.zip").read_bytes()
    assert s.store_bytes == (tmp_path / "z.qmoe.zip").stat().st_size
    r = run("pack", ckpt, tmp_path / "z.qmoe.zip", "--experts", "experts.*")
    assert r.exit_code == 1 and "already exists" in r.output


@pytest.mark.parametrize("at", [0, 5, -1])
def test_a_killed_pack_into_an_archive_resumes_to_the_same_bytes(tmp_path, at):
    (tmp_path / "src").mkdir()
    ckpt = checkpoint(tmp_path / "src" / "model.safetensors")
    options = {"experts": ["experts.*"], "dictionary": "qmoe-2023"}
    # the archive pack's own writes: it stages each tensor as one bundle
    writes = kill.counted_writes(ckpt, tmp_path / "ref.zip", options)
    assert any(w.startswith("bundles/") for w in writes)
    out = tmp_path / "o.qmoe.zip"
    assert kill.kill_at(ckpt, out, at % len(writes), "renaming", options) == -9
    assert not out.exists() and (tmp_path / "o.qmoe.zip.partial").is_dir()
    pack(ckpt, out, PackOptions(**options), resume=True)
    assert out.read_bytes() == (tmp_path / "ref.zip").read_bytes()


def test_an_archive_pack_resumes_loose_staging_and_damaged_bundles(tmp_path):
    """Staging written file by file (by an earlier version, or a directory pack killed in
    OUT.zip.partial) is taken over tensor by tensor; a damaged bundle is redone."""
    (tmp_path / "src").mkdir()
    ckpt = checkpoint(tmp_path / "src" / "model.safetensors")
    options = {"experts": ["experts.*"], "dictionary": "qmoe-2023"}
    opts = PackOptions(**options)
    pack(ckpt, tmp_path / "ref.zip", opts)
    out = tmp_path / "o.qmoe.zip"
    loose = len(kill.counted_writes(ckpt, tmp_path / "count.qmoe", options))
    assert kill.kill_at(ckpt, tmp_path / "o.qmoe.zip.partial", loose // 2, "before",
                        options) == -9
    s = pack(ckpt, out, opts, resume=True)
    assert s.resumed_tensors > 0 and out.read_bytes() == (tmp_path / "ref.zip").read_bytes()

    out.unlink()
    bundled = kill.counted_writes(ckpt, tmp_path / "count.zip", options)
    assert kill.kill_at(ckpt, out, len(bundled) - 2, "before", options) == -9
    bundles = sorted((tmp_path / "o.qmoe.zip.partial" / "bundles").glob("*.zip"))
    assert len(bundles) > 2
    raw, ar = bytearray(bundles[1].read_bytes()), A.Archive(bundles[1])
    raw[ar.data_offset(max(ar.members, key=lambda k: ar.members[k][1]))] ^= 1
    del ar
    bundles[1].write_bytes(bytes(raw))
    bundles[2].write_bytes(bundles[2].read_bytes()[:100])
    ar = A.Archive(bundles[3])      # a member outside its tensor's node
    members = {k: ar.view(k).tobytes() for k in ar.members}
    del ar
    bundles[3].write_bytes(A.archive_bytes({**members, "zarr.json": b"{}"}))
    s = pack(ckpt, out, opts, resume=True)
    assert s.resumed_tensors == len(bundles) - 3
    assert out.read_bytes() == (tmp_path / "ref.zip").read_bytes()


def test_a_pack_killed_while_archiving_resumes_by_archiving(tmp_path):
    (tmp_path / "src").mkdir()
    ckpt = checkpoint(tmp_path / "src" / "model.safetensors")
    opts = PackOptions(experts=("experts.*",), dictionary="qmoe-2023")
    pack(ckpt, tmp_path / "o.qmoe.zip.partial", opts)      # complete, not yet archived
    A.write_archive(tmp_path / "o.qmoe.zip.partial", tmp_path / "ref.zip")
    s = pack(ckpt, tmp_path / "o.qmoe.zip", opts, resume=True)
    assert (tmp_path / "o.qmoe.zip").read_bytes() == (tmp_path / "ref.zip").read_bytes()
    assert s.resumed_tensors == len(qmoefmt.open(tmp_path / "o.qmoe.zip"))


# ------------------------------------------------------------------ damage

@pytest.fixture(scope="module")
def small_archive(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("small-archive")
    rng = np.random.default_rng(11)
    w = torch.from_numpy((rng.standard_normal((2, 7)) * 0.05).astype(np.float32))
    save_file({"e.w": w.to(torch.bfloat16), "n": torch.ones(3)}, str(d / "m.safetensors"))
    pack(d / "m.safetensors", d / "s.qmoe.zip", PackOptions(experts=("e.*",),
                                                            dictionary="qmoe-2023"))
    return d / "s.qmoe.zip"


def _structure(path: Path) -> list[int]:
    """Every byte offset of the archive outside its members' data."""
    ar = A.Archive(path)
    data = set()
    for key, (_, size, _) in ar.members.items():
        start = ar.data_offset(key)
        data.update(range(start, start + size))
    return [i for i in range(ar.size) if i not in data], ar


@pytest.mark.slow
def test_every_structural_byte_change_of_an_archive_is_detected(tmp_path, small_archive):
    """Spec §15 with §10: each byte outside the members' data (headers, padding, central
    directory, end records) XOR 0x01, and 300 random data bytes, each refused by open or
    reported by verify."""
    raw = small_archive.read_bytes()
    structural, ar = _structure(small_archive)
    rng = np.random.default_rng(5)
    data = sorted(set(range(len(raw))) - set(structural))
    positions = structural + sorted(rng.choice(data, 300, replace=False).tolist())
    path, missed = tmp_path / "m.zip", []
    for i in positions:
        buf = bytearray(raw)
        buf[i] ^= 0x01
        path.write_bytes(buf)
        try:
            if not verify(path):
                missed.append(i)
        except FormatError:
            pass
    assert len(structural) > 2000
    assert not missed, f"{len(missed)} undetected changes at {missed[:10]} of {len(raw)} bytes"


def test_truncated_extended_and_foreign_archives_are_refused(tmp_path, small_archive):
    raw = small_archive.read_bytes()
    cases = {"truncated": raw[:-1], "extended": raw + b"\0", "half": raw[:len(raw) // 2],
             "commented": raw[:-2] + struct.pack("<H", 3) + b"abc", "magic only": A.MAGIC}
    for what, data in cases.items():
        p = tmp_path / f"{what.replace(' ', '-')}.zip"
        p.write_bytes(data)
        with pytest.raises(FormatError) as e:
            qmoefmt.open(p)
        assert str(p) in str(e.value), what
        r = run("verify", p)
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, (what, r.output)


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_a_deflated_or_duplicated_member_is_refused(tmp_path, small_archive):
    src = zipfile.ZipFile(small_archive)
    p = tmp_path / "deflated.zip"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info))
    with pytest.raises(FormatError, match="stored only"):
        qmoefmt.open(p)
    p = tmp_path / "twice.zip"
    with zipfile.ZipFile(p, "w") as z:
        for info in src.infolist() + src.infolist()[:1]:
            z.writestr(info.filename, src.read(info))
    with pytest.raises(FormatError, match="appears twice"):
        qmoefmt.open(p)


def test_an_archive_of_another_tool_opens_but_does_not_verify(tmp_path, small_archive):
    # Python's zipfile writes other headers (timestamps, no padding): readable, and
    # verify says it is not the canonical archive
    src = zipfile.ZipFile(small_archive)
    p = tmp_path / "other.zip"
    with zipfile.ZipFile(p, "w") as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info))
    st = qmoefmt.open(p)
    ref = qmoefmt.open(small_archive)
    for t in st:
        assert np.array_equal(st[t].decode(), ref[t].decode())
    lines = [str(x) for x in verify(p)]
    assert lines and all("canonical" in ln for ln in lines), lines


# ------------------------------------------------------------------ the central directory
# Archive reads it with numpy (`_central_fast`) and, where that refuses it, entry by entry
# (`_read_central`, whose error names the entry and field): the first must accept only what
# the second accepts, with the same members in the same order.

def _unread(raw: bytes, path="x.zip") -> A.Archive:
    """An Archive over `raw` with its end records read, its central directory not yet."""
    ar = object.__new__(A.Archive)
    ar.path, ar.size, ar.map = Path(path), len(raw), np.frombuffer(raw, np.uint8)
    ar.entries, ar.cd_offset, ar.cd_end = ar._end_records(path)
    return ar


def _readings(raw: bytes):
    """(vectorised, entry by entry) readings of raw's central directory, each its members as
    a list of items or None where refused; None for both where the end records are."""
    try:
        ar = _unread(raw)
    except FormatError:
        return None, None
    fast = ar._central_fast()
    try:
        slow = list(ar._read_central("x.zip").items())
    except FormatError:
        slow = None
    return None if fast is None else list(fast.items()), slow


def _assert_agree(raw: bytes, what=""):
    fast, slow = _readings(raw)
    assert fast is None or fast == slow, what
    return fast, slow


def _zip(files, central=A._central) -> bytes:
    """An archive of (name bytes, data) in the given order, canonical but for that order and
    the central entries `central` makes."""
    members = [(n, len(d), zlib.crc32(d)) for n, d in files]
    headers, cd_offset, _ = A.layout(members)
    body = b"".join(h + d for (_, h), (_, d) in zip(headers, files))
    cd = b"".join(central(n, s, c, at) for (n, s, c), (at, _) in zip(members, headers))
    return body + cd + A._end(len(files), len(cd), cd_offset)


def _central64(fields=("u", "c", "at"), before=b""):
    """Central entries in ZIP64 form for the fields named (their 32-bit values 0xFFFFFFFF,
    their 64-bit ones in a ZIP64 extra field after the extra fields `before`)."""
    def central(name, size, crc, offset):
        vals = {"u": size, "c": size, "at": offset}
        z = b"".join(struct.pack("<Q", vals[f]) for f in ("u", "c", "at") if f in fields)
        extra = before + struct.pack("<HH", A.ZIP64_ID, len(z)) + z
        small = {f: A.U32 if f in fields else vals[f] for f in vals}
        return A.CENTRAL.pack(A.CENTRAL_SIG, 45, 45, A.FLAGS, 0, 0, A.DOS_DATE, crc,
                              small["c"], small["u"], len(name), len(extra), 0, 0, 0, 0,
                              small["at"]) + name + extra
    return central


FILES = [(b"a/PK\x01\x02/zarr.json", b"{}" * 40), (b"a/b", b"PK\x01\x02" * 30),
         (b"a/c\xc3\xa9", b""), (b"zarr.json", bytes(range(256)))]


@pytest.mark.parametrize("name", paths.STORES)
def test_the_vectorised_reading_is_the_entry_by_entry_one(name, archives):
    raw = archives[name].read_bytes()
    fast, slow = _readings(raw)
    assert fast is not None and fast == slow
    assert isinstance(A.Archive(archives[name]).members, A._Members)


@pytest.mark.parametrize("central", [A._central, _central64(), _central64(("at",)),
                                     _central64(("u", "c")), _central64(("c",)),
                                     _central64(before=struct.pack("<HH", 0xCAFE, 3) + b"xyz")],
                         ids=["plain", "zip64", "zip64-offset", "zip64-sizes",
                              "zip64-csize", "zip64-second"])
def test_zip64_entries_and_a_signature_in_a_name_read_alike(tmp_path, central):
    raw = _zip(FILES, central)
    fast, slow = _readings(raw)
    assert fast is not None and fast == slow and [k for k, _ in fast] == [
        n.decode() for n, _ in FILES]
    p = tmp_path / "z.zip"
    p.write_bytes(raw)
    ar = A.Archive(p)
    assert [ar.view(n.decode()).tobytes() for n, _ in FILES] == [d for _, d in FILES]
    assert ar.dirs == {"", "a", "a/PK\x01\x02"}


def test_names_and_order_are_checked_alike(tmp_path):
    unsorted = [FILES[3], FILES[0], FILES[1]]
    fast, slow = _readings(_zip(unsorted))
    assert fast is not None and fast == slow           # another tool's order: read by dict
    p = tmp_path / "u.zip"
    p.write_bytes(_zip(unsorted))
    assert isinstance(A.Archive(p).members, A._Members) and "a/b" in A.Archive(p).members
    bad = {"twice": "appears twice", "a//b": "not a store key", "/a": "not a store key",
           "a/": "not a store key", "./a": "not a store key", "a/..": "not a store key",
           "a/../b": "not a store key", "": "not a store key", "a\\b": "not a store key",
           "a\0b": "not a store key", "a\xff": "not UTF-8", "a\xc3": "not UTF-8"}
    for name, error in bad.items():
        if name == "twice":
            files = [(b"a/b", b"1"), (b"a/b", b"2")]
        else:
            files = [(b"a/a", b"1"), (name.encode("latin-1"), b"2"), (b"b", b"")]
        raw = _zip(files)
        assert _readings(raw) == (None, None), name
        p = tmp_path / "bad.zip"
        p.write_bytes(raw)
        with pytest.raises(FormatError, match=error) as e:
            A.Archive(p)
        assert str(p) in str(e.value) and "\n" not in str(e.value), name


@pytest.mark.parametrize("many", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["xor1", "many"])
@pytest.mark.parametrize("central", [A._central, _central64(),
                                     pytest.param(_central64(("at",)), marks=pytest.mark.slow)],
                         ids=["plain", "zip64", "zip64-offset"])
def test_every_change_of_the_central_directory_is_read_alike(central, many, small_archive):
    """Each byte of the central directory and end records XOR 0x01 (or, slow, changed to
    each of a few values): the vectorised reading refuses it or reads what the entry-by-
    entry one does."""
    src = zipfile.ZipFile(small_archive)
    files = [(i.filename.encode(), src.read(i)) for i in src.infolist()] + FILES[:3]
    raw = bytearray(_zip(files, central))
    ar = _unread(bytes(raw))
    accepted = refused = 0
    for i in range(ar.cd_offset, len(raw)):
        was = raw[i]
        values = {was ^ 0x01, was ^ 0x80, 0x00, 0x2E, 0x2F, 0x50, 0xFF} if many else {was ^ 1}
        for v in values - {was}:
            raw[i] = v
            fast, slow = _assert_agree(bytes(raw), (i, v))
            accepted += fast is not None
            refused += slow is None
        raw[i] = was
    assert accepted > 1000 * (1 + 3 * many) and refused > 400 * (1 + 9 * many)
