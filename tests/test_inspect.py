"""`inspect`: natural order, layers and their sums, --filter, pack settings, GPTQ status
counts, k-bit fields, and both bits/param counts, in text and JSON."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

import qmoefmt
from qmoefmt.store.layers import layer_of, natural_key, status_counts
from qmoefmt.store.summary import summarize
from qmoefmt_cli.main import main as cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_natural_key_orders_numbers_as_numbers():
    names = ["layers.10.w", "layers.2.w", "layers.1.w", "embed", "layers.2.a"]
    assert sorted(names, key=natural_key) == [
        "embed", "layers.1.w", "layers.2.a", "layers.2.w", "layers.10.w"]


@pytest.mark.parametrize("name, layer", [
    ("blocks.3.mlp.w", "blocks.3"), ("model.layers.10.experts.7.w", "model.layers.10"),
    ("encoder.block.1.layer.1.mlp.wi.weight", "encoder.block.1"),
    ("edge.odd", None), ("3.w", None), ("lm_head.weight", None)])
def test_layer_of(name, layer):
    assert layer_of(name) == layer


def test_status_counts_counts_fused_lists_per_expert():
    records = [{"quantizer": {"status": "gptq"}}, {"quantizer": {"method": "rtn"}},
               {"quantizer": {"status": ["gptq", "rtn-no-tokens", "gptq"]}}, {}]
    assert status_counts(records) == {"gptq": 3, "rtn-no-tokens": 1}


@pytest.mark.parametrize("store", ["switch-tiny.qmoe", "switch-tiny-2bit.qmoe",
                                   "switch-tiny-2bit-dict16.qmoe", "edge.qmoe"])
def test_layers_sum_their_tensors(store, fixture_store):
    s = summarize(qmoefmt.open(fixture_store(store)))
    names = [t["name"] for t in s["tensors"]]
    assert names == sorted(names, key=natural_key)
    by_name = {t["name"]: t for t in s["tensors"]}
    grouped = [n for g in s["layers"] for n in g["names"]]
    assert sorted(grouped) == sorted(names)             # every tensor in exactly one layer
    for g in s["layers"]:
        rows = [by_name[n] for n in g["names"]]
        assert all(layer_of(n) == g["layer"] for n in g["names"])
        assert g["params"] == sum(math.prod(r["shape"]) for r in rows)
        assert g["bytes"] == sum(r["bytes"] for r in rows)
        assert g["expert_tensors"] == sum(r["expert"] for r in rows)
        assert g["bits_per_param"] == pytest.approx(8 * g["bytes"] / g["params"])
        known = [r for r in rows if r["zero_fraction"] is not None]
        if known:
            n = sum(r["params"] for r in known)
            assert g["zero_fraction"] == pytest.approx(
                sum(r["zero_fraction"] * r["params"] for r in known) / n)
        assert g["dictionaries"] == sorted({r["dictionary"] for r in rows if r["dictionary"]})
    assert [g["layer"] for g in s["layers"] if g["layer"]] == sorted(
        {g["layer"] for g in s["layers"] if g["layer"]}, key=natural_key)


def test_switch_layers(fixture_store):
    s = summarize(qmoefmt.open(fixture_store("switch-tiny.qmoe")))
    assert [g["layer"] for g in s["layers"]] == [
        "decoder.block.0", "decoder.block.1", "encoder.block.0", "encoder.block.1", None]
    assert [g["expert_tensors"] for g in s["layers"]] == [0, 8, 0, 8, 0]


def test_both_bit_counts(fixture_store):
    path = fixture_store("switch-tiny-2bit.qmoe")
    s = summarize(qmoefmt.open(path))
    for t in s["tensors"]:
        chunks = sum(p.stat().st_size for p in (path / qmoefmt.open(path)[t["name"]].path).rglob("*")
                     if p.is_file() and p.name != "zarr.json")
        assert t["array_bytes"] == chunks < t["bytes"]
    e, tot = s["experts"], s["total"]
    assert e["array_bits_per_param"] == 8 * e["array_bytes"] / e["params"]
    assert e["array_bits_per_param"] < e["bits_per_param"] == 8 * e["bytes"] / e["params"]
    on_disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    chunks = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")
    assert tot["bytes"] == on_disk and tot["array_bytes"] == chunks
    r = run("inspect", path)
    assert "arrays only (chunk files)" in r.stdout and "with metadata files" in r.stdout


@pytest.mark.parametrize("store, bits, share", [("switch-tiny-2bit.qmoe", 2, False),
                                                ("switch-tiny-2bit-dict16.qmoe", 2, True),
                                                ("edge-3bit-g16.qmoe", 3, False)])
def test_kbit_fields(store, bits, share, fixture_store):
    s = summarize(qmoefmt.open(fixture_store(store)))
    kbit = [t for t in s["tensors"] if "bits" in t]
    assert kbit and all(t["bits"] == bits and t["group_size"] >= 1 for t in kbit)
    # uint-dict16 counts its zero-point levels in the record; uint-packed would need decoding
    assert all((t["zero_point_share"] is not None) == share for t in kbit if t["params"])
    assert not any("bits" in t for t in s["tensors"] if t["codec"] == "qmoe.dense")


@pytest.mark.parametrize("store", ["switch-tiny-2bit.qmoe", "edge-3bit-g16.qmoe"])
def test_levels_reads_uint_packed_zero_point_share(store, fixture_store):
    """--levels counts, from the codes, the weights on their group's zero point: exactly
    the weights that decode to 0."""
    st = qmoefmt.open(fixture_store(store))
    s = summarize(st, levels=True)
    kbit = [t for t in s["tensors"] if "bits" in t and t["params"]]
    assert kbit
    for t in kbit:
        want = float(np.mean(st[t["name"]].decode() == 0))
        assert t["zero_point_share"] == t["zero_fraction"] == pytest.approx(want, abs=1e-12)
    r = run("inspect", "--levels", "--json", fixture_store(store))
    assert r.exit_code == 0, r.output
    assert [t["zero_point_share"] for t in json.loads(r.stdout)["tensors"] if "bits" in t
            and t["params"]] == [t["zero_point_share"] for t in kbit]


def test_filter(fixture_store):
    path = fixture_store("switch-tiny.qmoe")
    r = run("inspect", "--json", "--filter", "*.experts.*", path)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert len(s["tensors"]) == s["total"]["tensors"] == 16 and s["store_tensors"] == 62
    assert all(".experts." in t["name"] for t in s["tensors"])
    assert s["total"]["filter"] == "*.experts.*"
    assert s["total"]["bytes"] == sum(t["bytes"] for t in s["tensors"])
    assert [g["layer"] for g in s["layers"]] == ["decoder.block.1", "encoder.block.1"]
    text = run("inspect", "--filter", "*.experts.*", path).stdout
    assert "filtered by '*.experts.*': 16 of 62 tensors" in text
    assert "shared.weight" not in text


def test_json_carries_what_text_shows(fixture_store):
    path = fixture_store("edge-3bit-g16.qmoe")
    s = json.loads(run("inspect", "--json", path).stdout)
    assert {"pack", "source", "gptq_status", "layers", "experts", "total", "filter",
            "store_tensors"} <= set(s)
    assert s["pack"]["bits"] == "3" and s["pack"]["group_size"] == 16
    for part in (s["experts"], s["total"]):
        assert {"bits_per_param", "array_bits_per_param", "bytes", "array_bytes"} <= set(part)
    assert {"layer", "names", "params", "expert_tensors", "bits_per_param",
            "array_bits_per_param", "zero_fraction", "dictionaries"} <= set(s["layers"][0])
    text = run("inspect", path).stdout
    assert "pack: " in text and "bits=3" in text and "group_size=16" in text
    assert "3b/g16" in text and "layer (no layer in name)" in text
