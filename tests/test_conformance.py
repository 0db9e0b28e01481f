"""The committed conformance vectors (fixtures/conformance): every fixture store verifies,
holds exactly the expected codeword streams, and decodes to the expected symbols and
values bit for bit. Never regenerate the vectors to make this pass: a mismatch is a bug
or a format change."""
from __future__ import annotations

import numpy as np
import pytest

import qmoefmt
from qmoefmt import format as fmt
from qmoefmt.store.verify import verify
from qmoefmt.testing import conformance, paths
from qmoefmt.testing.conformance import sha256

MANIFEST = conformance.manifest("conformance")
STORES = conformance.stores("conformance")


def test_manifest_covers_the_fixture_stores(fixture_store):
    assert set(STORES) == set(paths.TERNARY_STORES)
    for store in STORES:
        st = qmoefmt.open(fixture_store(store))
        # 1.0 stores hold their dictionaries as tables, 1.4 and 1.5 ones compact (spec §5.7)
        legacy = store in paths.LEGACY_STORES
        assert st.format_version == paths.FORMAT_VERSIONS[store], store
        assert (st.format_version == "1.0") == legacy, store
        assert {e.get("form", "tables") == "tables" for e in st.meta["dictionaries"]} == {legacy}
        coded = {n for n in st if st[n].codec == fmt.CODEC_TERNARY}
        assert coded == set(MANIFEST["stores"][store]["tensors"]), store
    # the streams of qmoe-2023 stores come from the independent reference encoder
    for store in ("switch-tiny-qmoe2023.qmoe", "edge.qmoe", "edge-trie.qmoe"):
        for t in MANIFEST["stores"][store]["tensors"].values():
            assert t["stream_source"] == "reference-encoder" and t["dictionary_kind"] == "qmoe-2023"


@pytest.mark.parametrize("store", STORES)
def test_store_verifies(store, fixture_store):
    assert verify(fixture_store(store)) == []


@pytest.mark.parametrize("store", STORES)
def test_streams_match_manifest(store, fixture_store):
    st = qmoefmt.open(fixture_store(store))
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
    assert conformance.check_decodes("conformance", store) == len(MANIFEST["stores"][store]["tensors"])
    vectors = conformance.vectors("conformance", store)
    for name, want in MANIFEST["stores"][store]["tensors"].items():
        sym = vectors[f"{name}/symbols"]
        assert sym.dtype == np.int8, name
        assert [int((sym == s).sum()) for s in range(3)] == want["symbol_counts"], name


# ---------------------------------------------------------------- format 1.1: uint-packed
MANIFEST_UINT = conformance.manifest("conformance-uint")
UINT_STORES = conformance.stores("conformance-uint")


def test_uint_manifest_covers_the_stores(fixture_store):
    assert set(UINT_STORES) == set(paths.UINT_STORES)
    for store in UINT_STORES:
        st = qmoefmt.open(fixture_store(store))
        # the rank store was packed by a 1.5 writer (logical dtypes in the index, §4.5)
        assert st.format_version == ("1.5" if store in paths.RANK_STORES else "1.1"), store
        assert st.format_version == paths.FORMAT_VERSIONS[store], store
        coded = {n for n in st if st[n].codec == fmt.CODEC_UINT}
        assert coded == set(MANIFEST_UINT["stores"][store]["tensors"]), store


@pytest.mark.parametrize("store", UINT_STORES)
def test_uint_store_matches_vectors(store, fixture_store):
    assert verify(fixture_store(store), deep=True) == []
    st = qmoefmt.open(fixture_store(store))
    entry = MANIFEST_UINT["stores"][store]
    for name, exp in entry["tensors"].items():
        t = st[name]
        assert (t.record["bits"], t.record["group_size"]) == (exp["bits"], exp["group_size"])
        assert sha256(t.array("q")) == exp["q_sha256"], name
        assert sha256(t.array("zeros")) == exp["zeros_sha256"], name
        assert sha256(t.array("scales")) == exp["scales_sha256"], name
    assert conformance.check_decodes("conformance-uint", store) == len(entry["tensors"])


# ---------------------------------------------------------------- format 1.2: uint-dict16
MANIFEST_UDICT = conformance.manifest("conformance-uint-dict")
UDICT_STORES = conformance.stores("conformance-uint-dict")


def test_uint_dict_manifest_covers_the_stores(fixture_store):
    assert set(UDICT_STORES) == set(paths.UINT_DICT_STORES)
    kinds = set()
    for store in UDICT_STORES:
        st = qmoefmt.open(fixture_store(store))
        assert st.format_version == ("1.2" if store in paths.LEGACY_STORES else "1.5")
        assert st.format_version == paths.FORMAT_VERSIONS[store], store
        coded = {n for n in st if st[n].codec == fmt.CODEC_UINT_DICT}
        assert coded == set(MANIFEST_UDICT["stores"][store]["tensors"]), store
        kinds |= {e["stream_source"] for e in MANIFEST_UDICT["stores"][store]["tensors"].values()}
    # one store's streams come from the independent QMoE encoder, not from our own
    assert kinds == {"reference-encoder", "store"}
    edge = MANIFEST_UDICT["stores"]["edge-2bit-g16-dict16.qmoe"]["tensors"]
    assert edge["edge.wide"]["n_escapes"] > 0                 # uint32 escape indexes


@pytest.mark.parametrize("store", UDICT_STORES)
def test_uint_dict_store_matches_vectors(store, fixture_store):
    assert verify(fixture_store(store), deep=True) == []
    st = qmoefmt.open(fixture_store(store))
    entry = MANIFEST_UDICT["stores"][store]
    for name, exp in entry["tensors"].items():
        t = st[name]
        assert (t.record["bits"], t.record["group_size"]) == (exp["bits"], exp["group_size"])
        assert t.record["symbol_counts"] == exp["symbol_counts"], name
        for a in ("codes", "row_codes", "row_escapes", "escape_cols", "escape_levels", "zeros", "scales"):
            assert sha256(t.array(a)) == exp[f"{a}_sha256"], (name, a)
    assert conformance.check_decodes("conformance-uint-dict", store) == len(entry["tensors"])
