"""Format 1.5, writer side (spec §3, §4.5, §8): the packer records in every array
descriptor the logical dtype its codec gives (bfloat16 `scales` of coded tensors, the
`data` of dense bfloat16 tensors) and on no other array, so its stores declare 1.5; a store
without such an array keeps the lower version it needs; a resumed pack, also of a pack a
writer before 1.5 left unfinished, equals an uninterrupted one byte for byte; the 1.4
fixture still opens and verifies."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import qmoefmt
from qmoefmt import codecs
from qmoefmt import format as fmt
from qmoefmt.format import constants as C
from qmoefmt.pack import PackOptions, pack
from qmoefmt.store.verify import verify
from qmoefmt.store.writer import StoreWriter, write_arrays
from qmoefmt.testing import paths
from qmoefmt.testing.trees import files_of

EXPERTS = ("*experts*",)
GRIDS = {
    "ternary": PackOptions(experts=EXPERTS, dictionary="qmoe-2023"),
    "2bit-packed": PackOptions(experts=EXPERTS, bits="2", kbit_codec="packed"),
    "2bit-dict16": PackOptions(experts=EXPERTS, bits="2", kbit_codec="dict16",
                               dictionary="qmoe-2023"),
}


def checkpoint(path: Path, dtype) -> Path:
    """Experts and a norm in `dtype`, beside dense tensors of other dtypes."""
    rng = np.random.default_rng(15)
    t = {f"layers.{i}.experts.{e}.w": (rng.standard_normal((8, 40)) * 0.05).astype(dtype)
         for i in range(2) for e in range(2)}
    t["layers.0.experts.0.w"][3] = 0                         # an all-zero row
    t["norm.weight"] = np.ones(40, dtype)
    t["head.bias"] = (rng.standard_normal(40) * 0.01).astype(np.float32)
    t["positions"] = np.arange(12, dtype=np.int64).reshape(3, 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path))
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ld")
    return {"bf16": checkpoint(tmp / "bf16" / "m.safetensors", ml_dtypes.bfloat16),
            "f32": checkpoint(tmp / "f32" / "m.safetensors", np.float32)}


def root_meta(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_bytes())["attributes"]["qmoefmt"]


def assert_records_the_codecs_logical_dtypes(store: Path) -> int:
    """Every descriptor of the index (and of the tensor groups, and every array document)
    says what the codec gives; dictionary arrays none. Returns how many have one."""
    meta = root_meta(store)
    n = 0
    for r in meta["tensors"]:
        unit = codecs.get(r["codec"])
        group = json.loads((store / r["path"] / "zarr.json").read_bytes())
        assert group["attributes"]["qmoefmt"] == r
        for name, desc in r["arrays"].items():
            want = unit.logical_dtype(name, r["dtype"])
            assert desc.get("logical_dtype") == want, (r["name"], name)
            doc = json.loads((store / r["path"] / name / "zarr.json").read_bytes())
            assert doc["attributes"].get("qmoefmt", {}).get("logical_dtype") == want
            n += want is not None
    for e in meta["dictionaries"]:
        assert not any("logical_dtype" in d for d in e["arrays"].values()), e["id"]
    return n


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_a_pack_declares_15_and_records_exactly_the_codecs_logical_dtypes(
        ckpts, tmp_path, grid, dtype):
    out = tmp_path / "s.qmoe"
    pack(ckpts[dtype], out, GRIDS[grid])
    st = qmoefmt.open(out)
    assert st.format_version == C.LOGICAL_DTYPE_SINCE == "1.5"
    n = assert_records_the_codecs_logical_dtypes(out)
    # the scales of the 4 coded experts, always bf16 bits (also from a float32 source,
    # so no pack is below 1.5), and a bf16 checkpoint's dense norm
    assert n == 4 + (dtype == "bf16")
    scales = [r["arrays"]["scales"] for r in st.meta["tensors"] if r["codec"] != C.CODEC_DENSE]
    assert len(scales) == 4 and all(d["logical_dtype"] == "bfloat16" for d in scales)
    dense = {r["name"]: r["arrays"]["data"] for r in st.meta["tensors"]
             if r["codec"] == C.CODEC_DENSE}
    assert ("logical_dtype" in dense["norm.weight"]) == (dtype == "bf16")
    assert "logical_dtype" not in dense["head.bias"] and "logical_dtype" not in dense["positions"]
    assert verify(out, deep=True) == []


def write_dense(path: Path, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    """A store of dense tensors only, through the writer (pack always codes experts)."""
    meta = {"writer": {"name": "test", "version": "0"}, "pack": {},
            "plan": {"tensors": len(tensors), "sha256": "0" * 64},
            "source": {"format": "safetensors", "name": "m.safetensors"}}
    w = StoreWriter(path, meta)
    unit = codecs.get(C.CODEC_DENSE)
    records = []
    for name, (a, dtype) in tensors.items():
        members, arrays = unit.encode(a, dtype)
        record = {"name": name, "path": f"tensors/{name}", "shape": list(a.shape),
                  "dtype": dtype, "source_sha256": "0" * 64, **members}
        record["arrays"] = write_arrays(w.root, record["path"], arrays)
        w.finish_tensor(record)
        records.append(record)
    w.commit(records)


def test_a_store_without_logical_dtypes_keeps_its_lower_version(tmp_path):
    plain = {"w": (np.ones((2, 3), np.float32), "float32"),
             "i": (np.arange(4, dtype=np.int64), "int64")}
    write_dense(tmp_path / "plain", plain)
    st = qmoefmt.open(tmp_path / "plain")
    assert st.format_version == "1.0"
    assert not any("logical_dtype" in d for r in st.meta["tensors"] for d in r["arrays"].values())
    assert verify(tmp_path / "plain", deep=True) == []
    bf = np.ones((2, 3), np.float32).astype(ml_dtypes.bfloat16)
    write_dense(tmp_path / "bf16", {**plain, "b": (bf, "bfloat16")})
    st = qmoefmt.open(tmp_path / "bf16")
    assert st.format_version == "1.5"
    assert [n for n in st if "logical_dtype" in st[n].record["arrays"]["data"]] == ["b"]
    assert st["b"].numpy().tobytes() == bf.tobytes()
    assert verify(tmp_path / "bf16", deep=True) == []


def interrupt(full: Path, part: Path, finished: int, before_15: bool) -> list[str]:
    """`part`: `full` as a pack killed after its first `finished` tensors leaves it (their
    groups written, the rest's arrays written but not their groups, the root incomplete);
    `before_15`: as a writer before 1.5 left it, its records without logical dtypes and its
    root declaring 1.4. Returns the names of the finished tensors whose records that
    changed."""
    shutil.copytree(full, part)
    root = root_meta(full)
    changed = []
    for i, r in enumerate(root["tensors"]):
        group = part / r["path"] / "zarr.json"
        if i >= finished:
            group.unlink()
        elif before_15 and any("logical_dtype" in d for d in r["arrays"].values()):
            old = dict(r, arrays={a: {k: v for k, v in d.items() if k != "logical_dtype"}
                                  for a, d in r["arrays"].items()})
            group.write_bytes(fmt.node_doc(old))
            changed.append(r["name"])
    meta = {k: v for k, v in root.items() if k not in ("tensors", "dictionaries", "checksum")}
    meta.update(complete=False, format_version="1.4" if before_15 else root["format_version"])
    (part / "zarr.json").write_bytes(fmt.root_doc(meta))
    return changed


@pytest.mark.parametrize("before_15", [False, True], ids=["1.5-writer", "pre-1.5-writer"])
@pytest.mark.parametrize("grid", ["ternary", "2bit-dict16"])
def test_resume_equals_an_uninterrupted_pack(ckpts, tmp_path, grid, before_15):
    full, part = tmp_path / "full", tmp_path / "part"
    pack(ckpts["bf16"], full, GRIDS[grid])
    n = len(root_meta(full)["tensors"])
    finished = n - 2
    changed = interrupt(full, part, finished, before_15)
    assert bool(changed) == before_15
    if not before_15:
        # the incomplete store's finished tensors open, their logical dtypes checked
        st = qmoefmt.open(part, allow_incomplete=True)
        assert st.format_version == "1.5" and len(list(st)) == finished
        assert all(st[name].decode() is not None for name in st)
    s = pack(ckpts["bf16"], part, GRIDS[grid], resume=True)
    # a record without the logical dtypes this writer records is redone, not kept
    assert s.resumed_tensors == finished - len(changed)
    assert files_of(part) == files_of(full)
    assert verify(part, deep=True) == []


def test_kill_then_resume_of_a_bf16_pack_is_byte_identical(ckpts, tmp_path):
    """A real kill (SIGKILL) in the middle of the tensors, then --resume."""
    from qmoefmt.testing import kill
    options = {"experts": list(EXPERTS), "dictionary": "qmoe-2023"}
    ref = tmp_path / "ref.qmoe"
    writes = kill.counted_writes(ckpts["bf16"], ref, options)
    groups = [i for i, w in enumerate(writes)
              if w.startswith("tensors/") and w.count("/") == 2 and w.endswith("/zarr.json")]
    out = tmp_path / "s.qmoe"
    assert kill.kill_at(ckpts["bf16"], out, groups[len(groups) // 2], "renaming", options) == -9
    pack(ckpts["bf16"], out, PackOptions(**options), resume=True)
    assert files_of(out) == files_of(ref)
    assert assert_records_the_codecs_logical_dtypes(out) == 5


def test_the_14_fixture_opens_and_verifies(fixture_store):
    """edge-trie.qmoe (the broken stores' base) stays as a 1.4 writer wrote it: no logical
    dtypes in its index, which the codecs still give its readers."""
    store = fixture_store("edge-trie.qmoe")
    st = qmoefmt.open(store)
    assert st.format_version == paths.FORMAT_VERSIONS["edge-trie.qmoe"] == "1.4"
    assert not st.logical_dtypes_in_index
    assert not any("logical_dtype" in d for r in st.meta["tensors"] for d in r["arrays"].values())
    for name in st:
        assert st[name].decode().size == int(np.prod(st[name].shape)), name
    assert verify(store, deep=True) == []


@pytest.mark.parametrize("store", sorted(n for n, v in paths.FORMAT_VERSIONS.items() if v == "1.5"))
def test_the_15_fixtures_record_the_codecs_logical_dtypes(store, fixture_store):
    assert assert_records_the_codecs_logical_dtypes(fixture_store(store)) > 0
