"""Packing each committed fixture store's checkpoint with the arguments it was made with
reproduces the store: every file but the root byte for byte, the root's index but for its
checksum and the pack options it records (those gained fields after the 1.0 and 1.1
fixtures were made), and the root's bytes as the packer writes them today. The legacy
stores (earlier format versions, their dictionaries as tables) are not repacked: today's
packer writes compact dictionaries (1.4). The stores committed before 1.5 (edge-trie.qmoe,
kept as the broken stores' base, and the 1.1 ones) come out as 1.5, whose index records
logical dtypes (spec §4.5): their tensor groups and root are compared without them, after
checking that they are exactly the ones each codec gives.

The arguments come from scripts/make_fixtures.py's tables, not a copy of them, so a store
added there is repacked here too."""
from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest

from qmoefmt import codecs
from qmoefmt import format as fmt
from qmoefmt.testing import paths
from qmoefmt_cli.main import main as cli
from qmoefmt.testing.trees import files_of


def _make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", paths.MAKE_FIXTURES)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_SCRIPT = _make_fixtures()
# store -> (checkpoint under fixtures/, pack arguments)
PACKS = {**_SCRIPT.STORES, **_SCRIPT.UINT_STORES, **_SCRIPT.UINT_DICT_STORES}

# sha256 of each repacked root zarr.json, taken when the packer came to write 1.5 (the 1.5
# stores: when they were regenerated, their committed roots; edge-trie.qmoe and the 1.1
# ones: their repacks, which record logical dtypes their committed roots do not): what the
# packer records must not drift unnoticed.
ROOT_SHA256 = {
    "edge-3bit-g16.qmoe": "87ba60932d271f0418055ba57a2effe1eea0de2b797762f96575439d7851d796",
    "edge-auto.qmoe": "0c7f4a75adef1eadc6807f8766e9fa4c400613b2069d7d30f3d4c83b04df3db2",
    "edge-trie.qmoe": "c65e883d9ed7c3146b7219ffb97ac144a6b3c658362588c1e546a8ef9ba9b507",
    "switch-tiny-2bit-dict16.qmoe": "53e463a663bb3f307d4af86071f86d2e8b4f125027618e303e9ee35787a5c2f1",
    "switch-tiny-2bit.qmoe": "3af44ec424588f771498997f6b204f1e3b619f075b2aceca3aa0ba2fac84b311",
    "switch-tiny.qmoe": "c9b7041d1f3964cfce570543e7b4e5f1401fff0d345500df4456b7120f4380b8",
}


def without_logical_dtypes(record: dict, check: bool = True) -> dict:
    """A tensor record as a writer before 1.5 wrote it (no `logical_dtype` in its
    descriptors, spec §4.5); `check`: those it has are exactly its codec's."""
    unit = codecs.get(record["codec"])
    arrays = {}
    for name, desc in record["arrays"].items():
        if check:
            assert desc.get("logical_dtype") == unit.logical_dtype(name, record["dtype"]), \
                (record["name"], name)
        arrays[name] = {k: v for k, v in desc.items() if k != "logical_dtype"}
    return dict(record, arrays=arrays)


def without_checksum_and_pack(root_doc: bytes, since_14: bool = True,
                              since_15: bool = True, repacked: bool = False) -> dict:
    """The root but for its checksum and pack options; a store packed before 1.4's
    `source.metadata` (§4.4) is compared without that member and the version it raises, one
    packed before 1.5 without the descriptors' logical dtypes (§4.5) and the version (a
    `repacked` root's logical dtypes checked to be its codecs')."""
    doc = json.loads(root_doc)
    meta = doc["attributes"]["qmoefmt"]
    for key in ("checksum", "pack"):
        del meta[key]
    if not since_14:
        meta["source"].pop("metadata", None)
    if not (since_14 and since_15):
        del meta["format_version"]
    if not since_15:
        meta["tensors"] = [without_logical_dtypes(r, check=repacked) for r in meta["tensors"]]
    return doc


def test_the_tables_cover_every_committed_store():
    committed = {p.name for p in paths.FIXTURES.glob("*.qmoe")}
    # the rank stores are packed as matrices and re-shaped (make_fixtures.pack_rank), so a
    # plain pack does not reproduce them; the conformance vectors cover them instead
    assert set(_SCRIPT.RANK_STORES) == set(paths.RANK_STORES)
    assert (set(PACKS) | set(_SCRIPT.LEGACY_STORES) | set(_SCRIPT.RANK_STORES) == committed
            == set(paths.STORES))
    assert set(PACKS) == set(ROOT_SHA256) and not set(PACKS) & set(_SCRIPT.LEGACY_STORES)
    assert set(_SCRIPT.LEGACY_STORES) == set(paths.LEGACY_STORES)


@pytest.mark.parametrize("store", sorted(PACKS))
def test_repack_reproduces_the_store(store, tmp_path, monkeypatch, fixture_store):
    ckpt, args = PACKS[store]
    out = tmp_path / store
    monkeypatch.chdir(paths.REPO)        # as make_fixtures.pack() runs it
    cli(["pack", f"fixtures/{ckpt}", str(out), *args], standalone_mode=False)

    got, want = files_of(out), files_of(fixture_store(store))
    assert sorted(got) == sorted(want)
    committed = json.loads(want["zarr.json"])["attributes"]["qmoefmt"]
    assert json.loads(got["zarr.json"])["attributes"]["qmoefmt"]["format_version"] == "1.5"
    since_15 = committed["format_version"] == "1.5"
    assert since_15 == (paths.FORMAT_VERSIONS[store] == "1.5")
    differ = [f for f in want if f != "zarr.json" and got[f] != want[f]]
    if not since_15:
        # only tensor groups differ, and only by the logical dtypes of their records
        differ = [f for f in differ if not (
            f.startswith("tensors/") and f.count("/") == 2 and f.endswith("/zarr.json")
            and fmt.node_doc(without_logical_dtypes(
                json.loads(got[f])["attributes"]["qmoefmt"])) == want[f])]
    assert differ == []

    since_14 = "metadata" in committed["source"]
    assert (without_checksum_and_pack(got["zarr.json"], since_14, since_15, repacked=True)
            == without_checksum_and_pack(want["zarr.json"], since_14, since_15))
    new_pack = json.loads(got["zarr.json"])["attributes"]["qmoefmt"]["pack"]
    old_pack = json.loads(want["zarr.json"])["attributes"]["qmoefmt"]["pack"]
    assert old_pack.items() <= new_pack.items()
    assert hashlib.sha256(got["zarr.json"]).hexdigest() == ROOT_SHA256[store]
