"""Packing each committed fixture store's checkpoint with the arguments it was made with
reproduces the store: every file but the root byte for byte, the root's index but for its
checksum and the pack options it records (those gained fields after the 1.0 and 1.1
fixtures were made), and the root's bytes as the packer writes them today. The legacy
stores (earlier format versions, their dictionaries as tables) are not repacked: today's
packer writes compact dictionaries (1.4).

The arguments come from scripts/make_fixtures.py's tables, not a copy of them, so a store
added there is repacked here too."""
from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest

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

# sha256 of each repacked root zarr.json, taken before the package was split into
# format/codecs/dictionaries/... (the 1.4 stores: when they were made; the 1.1 ones: since
# 1.4 records source.metadata): what the packer records must not drift unnoticed.
ROOT_SHA256 = {
    "edge-3bit-g16.qmoe": "3a526f1f96eadf95af5f68c93586899ec3027ef481c65358bc2487ceeb91fee3",
    "edge-auto.qmoe": "ffc53b7bb487bb71e9bceffc6a4d543797e64ba3270eaa3b12898db30563d9f7",
    "edge-trie.qmoe": "c557c5e991c360ec40401c423ec1007135be94844e21443377335edb715b2311",
    "switch-tiny-2bit-dict16.qmoe": "90d9537f219bdb03a420d288762ab0b8c94ed4feb16ef043c490df74ce9a61e1",
    "switch-tiny-2bit.qmoe": "c6aa392024e0ace4747d25168a851f4bb36f74a3895efe8fd7b3378a36d69581",
    "switch-tiny.qmoe": "8fea460a20a13558a218a57eb6eb98896e0c60a33ca4cb5638d47ffc23a2f18d",
}


def without_checksum_and_pack(root_doc: bytes, since_14: bool = True) -> dict:
    """The root but for its checksum and pack options; a store packed before 1.4's
    `source.metadata` (§4.4) is compared without that member and the version it raises."""
    doc = json.loads(root_doc)
    meta = doc["attributes"]["qmoefmt"]
    for key in ("checksum", "pack"):
        del meta[key]
    if not since_14:
        meta["source"].pop("metadata", None)
        del meta["format_version"]
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
    differ = [f for f in want if f != "zarr.json" and got[f] != want[f]]
    assert differ == []

    since_14 = "metadata" in json.loads(want["zarr.json"])["attributes"]["qmoefmt"]["source"]
    assert (without_checksum_and_pack(got["zarr.json"], since_14)
            == without_checksum_and_pack(want["zarr.json"], since_14))
    new_pack = json.loads(got["zarr.json"])["attributes"]["qmoefmt"]["pack"]
    old_pack = json.loads(want["zarr.json"])["attributes"]["qmoefmt"]["pack"]
    assert old_pack.items() <= new_pack.items()
    assert hashlib.sha256(got["zarr.json"]).hexdigest() == ROOT_SHA256[store]
