"""Codec qmoe.uint-dict16 (spec §13): signs dictionary-coded plus escapes."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import qmoefmt
from qmoefmt import codecs
from qmoefmt import format as fmt
from qmoefmt.codecs import uint_dict16 as uintdict
from qmoefmt.dictionaries.stream import decode_symbols, encode
from qmoefmt.dictionaries.golomb import build_golomb
from qmoefmt.errors import FormatError
from qmoefmt.pack import PackError, PackOptions, pack
from qmoefmt.store.verify import verify


def reference_merge(t, zeros, group_size, escapes):
    """Spec §13 read literally: one level at a time."""
    rows, cols = t.shape
    out = np.zeros((rows, cols), np.int64)
    for r in range(rows):
        for c in range(cols):
            z = int(zeros[r, c // group_size])
            out[r, c] = escapes.get((r, c), z + {0: 0, 1: -1, 2: 1}[int(t[r, c])])
    return out


def levels_like_experts(rng, bits, rows, cols, group_size, spread):
    """Levels concentrated on per-group zero points, with a tail of far levels."""
    maxq = (1 << bits) - 1
    groups = -(-cols // group_size) if cols else 0
    zeros = rng.integers(0, maxq + 1, (rows, groups)).astype(np.uint8)
    z = zeros[:, np.arange(cols) // group_size].astype(np.int64)
    q = np.clip(z + np.round(rng.standard_normal((rows, cols)) * spread), 0, maxq)
    return q.astype(np.uint8), zeros


@settings(max_examples=80, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), rows=st.integers(0, 5), cols=st.integers(0, 90),
       group=st.integers(1, 40), spread=st.sampled_from([0.0, 0.3, 0.7, 2.0]),
       seed=st.integers(0, 2**31 - 1))
def test_split_merge_round_trip_matches_spec(bits, rows, cols, group, spread, seed):
    q, zeros = levels_like_experts(np.random.default_rng(seed), bits, rows, cols, group, spread)
    t, re, ec, el = uintdict.split(q, zeros, group)
    assert re.dtype == ec.dtype == np.uint16 and el.dtype == np.uint8
    assert int(re.sum()) == len(ec) == len(el)
    rows_of = np.repeat(np.arange(rows), re.astype(np.int64))
    escapes = {(int(r), int(c)): int(v) for r, c, v in zip(rows_of, ec, el)}
    assert np.array_equal(reference_merge(t, zeros, group, escapes), q)
    assert np.array_equal(uintdict.merge(t, zeros, group, bits, re, ec, el), q)
    # through the dictionary coder as the store holds it
    codes, row_codes = encode(t, build_golomb(0.7))
    assert np.array_equal(decode_symbols(codes, row_codes, cols, build_golomb(0.7)), t)


def test_wide_rows_use_uint32_indexes():
    q = np.zeros((1, 70_000), np.uint8)
    q[0, [5, 69_999]] = 3
    t, re, ec, el = uintdict.split(q, np.zeros((1, 1), np.uint8), 70_000)
    assert re.dtype == ec.dtype == np.uint32 and list(ec) == [5, 69_999]


def _merge(t, zeros, re, ec, el, bits=2, group=4):
    return uintdict.merge(np.asarray(t, np.int8), np.asarray(zeros, np.uint8), group, bits,
                          np.asarray(re), np.asarray(ec), np.asarray(el))


@pytest.mark.parametrize("case,args,match", [
    ("count sum", ([[2, 0, 0, 0]], [[1]], [1], [], []), "sum to 1"),
    ("count > cols", ([[2, 0, 0, 0]], [[1]], [5], [0] * 5, [3] * 5), "5 escapes in a row of 4"),
    ("column out of range", ([[2, 0, 0, 0]], [[1]], [1], [4], [3]), "escape column 4 >= 4"),
    ("columns not increasing", ([[2, 2, 0, 0]], [[1]], [2], [1, 0], [3, 3]), "not strictly increasing"),
    ("repeated column", ([[2, 2, 0, 0]], [[1]], [2], [0, 0], [3, 3]), "not strictly increasing"),
    ("level too large", ([[2, 0, 0, 0]], [[1]], [1], [0], [4]), "escape level 4 >= 2\\*\\*2"),
    ("one step is no escape", ([[2, 0, 0, 0]], [[1]], [1], [0], [2]), "2 steps away"),
    ("escape on a zero symbol", ([[0, 0, 0, 0]], [[0]], [1], [0], [2]), "2 steps away"),
    ("escape on the wrong side", ([[1, 0, 0, 0]], [[1]], [1], [0], [3]), "2 steps away"),
    ("level below 0", ([[1, 0, 0, 0]], [[0]], [0], [], []), "outside 0..3"),
    ("level above max", ([[0, 2, 0, 0]], [[3]], [0], [], []), "outside 0..3"),
    ("bad escape array shape", ([[0, 0, 0, 0]], [[0]], [0, 0], [], []), "do not fit 1 rows"),
])
def test_merge_refuses_inconsistent_escapes(case, args, match):
    with pytest.raises(FormatError, match=match):
        _merge(*args)


# ------------------------------------------------------------------------- stores

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ud")
    rng = np.random.default_rng(1)
    w = {f"m.experts.expert_{j}.wi.weight": (rng.standard_normal((48, 200)) * 0.02).astype(np.float32)
         for j in range(3)}
    w["m.experts.expert_0.wi.weight"][5] = 0.0                # an all-zero row
    w["m.experts.odd.weight"] = (rng.standard_normal((7, 1)) * 0.02).astype(np.float32)  # one column
    w["m.experts.empty.weight"] = np.zeros((0, 16), np.float32)
    w["m.norm.weight"] = np.ones(200, np.float32)
    save_file(w, str(d / "m.safetensors"))
    return d


@pytest.mark.parametrize("bits,group", [(2, None), (3, 64), (4, 7)])
def test_dict16_store_decodes_like_packed(ckpt, tmp_path, bits, group):
    base = dict(experts=("*experts*",), bits=str(bits), group_size=group)
    pack(ckpt / "m.safetensors", tmp_path / "p", PackOptions(**base, kbit_codec="packed"))
    pack(ckpt / "m.safetensors", tmp_path / "d", PackOptions(**base, kbit_codec="dict16"))
    a, b = qmoefmt.open(tmp_path / "p"), qmoefmt.open(tmp_path / "d")
    # 1.5 both: their scales' logical dtypes in the index (spec §4.5; dict16's compact
    # dictionary alone would make it 1.4, uint-packed alone 1.1)
    assert (a.format_version, b.format_version) == ("1.5", "1.5")
    for name in a:
        want = fmt.CODEC_DENSE if "norm" in name else fmt.CODEC_UINT_DICT
        assert b[name].codec == want
        assert np.array_equal(a[name].decode(), b[name].decode())
        if want != fmt.CODEC_DENSE:
            assert np.array_equal(a[name].symbols(), b[name].symbols())
    assert verify(tmp_path / "d", deep=True) == []


def test_auto_keeps_small_models_packed_and_codes_large_ones(ckpt, tmp_path):
    small = tmp_path / "small"
    pack(ckpt / "m.safetensors", small, PackOptions(experts=("*experts*",), bits="2"))
    st = qmoefmt.open(small)
    assert st.format_version == "1.5" and st.meta["dictionaries"] == []
    assert {st[n].codec for n in st} == {fmt.CODEC_UINT, fmt.CODEC_DENSE}
    # 40 M weights: a dictionary pays for itself many times over
    rng = np.random.default_rng(0)
    w = {f"e.{j}": (rng.standard_normal((768, 3072)) * 0.02).astype(np.float32) for j in range(17)}
    save_file(w, str(tmp_path / "big.safetensors"))
    pack(tmp_path / "big.safetensors", tmp_path / "big", PackOptions(experts=("e.*",), bits="2"))
    st = qmoefmt.open(tmp_path / "big")
    assert st.format_version == "1.5"
    assert {st[n].codec for n in st} == {fmt.CODEC_UINT_DICT}
    # the sign stream of a Gaussian 2-bit expert: ~1.03 bits a weight against 2 packed
    t = st["e.0"]
    assert 8 * t.array("codes").nbytes / (768 * 3072) < 1.1


def test_kbit_codec_needs_kbits():
    with pytest.raises(PackError, match="kbit-codec"):
        PackOptions(experts=("*",), kbit_codec="dict16").validate()
    with pytest.raises(PackError, match="kbit-codec"):
        PackOptions(experts=("*",), bits="2", kbit_codec="huffman").validate()


def test_resume_reproduces_dict16_store(ckpt, tmp_path):
    opts = PackOptions(experts=("*experts*",), bits="2", kbit_codec="dict16")
    pack(ckpt / "m.safetensors", tmp_path / "full", opts)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    root = json.loads((part / "zarr.json").read_bytes())["attributes"]["qmoefmt"]
    # as if interrupted after the first tensor: incomplete root, later tensor groups gone
    for r in root["tensors"][1:]:
        (part / r["path"] / "zarr.json").unlink()
    meta = {k: v for k, v in root.items() if k not in ("tensors", "dictionaries", "checksum")}
    meta.update(complete=False, format_version="1.2")
    (part / "zarr.json").write_bytes(fmt.root_doc(meta))
    pack(ckpt / "m.safetensors", part, opts, resume=True)
    for p in sorted((tmp_path / "full").rglob("*")):
        if p.is_file():
            assert (part / p.relative_to(tmp_path / "full")).read_bytes() == p.read_bytes(), p


def _tamper(store, name, array, fn):
    """Rewrite one array of one tensor and re-sign everything, so that only the codec's
    own checks can catch the change."""
    from qmoefmt.store.writer import write_array
    root = json.loads((store / "zarr.json").read_bytes())["attributes"]["qmoefmt"]
    rec = next(r for r in root["tensors"] if r["name"] == name)
    t = qmoefmt.open(store)[name]
    arr = fn(np.array(t.array(array)))
    shutil.rmtree(store / rec["path"] / array)
    ld = codecs.get(rec["codec"]).logical_dtype(array, rec["dtype"])    # kept (spec §4.5)
    rec["arrays"][array] = write_array(store, f"{rec['path']}/{array}", arr, ld)
    (store / rec["path"] / "zarr.json").write_bytes(fmt.node_doc(rec))
    (store / "zarr.json").write_bytes(fmt.root_doc({k: v for k, v in root.items() if k != "checksum"}))


@pytest.mark.parametrize("array,fn,match", [
    ("escape_levels", lambda a: a ^ 1, "escape level|2 steps away"),
    ("escape_cols", lambda a: a[::-1].copy(), "not strictly increasing"),
    ("row_escapes", lambda a: np.roll(a, 1), "escape|increasing"),
    ("zeros", lambda a: np.full_like(a, 3), "outside 0..3|2 steps away"),
])
def test_tampered_escapes_are_refused_by_open_and_verify(ckpt, tmp_path, array, fn, match):
    store = tmp_path / "s"
    pack(ckpt / "m.safetensors", store, PackOptions(experts=("*experts*",), bits="2", kbit_codec="dict16"))
    name = "m.experts.expert_1.wi.weight"
    assert len(qmoefmt.open(store)[name].array("escape_cols")) > 1
    _tamper(store, name, array, fn)
    with pytest.raises(FormatError, match=match):
        qmoefmt.open(store)[name].decode()
    problems = verify(store, deep=True)
    assert problems and all("expert_1" in p.where for p in problems)


def test_version_must_match_codecs(ckpt, tmp_path):
    store = tmp_path / "s"
    pack(ckpt / "m.safetensors", store, PackOptions(experts=("*experts*",), bits="2", kbit_codec="dict16"))
    root = json.loads((store / "zarr.json").read_bytes())["attributes"]["qmoefmt"]
    root["format_version"] = "1.1"
    (store / "zarr.json").write_bytes(fmt.root_doc({k: v for k, v in root.items() if k != "checksum"}))
    assert any("is not 1.5" in p.what for p in verify(store))


def test_auto_skips_coding_when_escapes_alone_outweigh_packing(ckpt, tmp_path, monkeypatch):
    import qmoefmt.codecs.uint_dict16 as dict16
    calls = []
    real = dict16.encode
    monkeypatch.setattr(dict16, "encode", lambda *a: calls.append(1) or real(*a))
    pack(ckpt / "m.safetensors", tmp_path / "s4", PackOptions(experts=("*experts*",), bits="4"))
    assert calls == [] and {qmoefmt.open(tmp_path / "s4")[n].codec for n in
                            qmoefmt.open(tmp_path / "s4")} == {fmt.CODEC_UINT, fmt.CODEC_DENSE}
    pack(ckpt / "m.safetensors", tmp_path / "s2", PackOptions(experts=("*experts*",), bits="2"))
    assert calls    # 2-bit signs are worth coding: auto weighs them
