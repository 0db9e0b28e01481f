"""The single-file form (spec §15): a store as one ZIP archive, read like its directory,
by qmoefmt and by plain Zarr readers, written deterministically by pack and convert, and
every single-byte change of it detected."""
from __future__ import annotations

import json
import struct
import zipfile
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
    writes = kill.counted_writes(ckpt, tmp_path / "ref.qmoe", options)
    A.write_archive(tmp_path / "ref.qmoe", tmp_path / "ref.zip")
    out = tmp_path / "o.qmoe.zip"
    assert kill.kill_at(ckpt, out, at % len(writes), "renaming", options) == -9
    assert not out.exists() and (tmp_path / "o.qmoe.zip.partial").is_dir()
    pack(ckpt, out, PackOptions(**options), resume=True)
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
