"""Packing each committed fixture store's checkpoint with the arguments it was made with
reproduces the store: every file but the root byte for byte, the root's index but for its
checksum and the pack options it records (those gained fields after the 1.0 and 1.1
fixtures were made), and the root's bytes as the packer writes them today.

The arguments come from scripts/make_fixtures.py's tables, not a copy of them, so a store
added there is repacked here too."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from qmoefmt.testing import paths
from qmoefmt_cli.main import main as cli


def _make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", paths.MAKE_FIXTURES)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_SCRIPT = _make_fixtures()
# store -> (checkpoint under fixtures/, pack arguments)
PACKS = {**_SCRIPT.STORES, **_SCRIPT.UINT_STORES, **_SCRIPT.UINT_DICT_STORES}

# sha256 of each repacked root zarr.json, taken before the package was split into
# format/codecs/dictionaries/...: what the packer records must not drift unnoticed.
ROOT_SHA256 = {
    "edge-2bit-g16-dict16.qmoe": "854770f0538ec3d9c6993dc9cba7a213a19014a035b14c0faa5fdaac373973db",
    "edge-3bit-g16.qmoe": "92aa6c9c6cd225d68958fc344ce6a648dff4deaf9766f9fd4bd1be67a981ade9",
    "edge-auto.qmoe": "841e3b7d2728a81b13a79686ff0d1f0d30707c82fecea4c98668b3441e63f36c",
    "edge.qmoe": "54f09e5683572785104cab47d401fcae479a53bb5ed405926571dfc4b4aeedca",
    "switch-tiny-2bit-dict16.qmoe": "badde252a870bdb640ac715d3bd18238fb5c94e6ef350b7eb5d7a767ce48e4c9",
    "switch-tiny-2bit.qmoe": "a674097f29c1c2bc125ec6fbab559c52306d8f1772208a404b9b9d2629a0668d",
    "switch-tiny-qmoe2023.qmoe": "fa3fa83001c2ba4e36e0241a80a0b62a8de86556be7468cabc249e1a0521fc81",
    "switch-tiny.qmoe": "dd64dc34c0ea8221003ea8df53f8914df5cf7daedb68df7407f7c4490b4d0ebd",
}


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def without_checksum_and_pack(root_doc: bytes) -> dict:
    doc = json.loads(root_doc)
    for key in ("checksum", "pack"):
        del doc["attributes"]["qmoefmt"][key]
    return doc


def test_the_tables_cover_every_committed_store():
    committed = {p.name for p in paths.FIXTURES.glob("*.qmoe")}
    assert set(PACKS) == committed == set(paths.STORES) == set(ROOT_SHA256)


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

    assert without_checksum_and_pack(got["zarr.json"]) == without_checksum_and_pack(want["zarr.json"])
    new_pack = json.loads(got["zarr.json"])["attributes"]["qmoefmt"]["pack"]
    old_pack = json.loads(want["zarr.json"])["attributes"]["qmoefmt"]["pack"]
    assert old_pack.items() <= new_pack.items()
    assert hashlib.sha256(got["zarr.json"]).hexdigest() == ROOT_SHA256[store]
