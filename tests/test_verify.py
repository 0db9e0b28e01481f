"""verify and the reader against damaged stores: the committed broken stores, and every
single-byte change of a small freshly packed store."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import qmoefmt
import qmoefmt.store_reader as store_reader
from qmoefmt import layout
from qmoefmt.dict_qmoe import build_qmoe2023
from qmoefmt.dictionary import Dictionary
from qmoefmt.errors import QmoeError
from qmoefmt.pack import PackOptions, pack
from qmoefmt.verify import verify
from qmoefmt_cli.main import main as cli

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "fixtures"
BROKEN = FIX / "broken"
CASES = json.loads((BROKEN / "cases.json").read_text())
GOOD = ["switch-tiny.qmoe", "switch-tiny-qmoe2023.qmoe", "edge.qmoe", "edge-auto.qmoe"]


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def open_and_decode(path: Path) -> None:
    st = qmoefmt.open(path)
    for name in st:
        t = st[name]
        if t.codec == layout.CODEC_DENSE:
            t.numpy()
        else:
            t.symbols()
            t.decode()


def test_cases_cover_the_brief():
    need = {"root-checksum", "root-not-json", "unknown-major", "incomplete", "missing-chunk",
            "truncated-chunk", "flipped-codes-byte", "tampered-array-meta",
            "tampered-tensor-meta", "extra-file", "partial-leftover", "row-codes-sum",
            "short-row", "extra-codeword", "dict-next-state", "scales-lo-positive", "rank-9",
            "dotdot-path"}
    assert need <= set(CASES)
    for name in CASES:
        assert (BROKEN / name / "zarr.json").is_file(), name
    # git ignores *.partial.*: make sure the file was committed (git add -f)
    assert (BROKEN / "partial-leftover/tensors/edge.odd/codes/c/0.partial.123").is_file()


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_store_cli(case):
    c = CASES[case]
    r = CliRunner().invoke(cli, ["verify", "--deep", str(BROKEN / case)])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "Traceback" not in r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert lines and any(c["expect"] in ln for ln in lines), lines
    # one line per problem: each names a path inside the store
    for ln in lines:
        assert str(BROKEN / case) in ln, ln


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_store_verify_function(case):
    c = CASES[case]
    deep = [str(p) for p in verify(BROKEN / case, deep=True)]
    assert any(c["expect"] in p for p in deep), deep
    shallow = [str(p) for p in verify(BROKEN / case, deep=False)]
    if c["deep_only"]:
        assert not any(c["expect"] in p for p in shallow), shallow
    else:
        assert any(c["expect"] in p for p in shallow), shallow


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_store_open(case):
    c = CASES[case]
    if c["open_expect"] is None:
        open_and_decode(BROKEN / case)
        return
    with pytest.raises(QmoeError) as e:
        open_and_decode(BROKEN / case)
    assert c["open_expect"] in str(e.value)


def test_verify_json_on_broken_store():
    r = run_cli("verify", "--json", BROKEN / "flipped-codes-byte")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["deep"] is False
    assert any("crc32c mismatch" in p["what"] for p in doc["problems"])
    assert all(set(p) == {"where", "what"} for p in doc["problems"])


def test_empty_path_segment_is_refused(tmp_path):
    """Spec 4.3: a path is tensors/ plus ONE NON-EMPTY segment other than . and ..
    BUG qmoefmt/store_reader.py Store._index accepts "tensors/" (and "tensors/.", see
    fixtures/broken/dot-path)."""
    dst = tmp_path / "s.qmoe"
    shutil.copytree(FIX / "edge.qmoe", dst)
    meta = json.loads((dst / "zarr.json").read_bytes())["attributes"]["qmoefmt"]
    next(r for r in meta["tensors"] if r["name"] == "edge.odd")["path"] = "tensors/"
    (dst / "zarr.json").write_bytes(layout.root_doc(meta))
    with pytest.raises(QmoeError, match="bad path"):
        qmoefmt.open(dst)


@pytest.mark.parametrize("store", GOOD)
def test_good_fixture_stores_verify_clean(store):
    r = CliRunner().invoke(cli, ["verify", "--deep", str(FIX / store)])
    assert r.exit_code == 0, r.output
    assert "ok" in r.stdout and "deep" in r.stdout


# ------------------------------------------------------------------ every byte

@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    """A freshly packed minimal store: one coded bf16 tensor (odd width), qmoe-2023."""
    d = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(11)
    w = torch.from_numpy((rng.standard_normal((2, 7)) * 0.05).astype(np.float32))
    save_file({"e.w": w.to(torch.bfloat16)}, str(d / "m.safetensors"))
    pack(d / "m.safetensors", d / "s.qmoe", PackOptions(experts=("e.*",),
                                                        dictionary="qmoe-2023"))
    assert verify(d / "s.qmoe", deep=True) == []
    return d / "s.qmoe"


@pytest.fixture
def memo_dictionary_checks(monkeypatch):
    """Speed only, exact: validating the tables and hashing them to the content id are
    pure functions of the tables' bytes. When those bytes equal the pristine qmoe-2023
    tables (which validate, with a known id) reuse the answer; otherwise run the real
    code. Every mutation of a table chunk therefore still goes through the real checks."""
    pristine = build_qmoe2023().tables()
    pristine_id = build_qmoe2023().content_id
    real_validate = store_reader.validate_tables
    real_id = Dictionary.content_id

    def same(get):
        return all(np.array_equal(get(k), v) for k, v in pristine.items())

    def validate(t, where):
        if same(t.__getitem__):
            return None
        return real_validate(t, where)

    def content_id(self):
        if same(lambda k: getattr(self, k)):
            return pristine_id
        return real_id.fget(self)

    monkeypatch.setattr(store_reader, "validate_tables", validate)
    monkeypatch.setattr(Dictionary, "content_id", property(content_id))


SMALL_FILE = 64 * 1024


@pytest.fixture
def scratch(tmp_path):
    """A RAM-backed directory when there is one: ~10^4 rewrites of small files."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="qmoefmt-test-", dir=shm))
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


def test_every_single_byte_change_is_detected(scratch, small_store, memo_dictionary_checks):
    """Spec 10: any change to any single byte of a store is detectable. Every byte of
    every file under 64 KiB, XOR 0x01 and (separately) a random other value; a few
    hundred random positions of the larger files (the dictionary tables)."""
    store = scratch / "s.qmoe"
    shutil.copytree(small_store, store)
    assert verify(store) == []
    rng = np.random.default_rng(2024)
    files = sorted(p for p in store.rglob("*") if p.is_file())
    small = [p for p in files if p.stat().st_size < SMALL_FILE]
    large = [p for p in files if p.stat().st_size >= SMALL_FILE]
    assert len(small) >= 15 and len(large) == 5
    missed: list[str] = []
    tried = 0

    def mutate(path: Path, raw: bytes, positions) -> None:
        nonlocal tried
        buf = bytearray(raw)
        for i in positions:
            old = raw[i]
            other = int(rng.integers(0, 255))
            other += other >= old                       # any value but the old one
            for new in (old ^ 0x01, other):
                buf[i] = new
                path.write_bytes(buf)
                tried += 1
                if not verify(store):
                    missed.append(f"{path.relative_to(store)}[{i}]: {old:#04x} -> {new:#04x}")
            buf[i] = old
        path.write_bytes(raw)

    for path in small:
        raw = path.read_bytes()
        mutate(path, raw, range(len(raw)))
    for path in large:
        raw = path.read_bytes()
        mutate(path, raw, sorted(rng.choice(len(raw), 50, replace=False)))
    assert tried > 8000
    assert not missed, f"{len(missed)} undetected single-byte changes, e.g. {missed[:10]}"
    assert verify(store, deep=True) == []            # everything was restored


def test_truncation_and_appending_are_detected(tmp_path, small_store):
    store = tmp_path / "s.qmoe"
    shutil.copytree(small_store, store)
    for path in sorted(p for p in store.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        for changed in (raw[:-1], raw + b"\n", raw + b"\x00", b""):
            path.write_bytes(changed)
            assert verify(store), (path, len(changed))
        path.unlink()
        assert verify(store), path
        path.write_bytes(raw)
    assert verify(store) == []
