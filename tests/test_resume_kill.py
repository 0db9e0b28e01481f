"""A store is resumable from every instant of its writing (issue 10 §1-§2): a pack killed
(SIGKILL) at each stage finishes under --resume to the bytes of an uninterrupted pack; a
second writer is refused; tensor names are data and cannot break the layout."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import qmoefmt
from qmoefmt.pack import PackError, PackOptions, pack
from qmoefmt.store import writer as W
from qmoefmt.store.verify import verify
from qmoefmt.store.writer import StoreExistsError
from qmoefmt.testing import kill
from qmoefmt.testing.trees import files_of

OPTIONS = {"experts": ["*experts*"], "dictionary": "qmoe-2023"}


def checkpoint(path: Path, names=None) -> Path:
    rng = np.random.default_rng(1)
    names = names or [f"layers.{i}.experts.{e}.w" for i in range(2) for e in range(2)]
    tensors = {n: (rng.standard_normal((8, 24)) * 0.1).astype(np.float32) for n in names}
    tensors["norm.weight"] = np.ones(24, np.float32)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The checkpoint, an uninterrupted pack of it, and the writes that pack made."""
    tmp = tmp_path_factory.mktemp("kill")
    ckpt = checkpoint(tmp / "m.safetensors")
    writes = kill.counted_writes(ckpt, tmp / "ref.qmoe", OPTIONS)
    return ckpt, files_of(tmp / "ref.qmoe"), writes


def kill_at(ckpt, out, n, mode):
    return kill.kill_at(ckpt, out, n, mode, OPTIONS)


def stages(writes: list[str]) -> dict[str, int]:
    """Write numbers of the stages the issue names."""
    first_dict = next(i for i, w in enumerate(writes) if w.startswith("dictionaries/sha256"))
    tensors = [i for i, w in enumerate(writes) if w.startswith("tensors/") and
               w.count("/") == 2 and w.endswith("/zarr.json")]
    return {"directory created": 0, "root written": 1, "first dictionary": first_dict,
            "first tensor": tensors[0], "k-th tensor": tensors[len(tensors) // 2],
            "commit": len(writes) - 1}


@pytest.mark.parametrize("stage", ["directory created", "root written", "first dictionary",
                                   "first tensor", "k-th tensor", "commit"])
@pytest.mark.parametrize("mode", ["before", "renaming"])
def test_kill_then_resume_is_byte_identical(reference, tmp_path, stage, mode):
    ckpt, want, writes = reference
    out = tmp_path / "s.qmoe"
    assert kill_at(ckpt, out, stages(writes)[stage], mode) == -9
    assert out.is_dir()
    with pytest.raises(qmoefmt.QmoeError):
        qmoefmt.open(out)                       # never looks complete
    pack(ckpt, out, PackOptions(**OPTIONS), resume=True)
    assert files_of(out) == want


def test_a_killed_resume_resumes(reference, tmp_path):
    ckpt, want, writes = reference
    out = tmp_path / "s.qmoe"
    assert kill_at(ckpt, out, stages(writes)["first tensor"], "before") == -9
    assert kill_at(ckpt, out, 3, "renaming") == -9   # the resume is killed too
    pack(ckpt, out, PackOptions(**OPTIONS), resume=True)
    assert files_of(out) == want


def test_groups_written_before_the_root_start_over(reference, tmp_path):
    """The issue's reproducer: what an older writer left when killed before its root."""
    ckpt, want, _ = reference
    for resume in (False, True):
        out = tmp_path / f"o{resume}"
        (out / "tensors").mkdir(parents=True)
        (out / "tensors" / "zarr.json").write_text(
            '{"attributes":{},"node_type":"group","zarr_format":3}')
        pack(ckpt, out, PackOptions(**OPTIONS), resume=resume)
        assert files_of(out) == want


def test_a_users_directory_is_refused(reference, tmp_path):
    ckpt, _, _ = reference
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    with pytest.raises(StoreExistsError, match="already exists and is not empty"):
        pack(ckpt, out, PackOptions(**OPTIONS))
    assert (out / "notes.txt").read_text() == "x" and len(list(out.iterdir())) == 1


def test_a_second_writer_is_refused(reference, tmp_path):
    ckpt, want, _ = reference
    out = tmp_path / "s.qmoe"
    out.mkdir()
    held = W._lock(out)             # another writer, mid-pack
    try:
        for resume in (False, True):
            with pytest.raises(StoreExistsError, match="another qmoefmt process is writing"):
                pack(ckpt, out, PackOptions(**OPTIONS), resume=resume)
    finally:
        os.close(held)
    pack(ckpt, out, PackOptions(**OPTIONS), resume=True)
    assert files_of(out) == want


NAMES = ["a/b/../c", "..", ".", "x.partial.123", "X.PARTIAL.9", "zarr.json", "ZARR.JSON", "c",
         "nul\x00name", "Zwölf 😀 experts", "tensors", "__init__", "a" * 300]


def test_names_are_data(tmp_path, monkeypatch):
    names = [f"experts.{n}" for n in NAMES] + NAMES
    ckpt = checkpoint(tmp_path / "m.safetensors", names)
    ref = tmp_path / "ref.qmoe"
    pack(ckpt, ref, PackOptions(experts=("*",), dictionary="qmoe-2023"))
    st = qmoefmt.open(ref)
    assert sorted(t.name for t in st.tensors()) == sorted(names + ["norm.weight"])
    paths = [st[n].path for n in names]
    assert len({p.lower() for p in paths}) == len(paths)
    assert all(p.count("/") == 1 and ".partial." not in p.lower()
               and p.split("/")[1].lower() != "zarr.json" for p in paths)
    assert verify(ref, deep=True) == []
    # Interrupted before its commit, the store resumes (a node named like a temporary file
    # once made every resume fail).
    out = tmp_path / "s.qmoe"
    monkeypatch.setattr(W.StoreWriter, "commit", lambda self, records: None)
    pack(ckpt, out, PackOptions(experts=("*",), dictionary="qmoe-2023"))
    monkeypatch.undo()
    pack(ckpt, out, PackOptions(experts=("*",), dictionary="qmoe-2023"), resume=True)
    assert files_of(out) == files_of(ref)


def test_a_name_over_the_limit_is_refused_before_writing(tmp_path):
    ckpt = checkpoint(tmp_path / "m.safetensors", ["experts." + "n" * 4096])
    with pytest.raises(PackError, match="a name of 4104 bytes; a store allows 4096"):
        pack(ckpt, tmp_path / "s.qmoe", PackOptions(**OPTIONS))
    assert not (tmp_path / "s.qmoe").exists()
