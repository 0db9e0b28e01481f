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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import qmoefmt
import qmoefmt.store.reader as store_reader
from qmoefmt import format as fmt
from qmoefmt.dictionaries.qmoe2023 import build_qmoe2023
from qmoefmt.dictionaries.tables import Dictionary
from qmoefmt.errors import QmoeError
from qmoefmt.pack import PackOptions, pack
from qmoefmt.store.verify import verify
from qmoefmt.testing.versions import declare
from qmoefmt.testing import paths
from qmoefmt_cli.main import main as cli

CASES = json.loads((paths.BROKEN / "cases.json").read_text())


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def open_and_decode(path: Path) -> None:
    st = qmoefmt.open(path)
    for name in st:
        t = st[name]
        if t.codec == fmt.CODEC_DENSE:
            t.numpy()
        else:
            t.symbols()
            t.decode()


def test_cases_cover_the_brief(broken_dir):
    need = {"root-checksum", "root-not-json", "unknown-major", "incomplete", "missing-chunk",
            "truncated-chunk", "flipped-codes-byte", "tampered-array-meta",
            "tampered-tensor-meta", "extra-file", "partial-leftover", "row-codes-sum",
            "short-row", "extra-codeword", "dict-next-state", "dict-trie-prefix",
            "dict-form-unknown", "scales-lo-positive", "rank-9", "dotdot-path"}
    assert need <= set(CASES)
    for name in CASES:
        assert (broken_dir / name / "zarr.json").is_file(), name
    # git ignores *.partial.*: make sure the file was committed (git add -f)
    assert (broken_dir / "partial-leftover/tensors/edge.odd/codes/c/0.partial.123").is_file()


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_store_cli(case, broken_dir):
    c = CASES[case]
    r = CliRunner().invoke(cli, ["verify", "--deep", str(broken_dir / case)])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "Traceback" not in r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert lines and any(c["expect"] in ln for ln in lines), lines
    # one line per problem: each names a path inside the store
    for ln in lines:
        assert str(broken_dir / case) in ln, ln


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_store_verify_function(case, broken_dir):
    c = CASES[case]
    deep = [str(p) for p in verify(broken_dir / case, deep=True)]
    assert any(c["expect"] in p for p in deep), deep
    shallow = [str(p) for p in verify(broken_dir / case, deep=False)]
    if c["deep_only"]:
        assert not any(c["expect"] in p for p in shallow), shallow
    else:
        assert any(c["expect"] in p for p in shallow), shallow


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_store_open(case, broken_dir):
    c = CASES[case]
    if c["open_expect"] is None:
        open_and_decode(broken_dir / case)
        return
    with pytest.raises(QmoeError) as e:
        open_and_decode(broken_dir / case)
    assert c["open_expect"] in str(e.value)


def test_verify_json_on_broken_store(broken_dir):
    r = run_cli("verify", "--json", broken_dir / "flipped-codes-byte")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["deep"] is False
    assert any("crc32c mismatch" in p["what"] for p in doc["problems"])
    assert all(set(p) == {"where", "what"} for p in doc["problems"])


def test_empty_path_segment_is_refused(tmp_path, fixture_store):
    """Spec 4.3: a path is tensors/ plus ONE NON-EMPTY segment other than . and ..
    BUG qmoefmt/store_reader.py Store._index accepts "tensors/" (and "tensors/.", see
    fixtures/broken/dot-path)."""
    dst = tmp_path / "s.qmoe"
    shutil.copytree(fixture_store("edge.qmoe"), dst)
    meta = json.loads((dst / "zarr.json").read_bytes())["attributes"]["qmoefmt"]
    next(r for r in meta["tensors"] if r["name"] == "edge.odd")["path"] = "tensors/"
    (dst / "zarr.json").write_bytes(fmt.root_doc(meta))
    with pytest.raises(QmoeError, match="bad path"):
        qmoefmt.open(dst)


@pytest.mark.parametrize("store", paths.TERNARY_STORES)
def test_good_fixture_stores_verify_clean(store, fixture_store):
    r = CliRunner().invoke(cli, ["verify", "--deep", str(fixture_store(store))])
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


@pytest.mark.slow
def test_every_single_byte_change_is_detected(scratch, small_store, memo_dictionary_checks):
    """Spec 10: any change to any single byte of a store is detectable. Every byte of
    every file under 64 KiB, XOR 0x01 and (separately) a random other value; a few
    hundred random positions of the larger files (the dictionary's trie, spec 5.7.2)."""
    store = scratch / "s.qmoe"
    shutil.copytree(small_store, store)
    assert verify(store) == []
    rng = np.random.default_rng(2024)
    files = sorted(p for p in store.rglob("*") if p.is_file())
    small = [p for p in files if p.stat().st_size < SMALL_FILE]
    large = [p for p in files if p.stat().st_size >= SMALL_FILE]
    assert len(small) >= 13 and len(large) == 2
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


# ------------------------------------------------------------------ index defects

def _resign(dst: Path, meta: dict, regroup: bool = True) -> None:
    """Write the root (checksum recomputed) and every tensor group doc from `meta`."""
    if regroup:
        for rec in meta.get("tensors", []):
            p = dst / rec["path"] / "zarr.json"
            if isinstance(rec.get("path"), str) and p.parent.is_dir():
                p.write_bytes(fmt.group_doc({"qmoefmt": rec}))
    (dst / "zarr.json").write_bytes(fmt.root_doc(meta))


def _odd(meta):
    return next(r for r in meta["tensors"] if r["name"] == "edge.odd")


INDEX_DEFECTS = {
    # name: (mutate(meta), open/decode error or None, verify problem or None)
    "huge-shape": (lambda m: _odd(m).update(shape=[2**21, 2**20]), "exceeds", "exceeds"),
    "negative-dim": (lambda m: _odd(m).update(shape=[-9, -77]), "negative dimension",
                     "negative dimension"),
    "long-name": (lambda m: _odd(m).update(name="x" * 4097), "longer than 4096",
                  "longer than 4096"),
    "duplicate-name": (lambda m: m["tensors"].append(dict(_odd(m))), "listed twice",
                       "listed twice"),
    "unknown-dtype": (lambda m: _odd(m).update(dtype="complex64"), "unknown dtype",
                      "unknown dtype"),
    "tensors-not-list": (lambda m: m.update(tensors={}), "not a list", "not a list"),
    "unknown-dictionary": (lambda m: _odd(m).update(dictionary="sha256:" + "0" * 64),
                           "unknown dictionary", "unknown dictionary"),
    "dictionary-path": (lambda m: m["dictionaries"][0].update(path="dictionaries/x"),
                        "has path", "has path"),
    "arrays-missing": (lambda m: _odd(m)["arrays"].pop("scales"), "'scales' missing",
                       "expected ['codes', 'row_codes', 'scales']"),
    "symbol-counts-sum": (lambda m: _odd(m).update(symbol_counts=[1, 2, 3]), None,
                          "do not add up"),
    "unknown-codec": (lambda m: _odd(m).update(codec="acme.future"), "acme.future",
                      "unknown codec"),
}


@pytest.mark.parametrize("defect", sorted(INDEX_DEFECTS))
def test_index_defects(tmp_path, defect, fixture_store):
    mutate, open_err, verify_err = INDEX_DEFECTS[defect]
    dst = tmp_path / "s.qmoe"
    shutil.copytree(fixture_store("edge.qmoe"), dst)
    meta = json.loads((dst / "zarr.json").read_bytes())["attributes"]["qmoefmt"]
    mutate(meta)
    _resign(dst, meta, regroup=defect not in ("long-name", "duplicate-name"))
    if open_err is None:
        open_and_decode(dst)
    else:
        with pytest.raises(QmoeError) as e:
            open_and_decode(dst)
        assert open_err in str(e.value)
    problems = [str(p) for p in verify(dst)]
    assert any(verify_err in p for p in problems), problems


def test_unknown_codec_refuses_only_that_tensor(tmp_path, fixture_store):
    """Spec 3: a tensor whose codec is unknown is refused per tensor, not per store."""
    dst = tmp_path / "s.qmoe"
    shutil.copytree(fixture_store("edge.qmoe"), dst)
    meta = json.loads((dst / "zarr.json").read_bytes())["attributes"]["qmoefmt"]
    _odd(meta)["codec"] = "acme.future"
    _resign(dst, meta)
    st = qmoefmt.open(dst)
    assert "edge.odd" in st
    with pytest.raises(QmoeError, match="acme.future"):
        st["edge.odd"]
    assert st["edge.row"].decode().shape == (1, 301)


def test_newer_minor_version_is_read(tmp_path, fixture_store):
    """Spec 3: a 1.m reader reads any 1.n store, ignoring members it does not know."""
    dst = tmp_path / "s.qmoe"
    shutil.copytree(fixture_store("edge.qmoe"), dst)
    meta = json.loads((dst / "zarr.json").read_bytes())["attributes"]["qmoefmt"]
    declare(meta, "1.99")
    meta["from_the_future"] = {"x": [1, 2]}
    _odd(meta)["also_new"] = True
    _resign(dst, meta)
    st = qmoefmt.open(dst)
    assert st.format_version == "1.99"
    want = qmoefmt.open(fixture_store("edge.qmoe"))
    for name in st:
        if st[name].codec == fmt.CODEC_TERNARY:
            assert np.array_equal(st[name].symbols(), want[name].symbols())
    assert verify(dst) == []


# ------------------------------------------------------------------ malformed indexes

def _set(meta: dict, path: tuple, value) -> None:
    o = meta
    for k in path[:-1]:
        o = o[k]
    o[path[-1]] = value


ODD = "<edge.odd>"     # placeholder for the index of edge.odd's record

# A well-formed JSON root (checksum recomputed) whose index holds a value of the wrong
# type. The reader must answer with a FormatError, verify with a list of problems;
# neither may raise anything else (the CLI would call that "a bug in qmoefmt").
MALFORMED = {
    # verify: fmt.array_doc's int() raises ValueError before the shape is validated
    "array-shape-string": (("tensors", ODD, "arrays", "scales", "shape", 0), "x"),
    # Store._index: `dtype not in STORED_DTYPE` raises TypeError (unhashable)
    "dtype-list": (("tensors", ODD, "dtype"), [1, 2]),
    # Store.dictionary: `cid in self._dicts` raises TypeError (unhashable)
    "dictionary-ref-object": (("tensors", ODD, "dictionary"), {}),
    # verify: `.items()` of a string raises AttributeError
    "dictionary-arrays-string": (("dictionaries", 0, "arrays"), "x"),
    # verify: `entry.get` of a bool raises AttributeError
    "dictionary-entry-bool": (("dictionaries", 0), True),
    # verify: Path / dict raises TypeError
    "dictionary-path-object": (("dictionaries", 0, "path"), {}),
    # check_array_file: chunk c/0/0 under the file c/0 raises NotADirectoryError
    "codes-shape-2d": (("tensors", ODD, "arrays", "codes", "shape"), [1, 2]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_index_values_are_format_errors(tmp_path, case, fixture_store):
    """BUGS (see MALFORMED): verify() and open/decode crash with ValueError, TypeError,
    AttributeError or NotADirectoryError on wrongly typed index values."""
    path, value = MALFORMED[case]
    dst = tmp_path / "s.qmoe"
    shutil.copytree(fixture_store("edge.qmoe"), dst)
    meta = json.loads((dst / "zarr.json").read_bytes())["attributes"]["qmoefmt"]
    i = next(i for i, r in enumerate(meta["tensors"]) if r["name"] == "edge.odd")
    _set(meta, tuple(i if k == ODD else k for k in path), value)
    (dst / "zarr.json").write_bytes(fmt.root_doc(meta))
    problems = verify(dst)                  # must not raise
    assert problems
    with pytest.raises(QmoeError):
        open_and_decode(dst)
    r = CliRunner().invoke(cli, ["verify", str(dst)])
    # the CLI's marker for an exception it did not expect (a crash), not a verify finding
    assert r.exit_code == 1 and "a bug in qmoefmt" not in r.output, r.output


def _json_paths(o, prefix=()):
    if prefix:
        yield prefix
    if isinstance(o, dict):
        for k, v in o.items():
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(o, list):
        for i, v in enumerate(o):
            yield from _json_paths(v, prefix + (i,))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_index_never_crashes(small_store, data):
    """Replace one value of the root index (re-signed) by a value of another type."""
    store = small_store
    raw0 = (store / "zarr.json").read_bytes()
    meta = json.loads(raw0)["attributes"]["qmoefmt"]
    paths = [p for p in _json_paths(meta) if p[0] != "checksum"]
    path = data.draw(st.sampled_from(paths))
    value = data.draw(st.sampled_from([None, 0, 5, -1, 1.5, "x", "tensors/x", [], [1, 2], {},
                                       True, 2**70, {"a": 1}]))
    _set(meta, path, value)
    try:
        (store / "zarr.json").write_bytes(fmt.root_doc(meta))
        try:
            verify(store, deep=True)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"verify raised {type(e).__name__}: {e} for {path} = {value!r}")
        try:
            open_and_decode(store)
        except QmoeError:
            pass
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"open/decode raised {type(e).__name__}: {e} for {path} = {value!r}")
    finally:
        (store / "zarr.json").write_bytes(raw0)


def test_deep_verify_notes_a_dictionary_whose_params_do_not_rebuild_it(tmp_path, fixture_store):
    # params are informative (§5.4): a writer's own construction is a valid store, but
    # verify cannot check its streams are canonical, and says so without failing
    from qmoefmt.testing.fuzz import resign
    store = tmp_path / "s.qmoe"
    shutil.copytree(fixture_store("edge-auto.qmoe"), store)
    doc = json.loads((store / "zarr.json").read_bytes())
    entry = next(e for e in doc["attributes"]["qmoefmt"]["dictionaries"]
                 if e["kind"] == "golomb-v2f")
    entry["params"]["p_zero"] = 0.5
    (store / "zarr.json").write_bytes(fmt.dumps(doc))
    resign(store)
    notes = []
    assert verify(store, deep=True, on_note=notes.append) == []
    assert len(notes) == 1 and "do not rebuild its tables" in str(notes[0])
    assert entry["path"] in notes[0].where
    r = run_cli("verify", "--deep", store)
    assert r.exit_code == 0 and r.output.startswith("note: ") and "ok (" in r.output
    r = run_cli("verify", "--deep", "--json", store)
    assert r.exit_code == 0 and len(json.loads(r.output)["notes"]) == 1
    assert run_cli("verify", store).output.count("note:") == 0     # shallow checks no stream
