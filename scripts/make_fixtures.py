#!/usr/bin/env python
"""Generate the conformance fixtures under fixtures/ (all but fixtures/moe-tiny).

Run once; the outputs are committed and the tests never regenerate them. They are
conformance vectors: when the code changes and a vector stops matching, that is a bug in
the code or a format change, never a reason to rerun this script. It refuses to overwrite
existing outputs unless given --force.

    python scripts/make_fixtures.py [--force]

Everything is deterministic (fixed seeds, no timestamps): a rerun with --force gives the
same bytes, as long as qmoefmt's writer has not changed.

Outputs:
  fixtures/switch-tiny/model.safetensors   SwitchTransformers-style checkpoint, bf16
  fixtures/switch-tiny.qmoe/               pack --preset switch               (auto)
  fixtures/edge/model.safetensors          edge shapes and dtypes
  fixtures/edge-trie.qmoe/                 pack --experts 'edge.*' --dictionary qmoe-2023
  fixtures/edge-auto.qmoe/                 pack --experts 'edge.*'            (auto)
  fixtures/conformance/<store>.safetensors expected symbols and values of every coded tensor
  fixtures/conformance/manifest.json       expected codeword stream hashes, dictionary ids
  fixtures/broken/<case>/, cases.json      copies of edge-trie.qmoe with one defect each
  fixtures/rank/model.safetensors, rank*.qmoe   coded tensors of rank 1 and 0, one store a codec
and the k-bit stores and their manifests below. LEGACY stores were packed by earlier
versions, in earlier forms of the format, and are never regenerated; the manifests
still cover them (their entries come out unchanged).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "fixtures"

STORES = {
    # store dir name: (checkpoint, pack arguments). Compact dictionaries (§5.7, 1.4); packed
    # today, format 1.5 (logical dtypes in the index, §4.5). edge-trie.qmoe is committed as
    # 1.4, the base of broken/ (cases.json pins its digest): regenerating it makes it 1.5
    # and asks for broken/ to be regenerated with it.
    "switch-tiny.qmoe": ("switch-tiny/model.safetensors", ["--preset", "switch"]),
    "edge-trie.qmoe": ("edge/model.safetensors",
                       ["--experts", "edge.*", "--dictionary", "qmoe-2023"]),
    "edge-auto.qmoe": ("edge/model.safetensors", ["--experts", "edge.*"]),
}
# Format 1.1 (codec qmoe.uint-packed), added after the 1.0 fixtures: generated separately
# (--only) so that the 1.0 vectors are never regenerated.
UINT_STORES = {
    "switch-tiny-2bit.qmoe": ("switch-tiny/model.safetensors", ["--preset", "switch", "--bits", "2"]),
    "edge-3bit-g16.qmoe": ("edge/model.safetensors",
                           ["--experts", "edge.*", "--bits", "3", "--group-size", "16"]),
}
# Codec qmoe.uint-dict16 (1.2), with a compact dictionary since 1.4.
UINT_DICT_STORES = {
    "switch-tiny-2bit-dict16.qmoe": ("switch-tiny/model.safetensors",
                                     ["--preset", "switch", "--bits", "2", "--kbit-codec", "dict16"]),
}
# Stores of earlier format versions, committed as those versions' packers wrote them
# (their dictionaries as the five §5.6 tables): the inputs that show later readers still
# open and verify them. Never regenerated: today's packer writes compact dictionaries.
# The golomb-v2f stores of 1.0-1.2 went when 1.4 came (each held 4-9 dictionaries of
# ~4.5 MB, 130 MB in all); their tables form is rebuilt and checked by the tests.
# store: (checkpoint, the pack arguments it was made with, format version)
LEGACY_STORES = {
    "switch-tiny-qmoe2023.qmoe": ("switch-tiny/model.safetensors",
                                  ["--preset", "switch", "--dictionary", "qmoe-2023"], "1.0"),
    "edge.qmoe": ("edge/model.safetensors", ["--experts", "edge.*", "--dictionary", "qmoe-2023"],
                  "1.0"),
    "edge-2bit-g16-dict16.qmoe": ("edge/model.safetensors",
                                  ["--experts", "edge.*", "--bits", "2", "--group-size", "16",
                                   "--kbit-codec", "dict16", "--dictionary", "qmoe-2023"], "1.2"),
}


# Coded tensors of rank 1 and 0 (spec §1: one row), one store per codec. The packer
# quantizes matrices only (a 1-D tensor selected as an expert is a user's mistake), so
# make_rank packs each tensor viewed as [1, n] ([1, 1] for rank 0) and gives its record the
# tensor's own shape: the arrays of a [1, n] tensor are an [n] tensor's, byte for byte.
RANK_SHAPES = {"rank.vec": (77,), "rank.one": (1,), "rank.scalar": (), "rank.empty": (0,),
               "rank.wide": (70001,)}
RANK_STORES = {
    "rank.qmoe": ("rank/model.safetensors", ["--experts", "rank.*", "--dictionary", "qmoe-2023"]),
    "rank-2bit.qmoe": ("rank/model.safetensors",
                       ["--experts", "rank.*", "--bits", "2", "--group-size", "16",
                        "--kbit-codec", "packed"]),
    "rank-2bit-dict16.qmoe": ("rank/model.safetensors",
                              ["--experts", "rank.*", "--bits", "2", "--kbit-codec", "dict16",
                               "--dictionary", "qmoe-2023"]),
}


OUTPUTS = ["switch-tiny", "edge", *STORES, "conformance", "broken", *UINT_STORES,
           "conformance-uint", *UINT_DICT_STORES, "conformance-uint-dict", "rank", *RANK_STORES]


def rows_cols(shape) -> tuple[int, int]:
    """The matrix view of a tensor (spec §1): one row of one column for rank 0."""
    return (int(np.prod(shape[:-1])), shape[-1]) if shape else (1, 1)


def ternary_stores() -> dict:
    """store -> checkpoint of every ternary store a manifest covers, legacy ones too."""
    return {**{k: v[0] for k, v in STORES.items()},
            **{k: v[0] for k, v in LEGACY_STORES.items() if "--bits" not in v[1]},
            "rank.qmoe": RANK_STORES["rank.qmoe"][0]}


def uint_stores() -> dict:
    return {**{k: v[0] for k, v in UINT_STORES.items()},
            "rank-2bit.qmoe": RANK_STORES["rank-2bit.qmoe"][0]}


def uint_dict_stores() -> dict:
    return {**{k: v[0] for k, v in UINT_DICT_STORES.items()},
            **{k: v[0] for k, v in LEGACY_STORES.items() if "--kbit-codec" in v[1]},
            "rank-2bit-dict16.qmoe": RANK_STORES["rank-2bit-dict16.qmoe"][0]}


def _reference():
    """The independent quantizer and QMoE encoder (qmoefmt/testing/qmoe_reference.py)."""
    from qmoefmt.testing import qmoe_reference
    return qmoe_reference


# ------------------------------------------------------------------ checkpoints

def bf16(x: np.ndarray) -> torch.Tensor:
    """float -> bf16 (round to nearest even, via ml_dtypes) as a torch tensor."""
    b = np.ascontiguousarray(np.asarray(x, np.float32).astype(ml_dtypes.bfloat16))
    return torch.from_numpy(b.view(np.int16).copy()).view(torch.bfloat16)


def f32(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32)))


def make_switch_tiny(path: Path) -> None:
    """HF SwitchTransformers names: 2 encoder and 2 decoder blocks, sparse MLP in block 1
    (encoder_sparse_step = decoder_sparse_step = 2), 4 experts, d_model 64, d_ff 256,
    4 heads of d_kv 16, vocab 128. Experts differ in tails so their sparsities differ."""
    rng = np.random.default_rng(20231016)
    d_model, d_ff, n_exp, heads, vocab = 64, 256, 4, 4, 128
    t: dict[str, torch.Tensor] = {}

    def normal(shape, std):
        return rng.standard_normal(shape) * std

    def student(shape, df, std):
        return rng.standard_t(df, shape) * std

    def attn(prefix, rel_bias):
        for m in "qkvo":
            t[f"{prefix}.{m}.weight"] = bf16(normal((d_model, d_model), 0.04))
        if rel_bias:
            t[f"{prefix}.relative_attention_bias.weight"] = bf16(normal((32, heads), 0.3))

    def norm(name):
        t[name] = bf16(1.0 + normal(d_model, 0.05))

    def expert(prefix, j):
        # expert 0: normal 0.02, 1: normal 0.05, 2: student-t df 3, 3: student-t df 2.5
        gen = [lambda s: normal(s, 0.02), lambda s: normal(s, 0.05),
               lambda s: student(s, 3.0, 0.02), lambda s: student(s, 2.5, 0.03)][j]
        t[f"{prefix}.experts.expert_{j}.wi.weight"] = bf16(gen((d_ff, d_model)))
        t[f"{prefix}.experts.expert_{j}.wo.weight"] = bf16(gen((d_model, d_ff)))

    for part, n_attn in (("encoder", 1), ("decoder", 2)):
        ffn_layer = n_attn  # encoder: layer.1, decoder: layer.2
        for i in range(2):
            b = f"{part}.block.{i}.layer"
            attn(f"{b}.0.SelfAttention", rel_bias=(i == 0))
            norm(f"{b}.0.layer_norm.weight")
            if part == "decoder":
                attn(f"{b}.1.EncDecAttention", rel_bias=False)
                norm(f"{b}.1.layer_norm.weight")
            mlp = f"{b}.{ffn_layer}.mlp"
            if i % 2 == 1:
                router = normal((n_exp, d_model), 0.1)
                # HF keeps the router in float32 in some checkpoints: one float32 tensor
                t[f"{mlp}.router.classifier.weight"] = (f32(router) if part == "encoder"
                                                       else bf16(router))
                for j in range(n_exp):
                    expert(mlp, j)
            else:
                t[f"{mlp}.wi.weight"] = bf16(normal((d_ff, d_model), 0.04))
                t[f"{mlp}.wo.weight"] = bf16(normal((d_model, d_ff), 0.04))
            norm(f"{b}.{ffn_layer}.layer_norm.weight")
        norm(f"{part}.final_layer_norm.weight")
    t["shared.weight"] = bf16(normal((vocab, d_model), 0.5))
    t["lm_head.weight"] = bf16(normal((vocab, d_model), 0.05))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch(t, str(path), metadata={"format": "pt", "generator": "scripts/make_fixtures.py"})


def make_edge(path: Path) -> None:
    rng = np.random.default_rng(4242)
    t: dict[str, torch.Tensor] = {}
    n = rng.standard_normal
    t["edge.column"] = bf16(n((37, 1)) * 0.05)
    t["edge.row"] = bf16(n((1, 301)) * 0.05)
    t["edge.odd"] = bf16(n((9, 77)) * 0.05)
    zr = n((8, 64)) * 0.05
    zr[0] = 0.0
    zr[5] = -0.0          # negative zeros: lo and hi are still +0.0
    t["edge.zero_rows"] = bf16(zr)
    t["edge.all_zero"] = bf16(np.zeros((4, 32)))
    t["edge.empty_rows"] = bf16(np.zeros((0, 64)))
    t["edge.empty_cols"] = bf16(np.zeros((16, 0)))
    t["edge.rank3"] = bf16(rng.standard_t(3.0, (2, 16, 48)) * 0.02)
    t["edge.wide"] = bf16(n((1, 70000)) * 0.02)       # 70000 >= 65536: uint32 row_codes
    # P(0) ~ 0.99: small background, one positive and one negative outlier per row and a
    # few more; every outlier lies beyond half the row's extremes.
    sp = n((32, 256)) * 0.001
    for r in range(32):
        cols = rng.choice(256, size=2 + rng.binomial(256, 0.005), replace=False)
        signs = np.where(np.arange(cols.size) % 2 == 0, 1.0, -1.0)
        sp[r, cols] = signs * rng.uniform(0.6, 1.0, cols.size)
    t["edge.sparse"] = bf16(sp)
    t["edge.dense"] = bf16(rng.uniform(-1.0, 1.0, (32, 256)) * 0.05)   # P(0) ~ 0.5
    # exact thresholds: w == lo/2 or hi/2 is symbol 0 (strict comparisons)
    t["edge.ties"] = bf16(np.array([[1.0, 0.5, -0.5, -1.0, 0.5, 0.25, -0.25, 0.0],
                                    [0.75, 0.375, 0.3751, -0.375, -0.1875, 0.0, 0.0, 0.0]]))
    # float32 source: scales round to bf16, thresholds come from the rounded scales
    fx = (n((16, 40)) * 0.05).astype(np.float32)
    fx[0, :4] = [0.1000061, 0.05, 0.0500030, -0.0999]   # near a bf16 rounding boundary
    t["edge.f32"] = f32(fx)
    t["edge.f16"] = torch.from_numpy((n((12, 24)) * 0.05).astype(np.float16))
    # selected by the glob but not experts: 1-D, integer
    t["edge.bias"] = bf16(n(64) * 0.01)
    t["edge.index"] = torch.from_numpy(rng.integers(0, 100, (3, 5)).astype(np.int64))
    # not selected by the glob
    t["norm.weight"] = bf16(1.0 + n(64) * 0.05)
    t["scalar"] = torch.tensor(0.125, dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch(t, str(path), metadata={"format": "pt", "generator": "scripts/make_fixtures.py"})


# ------------------------------------------------------------------ packing

def make_rank(path: Path) -> None:
    rng = np.random.default_rng(77)
    # bf16() goes through ascontiguousarray, which makes a 0-d array 1-d: reshape back
    t = {name: bf16(rng.standard_normal(shape) * 0.05).reshape(shape)
         for name, shape in RANK_SHAPES.items()}
    t["rank.norm"] = bf16(np.ones(8))                      # dense, as a model's would be
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch(t, str(path), metadata={"format": "pt", "generator": "scripts/make_fixtures.py"})


def pack_rank(store: str) -> None:
    """RANK_STORES[store]: packed as matrices from a scratch copy of the checkpoint, then
    each record given its tensor's shape and the plan digest recomputed for them."""
    import hashlib
    import tempfile

    from qmoefmt import format as fmt
    from qmoefmt.io.checkpoint import open_checkpoint
    from qmoefmt.store.writer import _write_file
    ckpt, args = RANK_STORES[store]
    source = load_torch(str(FIX / ckpt))
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "model.safetensors"
        save_torch({k: v.reshape(1, -1) if k in RANK_SHAPES else v for k, v in source.items()},
                   str(scratch), metadata={"format": "pt", "generator": "scripts/make_fixtures.py"})
        run_cli(["pack", str(scratch), f"fixtures/{store}", *args])
    root = FIX / store
    meta = store_root(root)
    for rec in meta["tensors"]:
        if rec["name"] in RANK_SHAPES:
            rec["shape"] = list(RANK_SHAPES[rec["name"]])
            _write_file(root / rec["path"] / "zarr.json", fmt.node_doc(rec))
    with open_checkpoint(FIX / ckpt) as c:
        meta["plan"]["sha256"] = hashlib.sha256(fmt.dumps(
            [[s.name, list(s.shape), s.dtype] for s in c.tensors()])).hexdigest()
    del meta["checksum"]
    _write_file(root / "zarr.json", fmt.root_doc(meta))


def run_cli(argv: list[str]) -> None:
    import os

    from qmoefmt_cli.main import main as cli
    print("$ qmoefmt", " ".join(argv), flush=True)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        cli(argv, standalone_mode=False)
    finally:
        os.chdir(cwd)


def pack(store: str) -> None:
    """`qmoefmt pack CKPT STORE ARGS...`, run in-process."""
    ckpt, args = {**STORES, **UINT_STORES, **UINT_DICT_STORES}[store]
    run_cli(["pack", f"fixtures/{ckpt}", f"fixtures/{store}", *args])


def check_store(store: str) -> None:
    from qmoefmt.store.verify import verify
    problems = verify(FIX / store, deep=True)
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    if problems:
        sys.exit(f"fixtures/{store} does not verify")


# ------------------------------------------------------------------ conformance

def sha256(data) -> str:
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def store_root(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_bytes())["attributes"]["qmoefmt"]


def read_chunk(store: Path, rec: dict, name: str) -> np.ndarray:
    from qmoefmt import format as fmt
    desc = rec["arrays"][name]
    dt = fmt.np_dtype(desc["data_type"])
    if not fmt.has_chunk(desc["shape"]):
        return np.zeros(desc["shape"], dt)
    raw = (store / rec["path"] / name / fmt.chunk_key(desc["shape"])).read_bytes()
    return np.frombuffer(raw, dt).reshape(desc["shape"])


def save_vectors(out: Path, store_name: str, vectors: dict) -> str:
    """Write a store's expected arrays, or find them already written: stores packed from one
    checkpoint with one quantizer expect the same values whatever their codec's stream or
    dictionary, and one file serves them all. Returns the file's path relative to `out`
    (its manifest's directory), as the manifest's `vectors` gives it."""
    def same(f: Path) -> bool:
        have = load_numpy(str(f))
        return have.keys() == vectors.keys() and all(
            have[k].dtype == v.dtype and have[k].shape == v.shape
            and have[k].tobytes() == v.tobytes() for k, v in vectors.items())
    for f in sorted(FIX.glob("conformance*/*.safetensors")):
        if same(f):
            return os.path.relpath(f, out)
    name = f"{store_name.removesuffix('.qmoe')}.safetensors"
    save_numpy(vectors, str(out / name), metadata={"store": store_name})
    return name


def make_conformance(ref) -> None:
    out = FIX / "conformance"
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "description": (
            "Expected results for every coded tensor of the fixture stores. symbols/values "
            "in <store>.safetensors come from a plain-numpy quantizer (spec section 6) run "
            "on the source checkpoint. codes_sha256/row_codes_sha256 hash the expected "
            "little-endian bytes of the codes and row_codes arrays: for qmoe-2023 stores "
            "from the pure-Python QMoE reference encoder (tests/test_qmoe_reference.py), "
            "for golomb-v2f stores from the committed store itself (stream_source says "
            "which)."),
        "stores": {},
    }
    mismatches = []
    for store_name, ckpt in sorted(ternary_stores().items()):
        store = FIX / store_name
        source = load_torch(str(FIX / ckpt))
        meta = store_root(store)
        vectors = {}
        entries = {}
        for rec in meta["tensors"]:
            if rec["codec"] != "qmoe.ternary-dict16":
                continue
            name = rec["name"]
            w = source[name].float().numpy()
            shape = tuple(w.shape)
            rows, cols = rows_cols(shape)
            sym, scales, values = ref.reference_quantize(w.reshape(rows, cols))
            vectors[f"{name}/symbols"] = np.require(sym.reshape(shape), requirements="C")
            vectors[f"{name}/values"] = np.require(values.reshape(shape), requirements="C")
            dict_entry = next(d for d in meta["dictionaries"] if d["id"] == rec["dictionary"])
            kind = dict_entry["kind"]
            if kind == "qmoe-2023":
                codes, row_codes = ref.reference_encode(sym)
                dict_id = ref.reference_content_id(dict_entry.get("form", "tables"))
                stream_source = "reference-encoder"
            else:
                codes = read_chunk(store, rec, "codes")
                row_codes = read_chunk(store, rec, "row_codes")
                dict_id = rec["dictionary"]
                stream_source = "store"
            entry = {
                "shape": list(shape),
                "dictionary_kind": kind,
                "dictionary": dict_id,
                "stream_source": stream_source,
                "n_codes": int(codes.size),
                "codes_sha256": sha256(codes.astype("<u2")),
                "row_codes_dtype": str(row_codes.dtype),
                "row_codes_sha256": sha256(row_codes.astype(row_codes.dtype.newbyteorder("<"))),
                "scales_sha256": sha256(scales.astype("<u2")),
                "symbol_counts": [int((sym == s).sum()) for s in range(3)],
            }
            entries[name] = entry
            # cross-check against what the packer wrote (a mismatch is a bug to report,
            # not something to paper over: the expected values stay the reference's)
            got = {
                "codes_sha256": sha256(read_chunk(store, rec, "codes").astype("<u2")),
                "row_codes_sha256": sha256(read_chunk(store, rec, "row_codes")),
                "row_codes_dtype": rec["arrays"]["row_codes"]["data_type"],
                "scales_sha256": sha256(read_chunk(store, rec, "scales")),
                "dictionary": rec["dictionary"],
                "symbol_counts": rec["symbol_counts"],
            }
            for k, v in got.items():
                if entry[k] != v:
                    mismatches.append(f"{store_name}: {name}: {k}: expected {entry[k]}, store has {v}")
        manifest["stores"][store_name] = {
            "vectors": save_vectors(out, store_name, vectors),
            "checkpoint": ckpt,
            "tensors": entries,
        }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    for m in mismatches:
        print("MISMATCH (library bug?):", m, file=sys.stderr)


# ------------------------------------------------------------------ broken stores

class Store:
    """A copy of a store being damaged, with helpers to re-sign what a defect touched
    (chunk CRCs in the index, tensor group documents, array documents, the root checksum)
    so that only the intended check can fire."""

    def __init__(self, path: Path):
        self.path = path
        self.meta = store_root(path)

    def record(self, name: str) -> dict:
        return next(r for r in self.meta["tensors"] if r["name"] == name)

    def read(self, name: str, array: str) -> np.ndarray:
        return read_chunk(self.path, self.record(name), array).copy()

    def write_array(self, node: str, arr: np.ndarray, logical_dtype: str | None) -> dict:
        from qmoefmt import format as fmt
        data_type = str(arr.dtype)
        arr = np.ascontiguousarray(arr, dtype=fmt.np_dtype(data_type))
        base = self.path / node
        if (base / "c").exists():
            if (base / "c").is_dir():
                shutil.rmtree(base / "c")
            else:
                (base / "c").unlink()
        if fmt.has_chunk(arr.shape):
            chunk = base / fmt.chunk_key(arr.shape)
            chunk.parent.mkdir(parents=True, exist_ok=True)
            raw = arr.reshape(-1).view(np.uint8).tobytes()
            chunk.write_bytes(raw)
            crc = fmt.crc32c(raw)
        else:
            crc = fmt.crc32c(b"")
        (base / "zarr.json").write_bytes(fmt.array_doc(data_type, arr.shape, logical_dtype))
        return {"data_type": data_type, "shape": list(arr.shape), "crc32c": crc}

    def set_tensor_array(self, name: str, array: str, arr: np.ndarray) -> None:
        rec = self.record(name)
        from qmoefmt import codecs
        ld = codecs.get(rec["codec"]).logical_dtype(array, rec["dtype"])
        in_index = "logical_dtype" in rec["arrays"][array]     # a 1.5 base's (spec §4.5)
        rec["arrays"][array] = self.write_array(f"{rec['path']}/{array}", arr, ld)
        if ld and in_index:
            rec["arrays"][array]["logical_dtype"] = ld
        self.write_tensor_group(rec)

    def write_tensor_group(self, rec: dict) -> None:
        from qmoefmt import format as fmt
        (self.path / rec["path"] / "zarr.json").write_bytes(fmt.group_doc({"qmoefmt": rec}))

    def write_root(self) -> None:
        from qmoefmt import format as fmt
        (self.path / "zarr.json").write_bytes(fmt.root_doc(self.meta))


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= mask
    path.write_bytes(bytes(b))


def make_broken(ref) -> None:
    from qmoefmt import format as fmt
    from qmoefmt.dictionaries.qmoe2023 import build_qmoe2023
    from qmoefmt.dictionaries import compact
    from qmoefmt.dictionaries.tables import TABLES, stored_content_id
    from qmoefmt.testing.broken import tree_sha256, write_overlay

    src = FIX / "edge-trie.qmoe"
    whole = Path(tempfile.mkdtemp(prefix="qmoefmt-broken-"))   # whole copies; committed: overlays
    root = FIX / "broken"
    root.mkdir(parents=True, exist_ok=True)
    # sanity: re-signing an untouched store reproduces it byte for byte
    probe = Store(src)
    assert fmt.root_doc(probe.meta) == (src / "zarr.json").read_bytes()
    for rec in probe.meta["tensors"]:
        assert fmt.group_doc({"qmoefmt": rec}) == (src / rec["path"] / "zarr.json").read_bytes()

    cases: dict[str, dict] = {}

    def case(name, defect, expect, open_expect, deep_only=False, base=src):
        dst = whole / name
        shutil.copytree(base, dst)
        cases[name] = {"defect": defect, "expect": expect, "open_expect": open_expect,
                       "deep_only": deep_only, "base": base.relative_to(FIX).as_posix(),
                       "base_sha256": tree_sha256(base)}
        return Store(dst)

    odd = "edge.odd"            # [9, 77]: odd width, a few codewords per row

    s = case("root-checksum", "one byte of the root zarr.json changed (a digit of a "
             "symbol count), checksum left as it was", "checksum mismatch", "checksum mismatch")
    raw = (s.path / "zarr.json").read_bytes()
    i = raw.index(b'"symbol_counts":[') + len(b'"symbol_counts":[')
    flip(s.path / "zarr.json", i)       # a digit d becomes d^1, still valid JSON

    s = case("root-garbage", "root zarr.json replaced by bytes that are not JSON and carry "
             "no checksum", "no qmoefmt checksum field", "no qmoefmt checksum field")
    (s.path / "zarr.json").write_bytes(b"this is not json\n")

    s = case("root-not-json", "root zarr.json with its final closing braces removed (not "
             "valid JSON), self-checksum recomputed so only the JSON parse fails",
             "not a qmoefmt root group", "not a qmoefmt root group")
    raw = fmt.root_doc(s.meta)
    assert raw.endswith(b"}\n")
    raw = raw[:-2] + b"\n"
    crc = f"{fmt.crc32c(fmt.metadata._replace_checksum(raw, '00000000')):08x}"
    (s.path / "zarr.json").write_bytes(fmt.metadata._replace_checksum(raw, crc))

    s = case("unknown-major", "format_version \"2.0\", checksum recomputed",
             "format_version 2.0 has major 2", "format_version 2.0 has major 2")
    s.meta["format_version"] = "2.0"
    s.write_root()

    s = case("incomplete", "complete: false, checksum recomputed", "incomplete", "incomplete")
    s.meta["complete"] = False
    s.write_root()

    s = case("missing-chunk", f"the codes chunk of {odd} deleted", "chunk file missing",
             "chunk file missing")
    (s.path / s.record(odd)["path"] / "codes" / "c" / "0").unlink()

    s = case("truncated-chunk", f"the codes chunk of {odd} lost its last 2 bytes",
             "bytes, expected", "bytes, expected")
    p = s.path / s.record(odd)["path"] / "codes" / "c" / "0"
    p.write_bytes(p.read_bytes()[:-2])

    s = case("flipped-codes-byte", f"one bit flipped in the codes chunk of {odd}",
             "crc32c mismatch", "crc32c mismatch")
    flip(s.path / s.record(odd)["path"] / "codes" / "c" / "0", 3)

    s = case("tampered-array-meta", f"codes/zarr.json of {odd} says big-endian (valid JSON "
             "and canonical, but not what the index implies)", "array metadata differs", None)
    p = s.path / s.record(odd)["path"] / "codes" / "zarr.json"
    p.write_bytes(p.read_bytes().replace(b'"endian":"little"', b'"endian":"big"'))

    s = case("tampered-tensor-meta", f"the tensor group zarr.json of {odd} has a different "
             "source_sha256 than the root index", "tensor metadata differs", None)
    rec = json.loads(json.dumps(s.record(odd)))
    rec["source_sha256"] = "0" * 64
    s.write_tensor_group(rec)

    s = case("extra-file", "an unexpected file tensors/<odd>/notes.txt", "unexpected file", None)
    (s.path / s.record(odd)["path"] / "notes.txt").write_text("hello\n")

    s = case("partial-leftover", "a leftover temporary file codes/c/0.partial.123 in a "
             "complete store", "unexpected file", None)
    p = s.path / s.record(odd)["path"] / "codes" / "c" / "0.partial.123"
    p.write_bytes(b"\x00\x01")

    s = case("row-codes-sum", f"row_codes[0] of {odd} one larger, so they sum to "
             "len(codes) + 1; CRCs and root checksum recomputed", "row_codes sum to",
             "row_codes sum to", deep_only=True)
    rc = s.read(odd, "row_codes")
    rc[0] += 1
    s.set_tensor_array(odd, "row_codes", rc)
    s.write_root()

    # Codeword 0 is the pair (0, 0): two zero symbols, no nonzeros.
    d = build_qmoe2023()
    assert d.length[0, 0] == 2 and d.nnz[0, 0] == 0

    s = case("short-row", f"row 0 of {odd}: its first codeword (longer than 2 symbols) "
             "replaced by codeword 0 (2 zeros), so the row expands to fewer than 77 "
             "symbols; CRC recomputed", "fewer symbols than the row width",
             "fewer symbols than the row width", deep_only=True)
    codes = s.read(odd, "codes")
    assert d.length[0, codes[0]] > 2
    codes[0] = 0
    s.set_tensor_array(odd, "codes", codes)
    s.write_root()

    s = case("extra-codeword", f"row 0 of {odd}: an extra codeword 0 after its last one "
             "(row_codes[0] + 1, codes one longer); CRCs recomputed",
             "codeword starts past the end of the row",
             "codeword starts past the end of the row", deep_only=True)
    codes = s.read(odd, "codes")
    rc = s.read(odd, "row_codes")
    codes = np.insert(codes, int(rc[0]), 0)
    rc[0] += 1
    s.set_tensor_array(odd, "codes", codes)
    s.set_tensor_array(odd, "row_codes", rc)
    s.write_root()

    s = case("nonzero-padding", f"row 0 of {odd} (77 wide) coded as if it were 78 wide "
             "with symbol 1 at column 77, so its last codeword puts a nonzero in the "
             "padding; CRCs and symbol counts consistent", "padding must be zero",
             "padding must be zero", deep_only=True)
    sym78 = np.zeros((1, 78), np.int8)
    sym78[0, :77] = ref.reference_quantize(
        load_torch(str(FIX / "edge/model.safetensors"))[odd].float().numpy())[0][0]
    sym78[0, 77] = 1
    row0, _ = ref.reference_encode(sym78)
    codes = s.read(odd, "codes")
    rc = s.read(odd, "row_codes")
    codes = np.concatenate([row0, codes[int(rc[0]):]]).astype(np.uint16)
    rc[0] = row0.size
    s.set_tensor_array(odd, "codes", codes)
    s.set_tensor_array(odd, "row_codes", rc)
    s.write_root()

    s = case("non-canonical-stream", f"row 1 of {odd}: one codeword for two or more pairs "
             "split into codewords of one pair each; it decodes to the same symbols, but "
             "is not the canonical (greedy) encoding", "not the canonical encoding", None,
             deep_only=True)
    codes = s.read(odd, "codes")
    rc = s.read(odd, "row_codes")
    seqs = ref.reference_sequences()
    single = {seq[0]: c for c, seq in enumerate(seqs) if len(seq) == 1}
    start = int(rc[0])
    j = next(j for j in range(start, start + int(rc[1])) if len(seqs[codes[j]]) >= 2)
    pieces = [single[r] for r in seqs[codes[j]]]
    codes = np.concatenate([codes[:j], pieces, codes[j + 1:]]).astype(np.uint16)
    rc[1] += len(pieces) - 1
    s.set_tensor_array(odd, "codes", codes)
    s.set_tensor_array(odd, "row_codes", rc)
    s.write_root()

    s = case("symbol-counts", f"symbol_counts of {odd} move one symbol from 0 to 1 (still "
             "adding up to the element count); root and group re-signed",
             "decoded symbol counts", None, deep_only=True)
    rec = s.record(odd)
    rec["symbol_counts"] = [rec["symbol_counts"][0] - 1, rec["symbol_counts"][1] + 1,
                            rec["symbol_counts"][2]]
    s.write_tensor_group(rec)
    s.write_root()

    s = case("row-codes-dtype", f"row_codes of {odd} (77 wide) stored as uint32; spec 5.1: "
             "MUST be uint16 when cols < 65536 (readers accept either, verify must not)",
             "row_codes", None)
    rc = s.read(odd, "row_codes")
    s.set_tensor_array(odd, "row_codes", rc.astype(np.uint32))
    s.write_root()

    def redictionary(s, change) -> None:
        """Applies change(stored arrays, entry) to the store's one dictionary and re-signs
        everything that names it: CRCs, the content id, its path, every reference."""
        (entry,) = s.meta["dictionaries"]
        old_id, old_path = entry["id"], entry["path"]
        form = entry.get("form", "tables")
        order = ([n for n, _ in TABLES] if form == "tables"       # the content id's order
                 else [n for n, _, _ in compact.arrays(form, entry["n_states"])])
        stored = {}
        for name in order:
            desc = entry["arrays"][name]
            raw = (s.path / old_path / name / fmt.chunk_key(desc["shape"])).read_bytes()
            stored[name] = np.frombuffer(raw, fmt.np_dtype(desc["data_type"])).reshape(
                desc["shape"]).copy()
        change(stored, entry)
        new_id = stored_content_id(stored)
        new_path = fmt.dictionary_path(new_id)
        shutil.rmtree(s.path / old_path)
        entry["id"], entry["path"] = new_id, new_path
        entry["arrays"] = {name: s.write_array(f"{new_path}/{name}", a, None)
                           for name, a in stored.items()}
        (s.path / new_path / "zarr.json").write_bytes(fmt.group_doc({"qmoefmt": entry}))
        for rec in s.meta["tensors"]:
            if rec.get("dictionary") == old_id:
                rec["dictionary"] = new_id
                s.write_tensor_group(rec)
        s.write_root()

    def set_at(name, index, value):
        def change(stored, entry):
            stored[name][index] = value
        return change

    # Of the 1.0 store: the tables form, checked by the §5.6 validation.
    s = case("dict-next-state", "qmoe-2023 table next_state[0, 5] = 1 with S = 1 (a copy of "
             "the 1.0 store edge.qmoe); every CRC, the content id, the dictionary's path and "
             "every reference re-signed so only table validation can notice",
             "next_state >= 1", "next_state >= 1", base=FIX / "edge.qmoe")
    redictionary(s, set_at("next_state", (0, 5), 1))

    s = case("dict-trie-prefix", "qmoe-2023 trie prefix[5] = 6, a later codeword (spec 5.7.2); "
             "every CRC, the content id, the dictionary's path and every reference re-signed "
             "so only the derivation can notice", "prefix is neither", "prefix is neither")
    redictionary(s, set_at("prefix", 5, 6))

    s = case("dict-form-unknown", "the dictionary entry's form is \"zip\" (a form of a later "
             "minor version, spec 3); root and dictionary group re-signed",
             "form 'zip' is unknown", "form 'zip' is unknown")
    redictionary(s, lambda stored, entry: entry.update(form="zip"))

    s = case("scales-lo-positive", f"scales[0, 0] (lo of row 0) of {odd} set to +0.5 "
             "(bf16 0x3f00); CRC recomputed", "lo <= 0 <= hi", "lo <= 0 <= hi")
    sc = s.read(odd, "scales")
    sc[0, 0] = 0x3F00
    s.set_tensor_array(odd, "scales", sc)
    s.write_root()

    s = case("rank-9", f"the shape of {odd} in the root index is 9-D "
             "[1, 1, 1, 1, 1, 1, 1, 9, 77]; group and checksum re-signed", "rank 9",
             "rank 9")
    rec = s.record(odd)
    rec["shape"] = [1] * 7 + [9, 77]
    s.write_tensor_group(rec)
    s.write_root()

    s = case("dotdot-path", f"the path of {odd} in the root index is "
             "\"tensors/../tensors/edge.odd\"; checksum recomputed", "bad path", "bad path")
    s.record(odd)["path"] = "tensors/../tensors/edge.odd"
    s.write_root()

    s = case("dot-path", f"the path of {odd} in the root index is \"tensors/.\" (spec 4.3: "
             "one segment other than . and ..); checksum recomputed", "bad path", "bad path")
    s.record(odd)["path"] = "tensors/."
    s.write_root()

    for name, c in cases.items():
        (root / name).mkdir()
        c["removed"] = write_overlay(whole / name, FIX / c["base"], root / name)
    shutil.rmtree(whole)
    (root / "cases.json").write_text(json.dumps(cases, indent=1, sort_keys=True) + "\n")


# ------------------------------------------------------------------ format 1.1

def reference_kbit(w: np.ndarray, bits: int, group: int):
    """Spec section 12's min-max grid in plain numpy, float32 throughout."""
    rows, cols = w.shape
    maxq = np.float32((1 << bits) - 1)
    groups = -(-cols // group)              # 0 groups for 0 columns
    q = np.zeros((rows, cols), np.uint8)
    scales = np.zeros((rows, groups), np.float32)
    zeros = np.zeros((rows, groups), np.uint8)
    for g in range(groups):
        x = w[:, g * group:(g + 1) * group].astype(np.float32)
        if x.shape[1] == 0:
            xmin = xmax = np.zeros(rows, np.float32)
        else:
            xmin = np.minimum(x.min(axis=1), np.float32(0))
            xmax = np.maximum(x.max(axis=1), np.float32(0))
        sc = ((xmax - xmin) / maxq).astype(np.float32)
        sc = np.where((xmin == 0) & (xmax == 0), np.float32(1), sc)
        sc = sc.astype(ml_dtypes.bfloat16).astype(np.float32)
        z = np.clip(np.round(-xmin / sc), 0, maxq).astype(np.float32)
        qq = np.clip(np.round(x / sc[:, None]) + z[:, None], 0, maxq)
        q[:, g * group:(g + 1) * group] = qq.astype(np.uint8)
        scales[:, g] = sc
        zeros[:, g] = z.astype(np.uint8)
    gi = np.arange(cols) // group
    values = (scales[:, gi] * (q.astype(np.float32) - zeros[:, gi].astype(np.float32))).astype(np.float32)
    return q, scales, zeros, values


def make_conformance_uint() -> None:
    """Levels and values of every uint-packed tensor, from reference_kbit, and the sha256 of
    the packed q bytes each store must hold."""
    from qmoefmt.codecs import uint_packed as uintpack
    out = FIX / "conformance-uint"
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"description": "Expected levels/values (plain-numpy grid of spec section 12 "
                               "on the source checkpoint) and packed q bytes of every "
                               "qmoe.uint-packed tensor of the 1.1 fixture stores.", "stores": {}}
    mismatches = []
    for store_name, ckpt in sorted(uint_stores().items()):
        store = FIX / store_name
        source = load_torch(str(FIX / ckpt))
        meta = store_root(store)
        vectors, entries = {}, {}
        for rec in meta["tensors"]:
            if rec["codec"] != "qmoe.uint-packed":
                continue
            name = rec["name"]
            w = source[name].float().numpy()
            shape = tuple(w.shape)
            rows, cols = rows_cols(shape)
            q, scales, zeros, values = reference_kbit(w.reshape(rows, cols), rec["bits"],
                                                      rec["group_size"])
            vectors[f"{name}/levels"] = np.require(q.reshape(shape), requirements="C")
            vectors[f"{name}/values"] = np.require(values.reshape(shape), requirements="C")
            packed = uintpack.pack_levels(q, rec["bits"])
            entry = {"shape": list(shape), "bits": rec["bits"], "group_size": rec["group_size"],
                     "q_sha256": sha256(packed), "zeros_sha256": sha256(zeros),
                     "scales_sha256": sha256((scales.view(np.uint32) >> 16).astype("<u2"))}
            entries[name] = entry
            got = {"q_sha256": sha256(read_chunk(store, rec, "q")),
                   "zeros_sha256": sha256(read_chunk(store, rec, "zeros")),
                   "scales_sha256": sha256(read_chunk(store, rec, "scales"))}
            for k, v in got.items():
                if entry[k] != v:
                    mismatches.append(f"{store_name}: {name}: {k} differs from the reference")
        manifest["stores"][store_name] = {"vectors": save_vectors(out, store_name, vectors),
                                          "checkpoint": ckpt, "tensors": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if mismatches:
        sys.exit("the packer disagrees with the reference grid:\n" + "\n".join(mismatches))


# ------------------------------------------------------------------ format 1.2

def reference_escapes(q: np.ndarray, zeros: np.ndarray, group: int):
    """Spec section 13's split, one level at a time: signs, and the far levels per row."""
    rows, cols = q.shape
    signs = np.zeros((rows, cols), np.uint8)
    counts, ecols, elevels = [], [], []
    for r in range(rows):
        n = 0
        for c in range(cols):
            d = int(q[r, c]) - int(zeros[r, c // group])
            signs[r, c] = 0 if d == 0 else (1 if d < 0 else 2)
            if abs(d) >= 2:
                n += 1
                ecols.append(c)
                elevels.append(int(q[r, c]))
        counts.append(n)
    idx = "<u2" if cols < 65536 else "<u4"
    return (signs, np.array(counts, idx), np.array(ecols, idx), np.array(elevels, np.uint8))


def make_conformance_uint_dict(ref) -> None:
    """Per qmoe.uint-dict16 tensor: expected levels and values (reference_kbit), the
    expected escape arrays and sign counts (reference_escapes), and the expected codeword
    stream: from the independent QMoE reference encoder for qmoe-2023, else the store's."""
    out = FIX / "conformance-uint-dict"
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"description": "Expected levels/values (plain-numpy grid of spec section 12), "
                               "escapes and sign streams (spec section 13) of every "
                               "qmoe.uint-dict16 tensor of the 1.2 and 1.4 fixture stores; "
                               "stream_source says where each codeword stream's hash "
                               "comes from.", "stores": {}}
    mismatches = []
    for store_name, ckpt in sorted(uint_dict_stores().items()):
        store = FIX / store_name
        source = load_torch(str(FIX / ckpt))
        meta = store_root(store)
        vectors, entries = {}, {}
        for rec in meta["tensors"]:
            if rec["codec"] != "qmoe.uint-dict16":
                continue
            name = rec["name"]
            w = source[name].float().numpy()
            shape = tuple(w.shape)
            rows, cols = rows_cols(shape)
            q, scales, zeros, values = reference_kbit(w.reshape(rows, cols), rec["bits"],
                                                      rec["group_size"])
            signs, counts, ecols, elevels = reference_escapes(q, zeros, rec["group_size"])
            vectors[f"{name}/levels"] = np.require(q.reshape(shape), requirements="C")
            vectors[f"{name}/values"] = np.require(values.reshape(shape), requirements="C")
            kind = next(d for d in meta["dictionaries"] if d["id"] == rec["dictionary"])["kind"]
            if kind == "qmoe-2023":
                codes, row_codes = ref.reference_encode(signs)
                stream_source = "reference-encoder"
            else:
                codes, row_codes = read_chunk(store, rec, "codes"), read_chunk(store, rec, "row_codes")
                stream_source = "store"
            entry = {"shape": list(shape), "bits": rec["bits"], "group_size": rec["group_size"],
                     "dictionary_kind": kind, "stream_source": stream_source,
                     "symbol_counts": [int((signs == s).sum()) for s in range(3)],
                     "codes_sha256": sha256(np.asarray(codes).astype("<u2")),
                     "row_codes_sha256": sha256(np.asarray(row_codes).astype(counts.dtype)),
                     "row_escapes_sha256": sha256(counts), "escape_cols_sha256": sha256(ecols),
                     "escape_levels_sha256": sha256(elevels), "n_escapes": int(len(ecols)),
                     "zeros_sha256": sha256(zeros),
                     "scales_sha256": sha256((scales.view(np.uint32) >> 16).astype("<u2"))}
            entries[name] = entry
            got = {k: sha256(read_chunk(store, rec, a)) for k, a in [
                ("codes_sha256", "codes"), ("row_codes_sha256", "row_codes"),
                ("row_escapes_sha256", "row_escapes"), ("escape_cols_sha256", "escape_cols"),
                ("escape_levels_sha256", "escape_levels"), ("zeros_sha256", "zeros"),
                ("scales_sha256", "scales")]}
            got["symbol_counts"] = rec["symbol_counts"]
            for k, v in got.items():
                if entry[k] != v:
                    mismatches.append(f"{store_name}: {name}: {k} differs from the reference")
        manifest["stores"][store_name] = {"vectors": save_vectors(out, store_name, vectors),
                                          "checkpoint": ckpt, "tensors": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if mismatches:
        sys.exit("the packer disagrees with the reference:\n" + "\n".join(mismatches))


# ------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="delete and regenerate existing outputs")
    ap.add_argument("--only", nargs="+", choices=OUTPUTS, help="generate only these outputs")
    args = ap.parse_args()
    existing = [o for o in (args.only or OUTPUTS) if (FIX / o).exists()]
    if existing and not args.force:
        sys.exit(f"refusing to overwrite existing fixtures ({', '.join(existing)}); "
                 "they are committed conformance vectors. Use --force to regenerate.")
    for o in existing:
        shutil.rmtree(FIX / o)
    ref = _reference()
    todo = set(args.only or OUTPUTS)
    if "switch-tiny" in todo:
        make_switch_tiny(FIX / "switch-tiny" / "model.safetensors")
    if "edge" in todo:
        make_edge(FIX / "edge" / "model.safetensors")
    if "rank" in todo:
        make_rank(FIX / "rank" / "model.safetensors")
    for store in RANK_STORES:
        if store in todo:
            pack_rank(store)
            check_store(store)
    for store in [*STORES, *UINT_STORES, *UINT_DICT_STORES]:
        if store in todo:
            pack(store)
            check_store(store)
    if "conformance" in todo:
        make_conformance(ref)
    if "broken" in todo:
        make_broken(ref)
    if "conformance-uint" in todo:
        make_conformance_uint()
    if "conformance-uint-dict" in todo:
        make_conformance_uint_dict(ref)
    print("done")


if __name__ == "__main__":
    main()
