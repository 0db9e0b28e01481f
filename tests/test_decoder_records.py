"""The decoder's bit-packed runtime records, on dictionaries whose entries do not fit one
64-bit word (long entries, many nonzeros): same result as a decoder written from spec
§5.2 line by line."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qmoefmt.dictionaries import stream as codec
from qmoefmt.dictionaries.tables import CODEWORDS, Dictionary


def random_dictionary(rng, n_states: int, k: int, max_len: int) -> Dictionary:
    length = rng.integers(1, max_len + 1, (n_states, CODEWORDS)).astype(np.uint16)
    nnz = np.minimum(rng.integers(0, k + 1, (n_states, CODEWORDS)), length).astype(np.uint8)
    pos = np.zeros((n_states, CODEWORDS, k), np.uint16)
    sym = np.zeros((n_states, CODEWORDS, k), np.uint8)
    for s in range(n_states):
        for c in rng.choice(CODEWORDS, 300, replace=False):     # a sample carries nonzeros
            m = int(nnz[s, c])
            pos[s, c, :m] = np.sort(rng.choice(int(length[s, c]), m, replace=False))
            sym[s, c, :m] = rng.integers(1, 3, m)
    nnz = (sym > 0).sum(axis=2).astype(np.uint8)
    nxt = rng.integers(0, n_states, (n_states, CODEWORDS)).astype(np.uint8)
    d = Dictionary(kind="test", params={}, length=length, next_state=nxt, nnz=nnz, nz_pos=pos,
                   nz_sym=sym)
    d.validate()
    return d


def spec_decode(codes, row_codes, cols, d):
    out = np.zeros((len(row_codes), cols), np.int8)
    o = 0
    for r, n in enumerate(row_codes):
        state, p = 0, 0
        for c in codes[o:o + n]:
            assert p < cols
            for i in range(d.nnz[state, c]):
                out[r, p + d.nz_pos[state, c, i]] = d.nz_sym[state, c, i]
            p += int(d.length[state, c])
            state = d.next_state[state, c]
        assert p >= cols
        o += n
    return out


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.sampled_from([3, 7, 12, 20]),
       max_len=st.sampled_from([40, 3000, 65535]), n_states=st.integers(1, 3))
def test_multiword_records_decode_as_the_spec_says(seed, k, max_len, n_states):
    rng = np.random.default_rng(seed)
    d = random_dictionary(rng, n_states, k, max_len)
    rec, lb, kb, s0, sp = d.runtime_records()
    if max_len == 65535 and k >= 7:
        assert rec.shape[1] > 1            # the case this test is for
    # rows of codewords chosen so that each row is exactly covered, padding zero
    cols = 5000
    codes, row_codes = [], []
    for _ in range(4):
        state, p, n = 0, 0, 0
        while p < cols:
            c = int(rng.integers(0, CODEWORDS))
            tail_nz = [int(x) for x in d.nz_pos[state, c, :d.nnz[state, c]] if p + int(x) >= cols]
            if tail_nz:
                continue                    # keep the padding past the row zero
            codes.append(c)
            p += int(d.length[state, c])
            state = int(d.next_state[state, c])
            n += 1
        row_codes.append(n)
    codes = np.array(codes, np.uint16)
    row_codes = np.array(row_codes, np.uint16)
    expect = spec_decode(codes, row_codes, cols, d)
    assert np.array_equal(codec.decode_symbols(codes, row_codes, cols, d), expect)
    lo = np.full(4, -0.5, np.float32)
    hi = np.full(4, 0.25, np.float32)
    vals = codec.decode_values(codes, row_codes, cols, d, lo, hi)
    assert np.array_equal(vals, np.where(expect == 1, -0.5, np.where(expect == 2, 0.25, 0)).astype(np.float32))
