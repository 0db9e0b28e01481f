"""Compact dictionaries (spec §5.7, format 1.4): the stored trees and tries derive exactly
the dictionaries they stand for, a reader refuses every malformed one, the tables form of
earlier stores is still what the constructions give, and `--dictionary auto` counts a
dictionary's bytes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import qmoefmt
from qmoefmt import codecs
from qmoefmt.dictionaries import canonical, choice, compact, stream
from qmoefmt.dictionaries.golomb import build_golomb
from qmoefmt.dictionaries.qmoe2023 import build_qmoe2023
from qmoefmt.dictionaries.tables import TABLES, Dictionary
from qmoefmt.errors import FormatError
from qmoefmt.format import constants as C
from qmoefmt.pack import PackOptions, pack
from qmoefmt.store.verify import verify
from qmoefmt.store.writer import StoreWriter
from qmoefmt.testing import qmoe_reference

GOLOMB_P0 = (0.3208, 0.8808, 0.9707)        # K = 10, 4, 3; S = 2, 4, 7


def entries(d: Dictionary, s: int) -> list:
    return sorted(zip(d.length[s].tolist(), d.next_state[s].tolist(),
                      map(tuple, d.nz_pos[s].tolist()), map(tuple, d.nz_sym[s].tolist())))


# ------------------------------------------------------------------ the forms

def spec_derive_tree(row: np.ndarray, k: int, s: int) -> list[tuple]:
    """§5.7.1's procedure as the spec writes it, in plain Python: the entries of state s."""
    bits = np.unpackbits(row)
    out, i, stack = [], 0, [(s, 0, ())]
    while stack:
        t, length, nz = stack.pop()
        assert i < compact.TREE_BITS
        b = int(bits[i])
        i += 1
        if b == 0:
            out.append((length, t, nz))
            continue
        kids = []
        for branch in (1, 0):
            if t == 0:
                kids.append((0, length + (1 << k), nz) if branch else ((1 if k else k + 1), length, nz))
            elif t <= k:
                kids.append((t + 1, length + (branch << (k - t)), nz))
            else:
                kids.append((0, length + 1, nz + ((length, branch + 1),)))
        stack += kids
    assert len(out) == C.CODEWORDS and bits[compact.TREE_BITS] == 0
    return out


def test_tree_derivation_is_the_spec_procedure():
    d = build_golomb(0.8808)
    k = d.params["k"]
    for s in range(d.n_states):
        want = spec_derive_tree(d.stored["tree"][s], k, s)
        for c in (0, 1, 777, 40000, C.CODEWORDS - 1):
            length, nxt, nz = want[c]
            assert (d.length[s, c], d.next_state[s, c], d.nnz[s, c]) == (length, nxt, len(nz))
            assert [(int(p), int(y)) for p, y in zip(d.nz_pos[s, c], d.nz_sym[s, c])][:len(nz)] == list(nz)


@pytest.mark.parametrize("p0", GOLOMB_P0)
def test_tree_is_the_dictionary(p0):
    """The tree form derives exactly the stored dictionary, whose entries are those of the
    tables form (probability order, the 1.0-1.3 stores' numbering), renumbered."""
    d = build_golomb(p0)
    assert d.form == "tree" and d.stored["tree"].shape == (d.n_states, 16384)
    tables, problem = compact.derive("tree", d.stored, d.n_states, d.max_nnz)
    assert problem is None
    for name, _ in TABLES:
        assert np.array_equal(tables[name], getattr(d, name)), name
    old = build_golomb(p0, form="tables")
    assert old.form == "tables" and old.max_nnz == d.max_nnz
    for s in range(d.n_states):
        assert entries(d, s) == entries(old, s)
    assert d.stored_nbytes == d.n_states * 16384
    assert d.content_id != old.content_id


def test_tables_form_reproduces_the_1_0_dictionaries():
    """The content ids the 1.0 fixture switch-tiny.qmoe held (4.5 MB of tables each)."""
    want = {(0.7311, 1): "sha256:18731d3bca6e192d40cb4174179fb429685c79b4fb54d459f69a9b445e4c17d5",
            (0.8176, 2): "sha256:748e6dcefc1b18069312d576a04d4fa9a331833c1d4b189ccd341b2d9e4588d6"}
    for (p0, k), cid in want.items():
        assert build_golomb(p0, k, form="tables").content_id == cid


def test_trie_is_qmoe2023():
    d, old = build_qmoe2023(), build_qmoe2023("tables")
    assert d.form == "trie" and d.stored_nbytes == 3 * C.CODEWORDS
    for name, _ in TABLES:
        assert np.array_equal(getattr(d, name), getattr(old, name)), name
    assert d.content_id == qmoe_reference.reference_content_id("trie")
    assert old.content_id == qmoe_reference.reference_content_id("tables")
    ref = qmoe_reference.reference_trie_arrays()
    assert all(np.array_equal(d.stored[n], ref[n]) for n in ("prefix", "pair"))


# ------------------------------------------------------------------ refusing bad forms

def derive_problem(form, stored, n_states, max_nnz):
    tables, problem = compact.derive(form, stored, n_states, max_nnz)
    assert tables is None
    return problem


@pytest.fixture(scope="module")
def tree():
    d = build_golomb(0.8808)
    return d.stored["tree"], d.n_states, d.max_nnz


def test_tree_refusals(tree):
    good, s, k = tree

    def bad(edit, n_states=s, max_nnz=k):
        t = good.copy()
        edit(t)
        return derive_problem("tree", {"tree": t}, n_states, max_nnz)

    def clear_last_one(t):          # the last internal node becomes a leaf: one leaf short
        bits = np.unpackbits(t[1])
        bits[np.flatnonzero(bits)[-1]] = 0
        t[1] = np.packbits(bits)

    assert "the bit after its tree" in bad(lambda t: t.__setitem__((0, -1), t[0, -1] | 1))
    assert "fewer than 65536" in bad(clear_last_one)
    # the last leaf (bit 131070) made an internal node: its children need bits past the end
    assert "more than 65536" in bad(lambda t: t.__setitem__((2, -1), t[2, -1] | 2))
    assert "length 0" in bad(lambda t: t.__setitem__((0, 0), t[0, 0] & 0x3F))   # root's 0-child a leaf
    assert "more nonzeros" in bad(lambda t: None, max_nnz=k - 1)
    assert "largest nnz" in bad(lambda t: None, max_nnz=k + 1)
    assert "states" in derive_problem("tree", {"tree": np.zeros((15, 16384), np.uint8)}, 15, 3)
    assert "states" in derive_problem("tree", {"tree": good[:1]}, 1, k)


def test_tree_refuses_a_chain_of_internal_nodes():
    """Preorder walks branch 0 first, and every branch-0 path reaches Sg within k + 2
    decisions: a chain of 1 bits piles up nonzeros and stops at K (so the walk's depth
    stays below (K + 1) * (k + 2), far inside its arrays)."""
    t = np.full((14, 16384), 0xFF, np.uint8)
    t[:, -1] = 0xFE
    assert "more nonzeros" in derive_problem("tree", {"tree": t}, 14, 32)


def test_trie_refusals():
    good = build_qmoe2023().stored

    def bad(name, index, value, max_nnz=3):
        stored = {n: a.copy() for n, a in good.items()}
        stored[name][index] = value
        return derive_problem("trie", stored, 1, max_nnz)

    assert "prefix is neither" in bad("prefix", 5, 6)
    assert "pair is not below 9" in bad("pair", 0, 9)
    assert "more nonzeros" in bad("pair", 0, 0, max_nnz=2)
    assert "states" in derive_problem("trie", good, 2, 3)


def write_store(path, d: Dictionary, symbols: np.ndarray, logical_dtypes: bool = True) -> None:
    """A one-tensor store written through the writer with dictionary d as it is;
    `logical_dtypes=False`: its index as a writer before 1.5 wrote it, without the scales'
    logical dtype (spec §4.5), so that the version it declares is the dictionary's."""
    meta = {"writer": {"name": "test", "version": "0"}, "pack": {"experts": ["e.*"]},
            "plan": {"tensors": 1, "sha256": "0" * 64},
            "source": {"format": "safetensors", "name": "m.safetensors"}}
    w = StoreWriter(path, meta)
    rows, cols = symbols.shape
    counts = np.bincount(symbols.reshape(-1), minlength=3)[:3].astype(np.int64)
    scales = np.tile(np.array([0xBF80, 0x3F80], np.uint16), (rows, 1))
    unit = codecs.get(C.CODEC_TERNARY)
    members, arrays = unit.encode(symbols, scales, counts, d)
    from qmoefmt.store.writer import write_arrays
    record = {"name": "e.w", "path": "tensors/e.w", "shape": [rows, cols], "dtype": "bfloat16",
              "source_sha256": "0" * 64, **members, "dictionary": w.add_dictionary(d),
              "quantizer": {"method": "rtn", "grid": "qmoe-ternary"}}
    record["arrays"] = write_arrays(w.root, record["path"], arrays)
    if not logical_dtypes:
        for desc in record["arrays"].values():
            desc.pop("logical_dtype", None)
    w.finish_tensor(record)
    w.commit([record])


def test_reader_refuses_a_tampered_tree_whatever_its_hash(tmp_path):
    good = build_golomb(0.8808)
    tree = good.stored["tree"].copy()
    tree[0, -1] |= 1                         # the padding bit: content id and CRC re-signed
    bad = Dictionary(kind=good.kind, params=good.params, form="tree", stored={"tree": tree},
                     encoder=good.encoder, **good.tables())
    rng = np.random.default_rng(1)
    write_store(tmp_path / "s", bad, rng.choice(3, (4, 64), p=[0.88, 0.06, 0.06]).astype(np.int8))
    st = qmoefmt.open(tmp_path / "s")
    with pytest.raises(FormatError, match="the bit after its tree is not 0"):
        st["e.w"].decode()
    assert any("the bit after its tree" in p.what for p in verify(tmp_path / "s"))


def test_reader_refuses_a_compact_form_of_the_wrong_kind(tmp_path):
    rng = np.random.default_rng(2)
    write_store(tmp_path / "s", build_golomb(0.8808),
                rng.choice(3, (4, 64), p=[0.88, 0.06, 0.06]).astype(np.int8))
    from qmoefmt import format as fmt
    root = tmp_path / "s" / "zarr.json"
    meta = json.loads(root.read_bytes())["attributes"]["qmoefmt"]
    meta["dictionaries"][0]["kind"] = "qmoe-2023"
    root.write_bytes(fmt.root_doc(meta))
    with pytest.raises(FormatError, match="form 'tree' is for kind 'golomb-v2f'"):
        qmoefmt.open(tmp_path / "s")["e.w"].decode()


# ------------------------------------------------------------------ versions

def test_tables_form_store_declares_1_0_and_verifies_deep(tmp_path):
    """A store whose golomb-v2f dictionary is the tables form (and whose index records no
    logical dtypes, as before 1.5) is what a 1.0 writer wrote: it declares 1.0, opens, and
    verify --deep re-encodes it canonically (probability numbering), as for the 1.0
    fixtures made before 1.4."""
    d = build_golomb(0.8808, form="tables")
    rng = np.random.default_rng(3)
    sym = rng.choice(3, (8, 200), p=[0.88, 0.06, 0.06]).astype(np.int8)
    write_store(tmp_path / "s", d, sym, logical_dtypes=False)
    st = qmoefmt.open(tmp_path / "s")
    assert st.format_version == "1.0"
    assert "form" not in st.dictionary_entries[d.content_id]
    assert set(st.dictionary_entries[d.content_id]["arrays"]) == {n for n, _ in TABLES}
    assert np.array_equal(st["e.w"].symbols(), sym)
    assert verify(tmp_path / "s", deep=True) == []


def test_compact_store_declares_1_4(tmp_path):
    d = build_golomb(0.8808)
    rng = np.random.default_rng(4)
    sym = rng.choice(3, (8, 200), p=[0.88, 0.06, 0.06]).astype(np.int8)
    write_store(tmp_path / "s", d, sym, logical_dtypes=False)
    st = qmoefmt.open(tmp_path / "s")
    assert st.format_version == "1.4"
    entry = st.dictionary_entries[d.content_id]
    assert entry["form"] == "tree" and set(entry["arrays"]) == {"tree"}
    assert np.array_equal(st["e.w"].symbols(), sym)
    assert verify(tmp_path / "s", deep=True) == []
    # declaring 1.3 hides the compact dictionary from 1.3 readers: verify says so
    from qmoefmt import format as fmt
    root = tmp_path / "s" / "zarr.json"
    meta = json.loads(root.read_bytes())["attributes"]["qmoefmt"]
    meta["format_version"] = "1.3"
    root.write_bytes(fmt.root_doc(meta))
    assert any("compact dictionaries" in p.what for p in verify(tmp_path / "s"))


def test_canonical_follows_the_form():
    assert canonical("golomb-v2f", {"p_zero": 0.8808, "k": 2}).form == "tables"
    assert canonical("golomb-v2f", {"p_zero": 0.8808, "k": 2}, "tree").form == "tree"
    assert canonical("qmoe-2023", {}, "trie").content_id == build_qmoe2023().content_id


# ------------------------------------------------------------------ choosing by bytes

@pytest.mark.parametrize("p0", (0.8, 0.885, 0.93))
def test_qmoe2023_rate_estimate_is_what_it_codes(p0):
    rng = np.random.default_rng(5)
    sym = rng.choice(3, (16, 20000), p=[p0, (1 - p0) / 2, (1 - p0) / 2]).astype(np.int8)
    codes, _ = stream.encode(sym, build_qmoe2023())
    measured = 16 * codes.size / sym.size
    assert abs(choice.qmoe2023_rate(np.array([p0, (1 - p0) / 2, (1 - p0) / 2])) / measured - 1) < 0.01


def test_choice_counts_the_dictionary_bytes():
    counts = np.array([88_000, 6_000, 6_000])
    golomb = ("golomb-v2f", 0.8808)
    assert choice.choose(counts, [], 10**7) == golomb
    # a held dictionary a little off: reused for a small rest of the pack, not a large one
    held = [("golomb-v2f", 0.8176)]
    assert choice.choose(counts, held, 10**5) == held[0]
    assert choice.choose(counts, held, 10**9) == golomb
    # qmoe-2023 costs more bytes than a fitted golomb-v2f and codes worse: never new
    assert choice.choose(counts, [], 0) == golomb
    # but a held qmoe-2023 beats adding a dictionary for a few weights
    assert choice.choose(counts, [("qmoe-2023", None)], 10**4) == ("qmoe-2023", None)


def test_auto_shares_one_dictionary_on_a_small_model(tmp_path):
    rng = np.random.default_rng(6)
    t = {f"e.{i}": torch.from_numpy((rng.standard_normal((64, 128)) * (0.02 + 0.01 * i))
                                    .astype(np.float32)).to(torch.bfloat16) for i in range(4)}
    t["e.3"] = torch.from_numpy(rng.standard_t(2.5, (64, 128)).astype(np.float32)).to(torch.bfloat16)
    save_file(t, str(tmp_path / "m.safetensors"))
    pack(tmp_path / "m.safetensors", tmp_path / "s.qmoe", PackOptions(experts=("e.*",)))
    st = qmoefmt.open(tmp_path / "s.qmoe")
    assert st.format_version == "1.5"          # the scales' logical dtypes (spec §4.5)
    assert len(st.dictionary_entries) == 1
    assert verify(tmp_path / "s.qmoe", deep=True) == []
