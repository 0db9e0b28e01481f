"""The committed conformance vectors (fixtures/conformance): every fixture store verifies,
holds exactly the expected codeword streams, and decodes to the expected symbols and
values bit for bit. Never regenerate the vectors to make this pass: a mismatch is a bug
or a format change."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import qmoefmt
from qmoefmt import format as fmt
from qmoefmt.store.verify import verify

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "fixtures"
MANIFEST = json.loads((FIX / "conformance" / "manifest.json").read_text())
STORES = sorted(MANIFEST["stores"])


def sha256(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_manifest_covers_the_fixture_stores():
    assert set(STORES) == {"switch-tiny.qmoe", "switch-tiny-qmoe2023.qmoe", "edge.qmoe",
                           "edge-auto.qmoe"}
    for store in STORES:
        st = qmoefmt.open(FIX / store)
        coded = {n for n in st if st[n].codec == fmt.CODEC_TERNARY}
        assert coded == set(MANIFEST["stores"][store]["tensors"]), store
    # the streams of qmoe-2023 stores come from the independent reference encoder
    for store in ("switch-tiny-qmoe2023.qmoe", "edge.qmoe"):
        for t in MANIFEST["stores"][store]["tensors"].values():
            assert t["stream_source"] == "reference-encoder" and t["dictionary_kind"] == "qmoe-2023"


@pytest.mark.parametrize("store", STORES)
def test_store_verifies(store):
    assert verify(FIX / store) == []


@pytest.mark.parametrize("store", STORES)
def test_streams_match_manifest(store):
    st = qmoefmt.open(FIX / store)
    for name, want in MANIFEST["stores"][store]["tensors"].items():
        t = st[name]
        assert list(t.shape) == want["shape"]
        assert t.dictionary == want["dictionary"], name
        codes, row_codes, scales = t.array("codes"), t.array("row_codes"), t.array("scales")
        assert codes.size == want["n_codes"], name
        assert sha256(codes) == want["codes_sha256"], name
        assert str(row_codes.dtype) == want["row_codes_dtype"], name
        assert sha256(row_codes) == want["row_codes_sha256"], name
        assert sha256(scales) == want["scales_sha256"], name
        assert t.record["symbol_counts"] == want["symbol_counts"], name
    # the dictionary a qmoe-2023 tensor names is the reference's, and the store's tables
    # hash to it
    for entry in st.meta["dictionaries"]:
        assert st.dictionary(entry["id"]).content_id == entry["id"]


@pytest.mark.parametrize("store", STORES)
def test_decode_matches_vectors(store):
    info = MANIFEST["stores"][store]
    vectors = load_file(str(FIX / "conformance" / info["vectors"]))
    st = qmoefmt.open(FIX / store)
    assert set(vectors) == {f"{n}/{k}" for n in info["tensors"] for k in ("symbols", "values")}
    for name in info["tensors"]:
        t = st[name]
        sym, val = vectors[f"{name}/symbols"], vectors[f"{name}/values"]
        assert sym.dtype == np.int8 and val.dtype == np.float32
        got_sym = t.symbols()
        assert got_sym.shape == sym.shape and got_sym.dtype == np.int8, name
        assert np.array_equal(got_sym, sym), name
        got = t.decode()
        assert got.shape == val.shape and got.dtype == np.float32, name
        assert got.tobytes() == val.tobytes(), name          # bit for bit, -0.0 included
        assert [int((sym == s).sum()) for s in range(3)] == info["tensors"][name]["symbol_counts"]


# ---------------------------------------------------------------- format 1.1: uint-packed
MANIFEST_UINT = json.loads((FIX / "conformance-uint" / "manifest.json").read_text())
UINT_STORES = sorted(MANIFEST_UINT["stores"])


def test_uint_manifest_covers_the_stores():
    assert set(UINT_STORES) == {"switch-tiny-2bit.qmoe", "edge-3bit-g16.qmoe"}
    for store in UINT_STORES:
        st = qmoefmt.open(FIX / store)
        assert st.format_version == "1.1"
        coded = {n for n in st if st[n].codec == fmt.CODEC_UINT}
        assert coded == set(MANIFEST_UINT["stores"][store]["tensors"]), store


@pytest.mark.parametrize("store", UINT_STORES)
def test_uint_store_matches_vectors(store):
    assert verify(FIX / store, deep=True) == []
    st = qmoefmt.open(FIX / store)
    entry = MANIFEST_UINT["stores"][store]
    vectors = load_file(str(FIX / "conformance-uint" / entry["vectors"]))
    for name, exp in entry["tensors"].items():
        t = st[name]
        assert (t.record["bits"], t.record["group_size"]) == (exp["bits"], exp["group_size"])
        assert sha256(t.array("q")) == exp["q_sha256"], name
        assert sha256(t.array("zeros")) == exp["zeros_sha256"], name
        assert sha256(t.array("scales")) == exp["scales_sha256"], name
        assert np.array_equal(t.symbols(), vectors[f"{name}/levels"]), name
        got = t.decode()
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), vectors[f"{name}/values"].view(np.uint32)), name


# ---------------------------------------------------------------- format 1.2: uint-dict16
MANIFEST_UDICT = json.loads((FIX / "conformance-uint-dict" / "manifest.json").read_text())
UDICT_STORES = sorted(MANIFEST_UDICT["stores"])


def test_uint_dict_manifest_covers_the_stores():
    assert set(UDICT_STORES) == {"switch-tiny-2bit-dict16.qmoe", "edge-2bit-g16-dict16.qmoe"}
    kinds = set()
    for store in UDICT_STORES:
        st = qmoefmt.open(FIX / store)
        assert st.format_version == "1.2"
        coded = {n for n in st if st[n].codec == fmt.CODEC_UINT_DICT}
        assert coded == set(MANIFEST_UDICT["stores"][store]["tensors"]), store
        kinds |= {e["stream_source"] for e in MANIFEST_UDICT["stores"][store]["tensors"].values()}
    # one store's streams come from the independent QMoE encoder, not from our own
    assert kinds == {"reference-encoder", "store"}
    edge = MANIFEST_UDICT["stores"]["edge-2bit-g16-dict16.qmoe"]["tensors"]
    assert edge["edge.wide"]["n_escapes"] > 0                 # uint32 escape indexes


@pytest.mark.parametrize("store", UDICT_STORES)
def test_uint_dict_store_matches_vectors(store):
    assert verify(FIX / store, deep=True) == []
    st = qmoefmt.open(FIX / store)
    entry = MANIFEST_UDICT["stores"][store]
    vectors = load_file(str(FIX / "conformance-uint-dict" / entry["vectors"]))
    for name, exp in entry["tensors"].items():
        t = st[name]
        assert (t.record["bits"], t.record["group_size"]) == (exp["bits"], exp["group_size"])
        assert t.record["symbol_counts"] == exp["symbol_counts"], name
        for a in ("codes", "row_codes", "row_escapes", "escape_cols", "escape_levels", "zeros", "scales"):
            assert sha256(t.array(a)) == exp[f"{a}_sha256"], (name, a)
        assert np.array_equal(t.symbols(), vectors[f"{name}/levels"]), name
        got = t.decode()
        assert got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), vectors[f"{name}/values"].view(np.uint32)), name
