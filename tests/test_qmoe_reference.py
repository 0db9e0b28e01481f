"""The library's `qmoe-2023` dictionary and encoder against the independent reference in
qmoefmt.testing.qmoe_reference (tables entry by entry, the trie, codeword streams over
widths and sparsities), and the reference quantizer's bf16 rounding against spec §1."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from qmoefmt.testing.qmoe_reference import (
    CODEWORDS,
    MAX_PAIRS,
    P_NONZERO,
    bf16_bits_reference,
    reference_content_id,
    reference_encode,
    reference_sequences,
    reference_tables,
    sequences_for,
)


def _library():
    from qmoefmt.dictionaries.stream import encode
    from qmoefmt.dictionaries.qmoe2023 import build_qmoe2023
    return encode, build_qmoe2023()


def test_tables_agree_entry_by_entry():
    from qmoefmt.dictionaries.qmoe2023 import build_qmoe2023
    _, d = _library()
    ref = reference_tables()
    assert d.kind == "qmoe-2023"
    assert d.n_states == 1
    assert d.max_nnz == ref["nz_pos"].shape[2] == 3
    for name in ("length", "next_state", "nnz", "nz_pos", "nz_sym"):
        got, want = getattr(d, name), ref[name]
        assert got.shape == want.shape, name
        bad = np.argwhere(got != want)
        assert bad.size == 0, f"{name} differs first at {bad[0].tolist()}"
    assert d.content_id == reference_content_id("trie")      # as 1.4 stores hold it
    assert build_qmoe2023("tables").content_id == reference_content_id()   # as 1.0-1.3 did


def test_library_trie_agrees_with_reference():
    _, d = _library()
    trie = d.encoder
    for code, seq in enumerate(reference_sequences()):
        node = CODEWORDS                 # walk from the root through the library's trie
        for r in seq:
            node = trie[node, r]
            assert node >= 0
        assert node == code
    # nothing but the dictionary's sequences is in the library's trie
    assert int((trie >= 0).sum()) == CODEWORDS


def test_dictionary_shape_facts():
    seqs = reference_sequences()
    assert len(seqs) == len(set(seqs)) == CODEWORDS
    assert seqs[0] == (0,)                         # the all-zero pair is the likeliest
    assert max(len(s) for s in seqs) == MAX_PAIRS
    assert all((r,) in set(seqs) for r in range(9))  # every single pair is a codeword
    assert (0,) * MAX_PAIRS in set(seqs)           # 28 zeros in one codeword


def test_literal_0575_is_not_qmoe():
    """0.0575 typed as a literal is not (1 - 0.885) / 2 in binary64, and the tie-breaks
    then differ: an implementer must compute it as QMoE does."""
    assert 0.0575 != P_NONZERO
    literal = sequences_for(0.0575)
    assert literal != reference_sequences()


def _random_symbols(rng, rows, cols, p0):
    sym = rng.choice(3, size=(rows, cols), p=[p0, (1 - p0) / 2, (1 - p0) / 2])
    return sym.astype(np.int8)


SWITCH_WIDTHS = (768, 1024, 2080, 3072, 4096, 6144)


@pytest.mark.parametrize("p0", [0.5, 0.8, 0.885, 0.93, 0.97, 0.999])
def test_streams_switch_widths(p0):
    encode, d = _library()
    rng = np.random.default_rng(int(p0 * 1000))
    for cols in SWITCH_WIDTHS:
        sym = _random_symbols(rng, 2, cols, p0)
        codes, rc = encode(sym, d)
        rcodes, rrc = reference_encode(sym)
        assert rc.dtype == rrc.dtype == np.uint16
        assert np.array_equal(rc, rrc), (cols, p0)
        assert np.array_equal(codes, rcodes), (cols, p0)


@pytest.mark.parametrize("cols", [0, 1, 2, 3, 5, 27, 28, 29, 30, 77, 301])
def test_streams_small_and_odd_widths(cols):
    encode, d = _library()
    rng = np.random.default_rng(cols)
    for p0 in (0.0, 0.6, 0.885, 0.99, 1.0):
        sym = _random_symbols(rng, 5, cols, p0) if p0 < 1 else np.zeros((5, cols), np.int8)
        codes, rc = encode(sym, d)
        rcodes, rrc = reference_encode(sym)
        assert np.array_equal(rc, rrc) and rc.dtype == rrc.dtype
        assert np.array_equal(codes, rcodes)


def test_streams_structured_rows():
    """Long zero runs (longer than any codeword), all-nonzero rows, zero rows, runs that
    end exactly at a codeword boundary."""
    encode, d = _library()
    rows = [
        [0] * 1000,
        [1] * 999,
        [2, 1] * 300,
        [0] * 28 + [1] + [0] * 28 + [2],
        [0] * 27 + [1] + [0] * 55,
        ([0] * 13 + [2]) * 40,
        [1] + [0] * 2000 + [2],
    ]
    for row in rows:
        sym = np.array([row], np.int8)
        codes, rc = encode(sym, d)
        rcodes, rrc = reference_encode(sym)
        assert np.array_equal(codes, rcodes), row[:40]
        assert np.array_equal(rc, rrc)


def test_stream_wide_row_uint32_row_codes():
    encode, d = _library()
    rng = np.random.default_rng(7)
    sym = _random_symbols(rng, 1, 70001, 0.9)
    codes, rc = encode(sym, d)
    rcodes, rrc = reference_encode(sym)
    assert rc.dtype == rrc.dtype == np.uint32
    assert np.array_equal(rc, rrc) and np.array_equal(codes, rcodes)


def test_reference_quantizer_rounding_matches_spec_formula():
    rng = np.random.default_rng(3)
    x = np.concatenate([
        rng.standard_normal(10000).astype(np.float32) * 0.03,
        rng.integers(0, 2**32, 10000, dtype=np.uint64).astype(np.uint32).view(np.float32),
    ])
    x = x[np.isfinite(x)]
    assert np.array_equal(x.astype(ml_dtypes.bfloat16).view(np.uint16), bf16_bits_reference(x))
