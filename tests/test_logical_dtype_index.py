"""Format 1.5 (spec §4.5): array descriptors in the index carry `logical_dtype`, so every
array document follows from the index whatever the codec (§10). The stores here are the
committed switch-tiny.qmoe (packed by a 1.5 writer, the member in place; `declare` adds
nothing it lacks) re-signed, then edited. The writer's side: test_logical_dtype_pack.py."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import qmoefmt
from qmoefmt.errors import FormatError
from qmoefmt.store.verify import verify
from qmoefmt.testing import paths
from qmoefmt.testing.fuzz import resign
from qmoefmt.testing.versions import declare

STORE = "switch-tiny.qmoe"


def _edit_root(store, change) -> None:
    doc = json.loads((store / "zarr.json").read_bytes())
    change(doc["attributes"]["qmoefmt"])
    (store / "zarr.json").write_text(json.dumps(doc))
    resign(store)                       # also writes the canonical form back


def _with_logical_dtypes(meta: dict, version: str = "1.5") -> None:
    declare(meta, "1.5")
    meta["format_version"] = version


@pytest.fixture
def store15(tmp_path):
    dst = tmp_path / "s15.qmoe"
    shutil.copytree(paths.store(STORE), dst)
    _edit_root(dst, _with_logical_dtypes)
    return dst


def _a_scaled_tensor(meta: dict) -> dict:
    return next(r for r in meta["tensors"] if "scales" in r["arrays"])


def test_a_15_store_opens_decodes_and_verifies(store15):
    old, new = qmoefmt.open(paths.store(STORE)), qmoefmt.open(store15)
    assert new.format_version == "1.5"
    assert sum("logical_dtype" in d for r in new.meta["tensors"] for d in r["arrays"].values()) > 0
    for name in old:
        assert new[name].decode().tobytes() == old[name].decode().tobytes(), name
    assert [str(p) for p in verify(store15, deep=True)] == []


def test_declared_14_with_the_member_is_reported(tmp_path):
    dst = tmp_path / "s14.qmoe"
    shutil.copytree(paths.store(STORE), dst)
    _edit_root(dst, lambda m: _with_logical_dtypes(m, "1.4"))
    problems = [p.what for p in verify(dst)]
    assert any("is not 1.5" in p for p in problems), problems
    st = qmoefmt.open(dst)                       # readers read what they know all the same
    assert all(st[n].decode().size == np.prod(st[n].shape) for n in st)


def test_an_unknown_codec_s_array_documents_are_checked_from_the_index(store15):
    def rename(meta):
        _a_scaled_tensor(meta)["codec"] = "acme.future-codec"
    _edit_root(store15, rename)
    meta = qmoefmt.open(store15).meta
    r = _a_scaled_tensor(meta)
    problems = [str(p) for p in verify(store15)]
    assert not any("array metadata" in p for p in problems), problems
    doc = store15 / r["path"] / "scales" / "zarr.json"
    doc.write_bytes(doc.read_bytes().replace(b'"attributes":{"qmoefmt":{"logical_dtype":"bfloat16"}}',
                                             b'"attributes":{}'))
    problems = [str(p) for p in verify(store15)]
    assert any(str(doc) in p and "array metadata differs" in p for p in problems), problems


def test_a_logical_dtype_the_codec_does_not_give_refuses_that_tensor(store15):
    def drop(meta):
        del _a_scaled_tensor(meta)["arrays"]["scales"]["logical_dtype"]
    _edit_root(store15, drop)
    st = qmoefmt.open(store15)
    bad = _a_scaled_tensor(st.meta)["name"]
    with pytest.raises(FormatError, match=r"array 'scales' has logical_dtype None in the index; "
                                          r"codec qmoe\.\S+ makes it 'bfloat16'"):
        st[bad]
    assert all(st[n].decode() is not None for n in st if n != bad)
    assert any(bad in str(p) and "logical_dtype" in str(p) for p in verify(store15))


@pytest.mark.parametrize("value", ["float8", 16, None])
def test_a_logical_dtype_that_is_not_one_refuses_the_store(store15, value):
    def bad(meta):
        _a_scaled_tensor(meta)["arrays"]["scales"]["logical_dtype"] = value
    _edit_root(store15, bad)
    with pytest.raises(FormatError, match=r"array 'scales': logical_dtype .* is not one of \['bfloat16'\]"):
        qmoefmt.open(store15)


def test_a_dictionary_array_with_one_refuses_the_store(store15):
    def bad(meta):
        next(iter(meta["dictionaries"][0]["arrays"].values()))["logical_dtype"] = "bfloat16"
    _edit_root(store15, bad)
    with pytest.raises(FormatError, match="dictionary tables have none"):
        qmoefmt.open(store15)
