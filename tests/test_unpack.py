"""unpack keeps the source's safetensors metadata and writes transformers-style shards
(`--max-shard-size`) with their index and the store's config.json; an existing output is
refused unless forced, and a failed unpack leaves nothing behind."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import qmoefmt
from qmoefmt_cli.main import main
from qmoefmt.io.unpack import OutputExistsError, parse_size, unpack
from qmoefmt.format.source import lowest_version
from qmoefmt.pack import PackOptions, pack
from qmoefmt.store.verify import verify


def checkpoint(directory, metadata=None):
    rng = np.random.default_rng(0)
    tensors = {f"layers.{i}.experts.{e}.w.weight": rng.normal(size=(32, 24)).astype(np.float32)
               for i in range(2) for e in range(3)}
    tensors["embed.weight"] = rng.normal(size=(50, 24)).astype(np.float32)
    directory.mkdir(exist_ok=True)
    path = directory / "model.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    (directory / "config.json").write_text('{"model_type": "toy"}\n')
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unpack")
    src = checkpoint(tmp / "src", {"format": "pt", "origin": "test"})
    out = tmp / "s.qmoe"
    pack(src.parent, out, PackOptions(experts=("*experts*",), dictionary="qmoe-2023"))
    return qmoefmt.open(out)


def read_all(directory) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_source_metadata_is_recorded_and_written_back(store, tmp_path):
    assert store.source_metadata == {"format": "pt", "origin": "test"}
    # source.metadata is a 1.4 member; the scales' logical dtypes (spec §4.5) make it 1.5
    assert store.format_version == "1.5"
    assert verify(store.path, deep=True) == []
    out = tmp_path / "d.safetensors"
    unpack(store, out)
    with safe_open(str(out), "np") as f:
        assert f.metadata() == {"format": "pt", "origin": "test"}


def test_a_source_without_metadata_keeps_its_version(tmp_path):
    src = checkpoint(tmp_path / "src")
    # bit-packed: no dictionary, whose compact form would need 1.4 by itself
    pack(src, tmp_path / "s.qmoe", PackOptions(experts=("*experts*",), bits="2",
                                               kbit_codec="packed"))
    st = qmoefmt.open(tmp_path / "s.qmoe")
    assert st.source_metadata is None and "metadata" not in st.meta["source"]
    assert st.format_version == "1.5"                 # the scales' logical dtypes (§4.5)
    # the root's members alone need 1.3: config.json attached, nothing newer
    root_only = {k: v for k, v in st.meta.items() if k not in ("tensors", "dictionaries")}
    assert lowest_version("1.1", root_only) == "1.3"
    unpack(st, tmp_path / "d.safetensors")
    with safe_open(str(tmp_path / "d.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}       # what transformers' loader checks


def test_shards_hold_every_tensor_once_within_the_limit(store, tmp_path):
    single = tmp_path / "one.safetensors"
    unpack(store, single)
    want = load_file(str(single))
    limit = 8000                                   # a [32, 24] float32 expert is 3,072 bytes
    out = unpack(store, tmp_path / "sharded", max_shard_size=limit)
    d = tmp_path / "sharded"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(out["files"]) == sorted(shards + ["model.safetensors.index.json",
                                                    "config.json"])
    assert (d / "config.json").read_bytes() == store.attachment("config.json")
    got = read_all(d)
    assert sorted(got) == sorted(want) == sorted(index["weight_map"])
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in want.values())
    for shard in shards:
        tensors = load_file(str(d / shard))
        nbytes = sum(a.nbytes for a in tensors.values())
        assert nbytes <= limit or len(tensors) == 1
        with safe_open(str(d / shard), "np") as f:
            assert f.metadata() == {"format": "pt", "origin": "test"}
    assert not os.path.exists(str(d) + ".partial")


def test_one_shard_is_model_safetensors_without_an_index(store, tmp_path):
    out = unpack(store, tmp_path / "d", max_shard_size=parse_size("5GB"))
    assert sorted(out["files"]) == ["config.json", "model.safetensors"]


def test_existing_outputs(store, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    (d / "model-00001-of-00009.safetensors").write_text("stale")
    with pytest.raises(OutputExistsError, match="not empty; use --force"):
        unpack(store, d, max_shard_size=8000)
    unpack(store, d, max_shard_size=8000, force=True)
    assert (d / "notes.txt").read_text() == "mine"             # not ours: left alone
    assert not (d / "model-00001-of-00009.safetensors").exists()  # a stale shard: removed
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(OutputExistsError, match="is not a directory"):
        unpack(store, f, max_shard_size=8000, force=True)
    with pytest.raises(OutputExistsError, match="is a directory"):
        unpack(store, d)


def test_a_failed_unpack_leaves_nothing(store, tmp_path, monkeypatch):
    import qmoefmt.io.unpack as U
    calls = []

    def failing(st, e):
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        calls.append(e)
        return real(st, e)
    real = U._dense
    monkeypatch.setattr(U, "_dense", failing)
    with pytest.raises(OSError):
        unpack(store, tmp_path / "d", max_shard_size=8000)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("text,want", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20),
                                       ("1000", 1000), ("1.5kb", 1500), ("2 GiB", 2 * 2**30)])
def test_sizes(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "5XB", "-1GB", "0", "GB"])
def test_bad_sizes(text):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def test_cli(store, tmp_path):
    r = CliRunner().invoke(main, ["unpack", str(store.path), str(tmp_path / "d"),
                                  "--max-shard-size", "8KB", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["tensors"] == len(store) and len(out["files"]) > 2
    assert out["bytes"] == sum(os.path.getsize(tmp_path / "d" / f) for f in out["files"])
    r = CliRunner().invoke(main, ["unpack", str(store.path), str(tmp_path / "e"),
                                  "--max-shard-size", "lots"])
    assert r.exit_code == 2 and "is not a size" in r.output
