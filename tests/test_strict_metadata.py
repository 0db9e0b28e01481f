"""Strict metadata (spec §3, §4, §7, §9, §10): stores whose metadata a hostile or buggy
writer re-signed (checksums recomputed, as the spec describes), each refused by the reader
or reported by verify with a one-line error naming the file, and never a crash."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import qmoefmt
from qmoefmt import codecs
from qmoefmt import format as fmt
from qmoefmt.errors import FormatError
from qmoefmt.pack import PackOptions, pack
from qmoefmt.store.verify import verify
from qmoefmt.store.writer import write_array
from qmoefmt.testing.versions import declare
from qmoefmt_cli.main import main as cli

DENSE = {"mask": torch.tensor([[True, False, True]]),
         "ids": torch.tensor([2**53 + 1, -7, 3], dtype=torch.int64),
         "norm": torch.tensor([0.5, -1.25], dtype=torch.float16)}


def _checkpoint(d: Path) -> Path:
    rng = np.random.default_rng(5)
    w = {f"e.{i}.w": torch.from_numpy((rng.standard_normal((3, 21)) * 0.05).astype(np.float32))
         for i in range(2)}
    save_file({**w, **DENSE}, str(d / "m.safetensors"))
    return d / "m.safetensors"


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("strict")
    ckpt = _checkpoint(d)
    out = {}
    for name, opts in {"ternary": dict(dictionary="qmoe-2023"),
                       "packed": dict(bits="3", group_size=8, kbit_codec="packed"),
                       "dict16": dict(bits="2", group_size=8, kbit_codec="dict16",
                                      dictionary="qmoe-2023")}.items():
        pack(ckpt, d / name, PackOptions(experts=("e.*",), **opts))
        assert verify(d / name, deep=True) == [], name
        out[name] = d / name
    return out


@pytest.fixture
def store(stores, tmp_path, request) -> Path:
    dst = tmp_path / "s.qmoe"
    shutil.copytree(stores[getattr(request, "param", "ternary")], dst)
    return dst


def root_meta(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_bytes())["attributes"]["qmoefmt"]


def resign(store: Path, meta: dict) -> None:
    """The root (checksum recomputed) and every tensor group document from `meta`."""
    for rec in meta.get("tensors", []):
        if len(rec["path"]) < 255 and (store / rec["path"]).is_dir():
            (store / rec["path"] / "zarr.json").write_bytes(fmt.node_doc(rec))
    (store / "zarr.json").write_bytes(fmt.root_doc({k: v for k, v in meta.items()
                                                    if k != "checksum"}))


def sign(raw: bytes) -> bytes:
    """Raw root bytes with their self-checksum recomputed (spec §4.4)."""
    raw = re.sub(rb'"checksum":"[0-9a-f]{8}"', b'"checksum":"00000000"', raw)
    return raw.replace(b'"checksum":"00000000"',
                       b'"checksum":"%08x"' % fmt.crc32c(raw))


def record(meta: dict, name: str) -> dict:
    return next(r for r in meta["tensors"] if r["name"] == name)


def refused(store: Path, match: str, **kw) -> str:
    """open (and decoding every tensor) refuses with a FormatError matching `match`; verify
    reports it; the CLI says it in one line and exits 1. Returns the verify lines."""
    with pytest.raises(FormatError, match=match):
        st = qmoefmt.open(store, **kw)
        for t in st.tensors():
            t.decode()
    return reported(store, match)


def reported(store: Path, match: str) -> str:
    lines = [str(p) for p in verify(store)]
    assert any(re.search(match, ln) for ln in lines), lines
    assert all(str(store) in ln for ln in lines), lines
    r = CliRunner().invoke(cli, ["verify", str(store)])
    assert r.exit_code == 1 and "a bug in qmoefmt" not in r.output, r.output
    assert "Traceback" not in r.output
    return "\n".join(lines)


# ------------------------------------------------------------------ duplicate members

def test_duplicate_members_in_the_root_are_refused(store):
    """A first-member-wins parser would see the incomplete store; a last-wins one the
    complete one: readers refuse the document (spec §4.1)."""
    raw = (store / "zarr.json").read_bytes()
    raw = raw.replace(b'"attributes":{"qmoefmt":{', b'"attributes":{"qmoefmt":{"complete":false},'
                                                   b'"qmoefmt":{', 1)
    (store / "zarr.json").write_bytes(sign(raw))
    refused(store, r"member 'qmoefmt' appears twice")


def test_duplicate_members_in_a_record_are_refused(store):
    raw = (store / "zarr.json").read_bytes()
    raw = raw.replace(b'"dtype":"int64"', b'"dtype":"int64","dtype":"float32"', 1)
    (store / "zarr.json").write_bytes(sign(raw))
    refused(store, r"member 'dtype' appears twice")


def test_duplicate_members_in_an_incomplete_stores_dictionary_are_refused(store):
    meta = dict(root_meta(store), complete=False)
    del meta["tensors"], meta["dictionaries"]
    resign(store, meta)
    doc = next((store / "dictionaries").glob("*/zarr.json"))
    doc.write_bytes(doc.read_bytes().replace(b'"kind":', b'"kind":"x","kind":', 1))
    with pytest.raises(FormatError, match=f"{re.escape(str(doc))}: .*'kind' appears twice"):
        qmoefmt.open(store, allow_incomplete=True)


@pytest.mark.parametrize("change, match", [
    ((b'"complete":true', b'"complete":true,"x":NaN'), "NaN is not JSON"),
    ((b'"complete":true', b'"complete":true,"x":-Infinity'), "-Infinity is not JSON"),
    ((b'"complete":true', b'"complete":true,"x":1e400'), "beyond binary64"),
    ((b'{"attributes"', b'\xef\xbb\xbf{"attributes"'), "BOM"),
    ((b'"name":"qmoefmt"', b'"name":"qmoe\xfffmt"'), "can't decode byte 0xff"),
])
def test_documents_that_are_not_strict_json_are_refused(store, change, match):
    raw = (store / "zarr.json").read_bytes()
    (store / "zarr.json").write_bytes(sign(raw.replace(*change, 1)))
    refused(store, f"zarr.json: not a qmoefmt root group: not valid JSON .*{match}")


def test_duplicated_dictionary_entries_are_refused(store):
    meta = root_meta(store)
    meta["dictionaries"].append(dict(meta["dictionaries"][0]))
    resign(store, meta)
    refused(store, "dictionary 'sha256:[0-9a-f]{64}' listed twice")


# ------------------------------------------------------------------ canonical form

def _rewrite(store: Path, fn) -> None:
    raw = (store / "zarr.json").read_bytes()
    new = sign(fn(raw))
    assert new != raw
    (store / "zarr.json").write_bytes(new)


NON_CANONICAL = {
    "reordered": lambda raw: raw.replace(b'"node_type":"group","zarr_format":3}',
                                         b'"zarr_format":3,"node_type":"group"}'),
    "whitespace": lambda raw: raw.replace(b'"complete":true', b'"complete": true'),
    "u-escape": lambda raw: raw.replace(b'"name":"qmoefmt"', b'"name":"\\u0071moefmt"'),
    "slash-escape": lambda raw: raw.replace(b'"tensors/', b'"tensors\\/', 1),
    "raw-utf8": lambda raw: raw.replace(b'"version":"', '"version":"é'.encode(), 1),
    "number": lambda raw: raw.replace(b'"p_zero":0.885', b'"p_zero":8.85e-1'),
    "no-newline": lambda raw: raw[:-1],
}


@pytest.mark.parametrize("case", sorted(NON_CANONICAL))
def test_verify_reports_a_non_canonical_root(store, case):
    """Readers accept any valid JSON; verify reports what is not canonical (spec §4.1),
    which a byte-level checksum cannot see once re-signed."""
    _rewrite(store, NON_CANONICAL[case])
    st = qmoefmt.open(store)
    st[next(iter(st))].decode()
    lines = reported(store, r"zarr.json: not canonical JSON \(spec §4.1\): from byte \d+")
    assert len(lines.splitlines()) == 1, lines


def test_a_tensor_record_escaped_differently_is_reported(store):
    """Group documents are compared with the bytes the index implies (spec §10)."""
    doc = store / "tensors" / "ids" / "zarr.json"
    doc.write_bytes(doc.read_bytes().replace(b'"ids"', b'"\\u0069ds"'))
    reported(store, "tensors/ids/zarr.json: tensor metadata differs")


# ------------------------------------------------------------------ versions

@pytest.mark.parametrize("version", ["١.٠", "1.٠", "01.0", "1.00", "1.0 ", "+1.0", "1"])
def test_format_version_is_ascii_major_dot_minor(store, version):
    meta = root_meta(store)
    meta["format_version"] = version
    resign(store, meta)
    refused(store, "is not MAJOR.MINOR")


# ------------------------------------------------------------------ wrong types

ROOT_TYPES = {
    "writer": ("writer", ["qmoefmt"], "writer is not an object"),
    "writer-version": (("writer", "version"), 1, "writer.version 1 is not a string"),
    "pack": ("pack", "rtn", "pack is not an object"),
    "pack-experts": (("pack", "experts"), "e.*", "pack.experts 'e.*' is not an array"),
    "pack-preset": (("pack", "preset"), 3, "pack.preset 3 is not a string or null"),
    "plan": ("plan", [], "plan is not an object"),
    "plan-tensors": (("plan", "tensors"), 5.0, "plan.tensors 5.0 is not a non-negative"),
    "plan-sha256": (("plan", "sha256"), "ABC", "plan.sha256 'ABC' is not 64 lowercase"),
    "source": ("source", "m.safetensors", "source is not an object"),
    "source-format": (("source", "format"), "gguf", "source.format 'gguf' is not one of"),
    "source-name": (("source", "name"), None, "source.name None is not a string"),
    "complete": ("complete", 1, "complete 1 is not true or false"),
}


@pytest.mark.parametrize("case", sorted(ROOT_TYPES))
def test_wrongly_typed_root_members_are_refused(store, case):
    key, value, match = ROOT_TYPES[case]
    meta = root_meta(store)
    if isinstance(key, tuple):
        meta[key[0]][key[1]] = value
    else:
        meta[key] = value
    resign(store, meta)
    refused(store, re.escape(match))


@pytest.mark.parametrize("member", ["writer", "pack", "plan", "source"])
def test_missing_root_members_are_refused(store, member):
    meta = root_meta(store)
    del meta[member]
    resign(store, meta)
    refused(store, f"{member} is not an object")


def test_a_record_missing_source_sha256_is_refused(store):
    """Spec §4.5: every record has it; a reader refuses the store without it."""
    meta = root_meta(store)
    del record(meta, "ids")["source_sha256"]
    resign(store, meta)
    refused(store, "tensor 'ids': source_sha256 is not 64 lowercase hex digits")


@pytest.mark.parametrize("store, member", [("ternary", "quantizer"), ("ternary", "dictionary"),
                                           ("packed", "bits"), ("packed", "group_size"),
                                           ("dict16", "symbol_counts")], indirect=["store"])
def test_a_record_missing_a_codec_member_refuses_that_tensor(store, member):
    """The codec's members missing: that tensor is refused, the others read (spec §3)."""
    meta = root_meta(store)
    del record(meta, "e.0.w")[member]
    resign(store, meta)
    st = qmoefmt.open(store)
    with pytest.raises(FormatError, match=f"tensor 'e.0.w': member '{member}' missing"):
        st["e.0.w"]
    assert st["e.1.w"].decode().shape == (3, 21)
    reported(store, f"tensors/e.0.w: tensor 'e.0.w': member '{member}' missing")


@pytest.mark.parametrize("store, member, value, match", [
    ("packed", "bits", 3.0, "bits 3.0 is not one of"),
    ("packed", "bits", True, "bits True is not one of"),
    ("dict16", "bits", 3.0, "bits 3.0 is not one of"),
    ("dict16", "group_size", 8.0, "group_size 8.0 is not an integer"),
    ("ternary", "quantizer", "rtn", "quantizer is not an object"),
], indirect=["store"])
def test_wrongly_typed_record_members_are_refused(store, member, value, match):
    meta = root_meta(store)
    record(meta, "e.0.w")[member] = value
    resign(store, meta)
    refused(store, match)


def test_unknown_members_at_the_stores_own_version_are_reported(store):
    """Readers ignore members they do not know; at a version this reader implements there
    is none to know, so verify reports them (spec §3). At a newer minor, nothing."""
    meta = root_meta(store)
    meta["extra"] = 1
    meta["plan"]["extra"] = 2
    record(meta, "ids")["extra"] = 3
    record(meta, "ids")["arrays"]["data"]["extra"] = 4
    resign(store, meta)
    st = qmoefmt.open(store)
    assert st["ids"].decode().tolist() == DENSE["ids"].tolist()
    lines = reported(store, "member 'extra' is not defined by the store's format_version")
    assert len(lines.splitlines()) == 4, lines
    assert "tensors/ids/data: array descriptor: member 'extra'" in lines
    declare(meta, "1.99")
    resign(store, meta)
    assert verify(store) == []


# ------------------------------------------------------------------ paths and files

@pytest.mark.parametrize("path", ["tensors/a\x00b", "tensors/a b", "tensors/a\\b",
                                  "tensors/a:b", "tensors/...", "tensors/__x", "tensors/ZARR.json",
                                  "tensors/ids.Partial.1",
                                  "tensors/" + "x" * 256, "tensors/é"])
def test_node_names_outside_the_alphabet_are_refused(store, path):
    """Spec §4.3: the reader refuses, naming the root, what a file system could map to
    another file or that Zarr reserves; a NUL no longer reaches the OS (ValueError)."""
    meta = root_meta(store)
    record(meta, "ids")["path"] = path
    resign(store, meta)
    refused(store, "bad path")


def test_two_paths_equal_ignoring_case_are_refused(store):
    meta = root_meta(store)
    record(meta, "ids")["path"] = "tensors/MASK"
    resign(store, meta)
    refused(store, r"path 'tensors/(mask|MASK)' is another tensor's \(ignoring case")


def test_root_nested_100000_deep_is_refused(store):
    raw = (store / "zarr.json").read_bytes()
    deep = b'"deep":' + b"[" * 100_000 + b"]" * 100_000 + b","
    (store / "zarr.json").write_bytes(sign(raw.replace(b'"complete":', deep + b'"complete":', 1)))
    refused(store, "nested too deeply")
    r = CliRunner().invoke(cli, ["inspect", str(store)])
    assert r.exit_code == 1 and "nested too deeply" in r.output and len(r.output.splitlines()) == 1


@pytest.mark.parametrize("filler, match", [(b'{},', r"'\{' and '\[' in \d+ bytes"),
                                           (b'[],', r"'\{' and '\[' in \d+ bytes"),
                                           (b'"abcd",', r"',' and ':' in \d+ bytes")])
def test_a_root_dense_in_values_is_refused_before_it_is_parsed(store, filler, match):
    # 2 MiB of such values would cost a parser ~25x their size (spec §9)
    raw = (store / "zarr.json").read_bytes()
    pad = b'"pad":[' + filler * ((2 << 20) // len(filler)) + b'0],'
    (store / "zarr.json").write_bytes(sign(raw.replace(b'"complete":', pad + b'"complete":', 1)))
    refused(store, match)


def test_a_large_written_root_is_not_dense(tmp_path):
    # the writer's root stays well inside the density limits: 4,000 records, ~2 MiB
    recs = [{"name": f"layers.{i // 64}.experts.{i % 64}.w", "path": f"tensors/layers.{i // 64}."
             f"experts.{i % 64}.w", "shape": [4], "dtype": "float32", "codec": fmt.CODEC_DENSE,
             "source_sha256": "f" * 64,
             "arrays": {"data": {"data_type": "float32", "shape": [4], "crc32c": 1}}}
            for i in range(4000)]
    raw = fmt.root_doc({"format_version": "1.0", "complete": True, "pack": {}, "plan": {},
                        "source": {}, "writer": {"name": "t"}, "dictionaries": [],
                        "tensors": recs})
    assert len(raw) > fmt.ROOT_DENSE_FROM
    assert fmt.root_size_problem(raw) is None
    assert (raw.count(b"{") + raw.count(b"[")) * 2 * fmt.ROOT_BYTES_PER_CONTAINER < len(raw)
    assert (raw.count(b",") + raw.count(b":")) * 1.25 * fmt.ROOT_BYTES_PER_SEPARATOR < len(raw)


@pytest.mark.parametrize("doc", ["tensors/zarr.json", "dictionaries/zarr.json",
                                 "tensors/ids/zarr.json", "tensors/ids/data/zarr.json"])
def test_a_metadata_file_replaced_by_a_directory_is_reported(store, doc):
    (store / doc).unlink()
    (store / doc).mkdir()
    reported(store, f"{re.escape(doc)}: not a regular file")


def test_a_root_that_is_a_directory_is_refused(store):
    (store / "zarr.json").unlink()
    (store / "zarr.json").mkdir()
    refused(store, "zarr.json: not a regular file")


def test_incomplete_store_with_a_dictionary_document_without_attributes(store):
    meta = dict(root_meta(store), complete=False)
    del meta["tensors"], meta["dictionaries"]
    resign(store, meta)
    doc = next((store / "dictionaries").glob("*/zarr.json"))
    doc.write_bytes(fmt.dumps({"zarr_format": 3, "node_type": "group"}))
    with pytest.raises(FormatError, match=f"{re.escape(str(doc))}: not a qmoefmt group"):
        qmoefmt.open(store, allow_incomplete=True)
    r = CliRunner().invoke(cli, ["inspect", str(store)])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "not a qmoefmt group" in r.output and "a bug" not in r.output


def test_an_incomplete_store_skips_a_tensor_document_replaced_by_a_directory(store):
    meta = dict(root_meta(store), complete=False)
    del meta["tensors"], meta["dictionaries"]
    resign(store, meta)
    (store / "tensors/ids/zarr.json").unlink()
    (store / "tensors/ids/zarr.json").mkdir()
    st = qmoefmt.open(store, allow_incomplete=True)
    assert "ids" not in st and "mask" in st


# ------------------------------------------------------------------ data

def _tamper(store: Path, name: str, array: str, fn) -> None:
    """Rewrite one array of a tensor and re-sign everything (its logical dtype kept, spec
    §4.5): only the codec can tell."""
    meta = root_meta(store)
    rec = record(meta, name)
    arr = fn(np.array(qmoefmt.open(store)[name].array(array)))
    shutil.rmtree(store / rec["path"] / array)
    ld = codecs.get(rec["codec"]).logical_dtype(array, rec["dtype"])
    rec["arrays"][array] = write_array(store, f"{rec['path']}/{array}", arr, ld)
    resign(store, meta)


def test_bool_data_other_than_0_and_1_is_refused(store):
    _tamper(store, "mask", "data", lambda a: a.view(np.uint8).__setitem__((0, 1), 0xFF) or a)
    with pytest.raises(FormatError, match=r"tensors/mask/data: tensor 'mask': element 1 is byte "
                                          r"255; bool data is 0 or 1"):
        qmoefmt.open(store)["mask"].decode()
    reported(store, "element 1 is byte 255")


def _set(index, value):
    def fn(a):
        a[index] = value
        return a
    return fn


@pytest.mark.parametrize("store, array, fn, match", [
    ("packed", "scales", _set((0, 0), 0x7F80), "scales must be finite"),
    ("packed", "zeros", _set((1, 0), 8), r"zero point >= 2\*\*3"),
    ("packed", "q", _set((2, -1), 0xFF), "row 2: nonzero padding bits in q"),
    ("dict16", "scales", _set((0, 1), 0xFFC0), "scales must be finite"),
    ("dict16", "zeros", _set((0, 0), 4), r"zero point >= 2\*\*2"),
    ("dict16", "escape_levels", lambda a: np.full_like(a, 9), r"escape level 9 >= 2\*\*2"),
    ("dict16", "escape_cols", lambda a: np.full_like(a, 40), "escape column 40 >= 21"),
], indirect=["store"])
def test_shallow_verify_checks_the_kbit_grid(store, array, fn, match):
    """Spec §10: scales (and zero points, padding, escapes) are shallow checks."""
    if array.startswith("escape"):
        assert len(qmoefmt.open(store)["e.0.w"].array("escape_cols")) > 0
    _tamper(store, "e.0.w", array, fn)
    refused(store, match)


def test_an_escape_one_step_from_its_zero_point_is_refused_without_the_stream():
    from qmoefmt.codecs.uint_dict16 import check_escapes
    zeros = np.array([[1]], np.uint8)
    with pytest.raises(FormatError, match="must be >= 2 steps away"):
        check_escapes(zeros, 4, 2, 4, np.array([1], np.uint16), np.array([2], np.uint16),
                      np.array([2], np.uint8), "t")
    check_escapes(zeros, 4, 2, 4, np.array([1], np.uint16), np.array([2], np.uint16),
                  np.array([3], np.uint8), "t")


# ------------------------------------------------------------------ decode dtypes

def test_decode_gives_integers_and_bools_their_own_dtype(store):
    """Spec §7: float32 would round an int64 above 2^24 (here 2^53 + 1)."""
    st = qmoefmt.open(store)
    ids, mask, norm = st["ids"].decode(), st["mask"].decode(), st["norm"].decode()
    assert ids.dtype == np.int64 and ids.tolist() == [2**53 + 1, -7, 3]
    assert mask.dtype == np.bool_ and mask.tolist() == [[True, False, True]]
    assert norm.dtype == np.float32 and norm.tolist() == [0.5, -1.25]
    assert st["e.0.w"].decode().dtype == np.float32
    assert st["mask"].decode(rows=slice(0, 1)).dtype == np.bool_

