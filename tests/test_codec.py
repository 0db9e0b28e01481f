"""Codec `qmoe.ternary-dict16` (qmoefmt/codec.py), its dictionaries and the RTN ternary
quantizer: round trips for both dictionary kinds, the row_codes dtype rule, rates, table
validation, decoder errors on bad streams, and the quantizer against a numpy reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qmoefmt.dictionaries.stream import decode_symbols, decode_values, encode
from qmoefmt.dictionaries.golomb import build_golomb, ladder_point
from qmoefmt.dictionaries.qmoe2023 import build_qmoe2023
from qmoefmt.dictionaries.tables import validate_tables
from qmoefmt.errors import FormatError
from qmoefmt.errors import NonFiniteError
from qmoefmt.format import bf16
from qmoefmt.quantize.rtn import quantize_rtn
from qmoefmt.testing.qmoe_reference import reference_quantize, reference_sequences

# build_golomb takes 1-2 s per dictionary (lru_cached, 8 slots): a small fixed set.
GOLOMB_P0 = (0.7549, 0.8808, 0.9707)
KINDS = ("qmoe-2023",) + tuple(f"golomb-{p}" for p in GOLOMB_P0)

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def dictionary(kind: str):
    if kind == "qmoe-2023":
        return build_qmoe2023()
    return build_golomb(float(kind.split("-")[1]))


def iid_symbols(rng, rows, cols, p0, lo_share=0.5):
    p = [p0, (1 - p0) * lo_share, (1 - p0) * (1 - lo_share)]
    return rng.choice(3, size=(rows, cols), p=p).astype(np.int8)


@st.composite
def symbol_matrices(draw, max_rows=6):
    rows = draw(st.integers(0, max_rows))
    cols = draw(st.sampled_from([0, 1, 2, 3, 5, 7, 27, 28, 29, 77, 255, 256, 257, 768, 1025])
                | st.integers(0, 700))
    p0 = draw(st.sampled_from([0.0, 0.3, 0.5, 0.75, 0.885, 0.95, 0.99, 0.999, 1.0])
              | st.floats(0.0, 1.0))
    lo_share = draw(st.sampled_from([0.5, 0.0, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sym = iid_symbols(rng, rows, cols, p0, lo_share)
    if rows:
        zero_rows = draw(st.lists(st.integers(0, rows - 1), max_size=rows))
        sym[zero_rows] = 0
    return sym


def random_scales(rng, rows):
    lo = -np.abs(rng.standard_normal(rows)).astype(np.float32) * 0.1
    hi = np.abs(rng.standard_normal(rows)).astype(np.float32) * 0.1
    lo[::3] = 0.0
    # make them exact bf16 values, as stored scales are
    bits = lambda x: (x.view(np.uint32) >> 16 << 16).view(np.float32)  # noqa: E731
    return bits(lo), bits(hi)


def check_round_trip(sym: np.ndarray, d, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = sym.shape
    codes, rc = encode(sym, d)
    assert codes.dtype == np.uint16 and codes.ndim == 1
    assert rc.shape == (rows,)
    assert rc.dtype == (np.uint16 if cols < 65536 else np.uint32)
    assert int(rc.astype(np.int64).sum()) == codes.size
    assert (rc.astype(np.int64) <= cols).all()
    if cols == 0:
        assert codes.size == 0
    elif rows:
        assert (rc > 0).all()
    got = decode_symbols(codes, rc, cols, d)
    assert got.dtype == np.int8 and got.shape == (rows, cols)
    assert np.array_equal(got, sym)
    lo, hi = random_scales(np.random.default_rng(seed), rows)
    vals = decode_values(codes, rc, cols, d, lo, hi)
    want = np.where(sym == 1, lo[:, None], np.where(sym == 2, hi[:, None], np.float32(0)))
    assert vals.dtype == np.float32
    assert np.array_equal(vals.view(np.uint32), want.astype(np.float32).view(np.uint32))
    # encoding is a function of the symbols: the decoded symbols re-encode identically
    codes2, rc2 = encode(got, d)
    assert np.array_equal(codes2, codes) and np.array_equal(rc2, rc)
    return codes, rc


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(sym=symbol_matrices(), seed=st.integers(0, 1000))
def test_round_trip(kind, sym, seed):
    check_round_trip(sym, dictionary(kind), seed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(0, 0), (0, 64), (16, 0), (37, 1), (1, 301), (9, 77),
                                   (1, 1), (2, 2), (3, 1025)])
def test_edge_shapes(kind, shape):
    d = dictionary(kind)
    rng = np.random.default_rng(sum(shape))
    for p0 in (0.0, 0.5, 0.885, 0.99, 1.0):
        check_round_trip(iid_symbols(rng, *shape, p0), d)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cols", [65535, 65536, 70001])
def test_wide_rows(kind, cols):
    """row_codes is uint16 iff cols < 65536, whatever the counts are."""
    d = dictionary(kind)
    rng = np.random.default_rng(cols)
    sym = np.concatenate([iid_symbols(rng, 1, cols, 0.9), np.zeros((1, cols), np.int8),
                          iid_symbols(rng, 1, cols, 0.3)])
    check_round_trip(sym, d)


@pytest.mark.parametrize("kind", KINDS)
def test_structured_rows(kind):
    """Zero runs longer than any entry, all-nonzero rows, nonzeros at both ends."""
    d = dictionary(kind)
    for row in ([0] * 5000, [1] * 999, [2, 1] * 300, [1] + [0] * 4000 + [2],
                ([0] * 63 + [2]) * 40, ([0] * 64 + [1]) * 40, [0] * 4095 + [1]):
        check_round_trip(np.array([row], np.int8), d)


def test_encode_rejects_bad_symbols():
    d = build_qmoe2023()
    with pytest.raises(ValueError):
        encode(np.array([[0, 3]], np.int8), d)
    with pytest.raises(ValueError):
        encode(np.array([[0, -1]], np.int8), d)
    with pytest.raises(ValueError):
        encode(np.zeros(5, np.int8), d)


# ------------------------------------------------------------------ rates

def entropy_bits(sym: np.ndarray) -> float:
    counts = np.bincount(sym.reshape(-1), minlength=3).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


@pytest.mark.parametrize("p0", [0.80, 0.885, 0.93, 0.97])
def test_golomb_rate_near_entropy(p0):
    d = build_golomb(ladder_point(p0))
    sym = iid_symbols(np.random.default_rng(int(p0 * 1e4)), 16, 4096, p0)
    codes, _ = encode(sym, d)
    bits = 16 * codes.size / sym.size
    h = entropy_bits(sym)
    assert bits <= 1.05 * h, (bits, h)


# Field-notes figures for QMoE's dictionary on iid symbols. Measured on 2^21-symbol samples
# of very wide rows the stream (identical to the independent reference encoder, see
# test_qmoe_reference.py) costs 1.120 / 0.7355 / 0.6179 bits: +0.9% / +0.9% / +0.3%
# over the notes, and +1.0-1.1% at 0.80 with other seeds. So the bound is 1.5%: the
# notes' 1.110 at P(0) = 0.80 is about 1% low, not the codec about 1% high.
@pytest.mark.parametrize("p0,expected", [(0.80, 1.110), (0.885, 0.729), (0.93, 0.616)])
def test_qmoe2023_rate_matches_field_notes(p0, expected):
    sym = iid_symbols(np.random.default_rng(int(p0 * 1e4)), 8, 1 << 18, p0)
    codes, _ = encode(sym, build_qmoe2023())
    bits = 16 * codes.size / sym.size
    assert abs(bits / expected - 1) <= 0.015, bits
    assert bits > expected          # the notes' figures are a lower bound here


def test_golomb_beats_qmoe2023():
    rng = np.random.default_rng(1)
    for p0 in (0.885, 0.93):
        sym = iid_symbols(rng, 8, 4096, p0)
        q, _ = encode(sym, build_qmoe2023())
        g, _ = encode(sym, build_golomb(ladder_point(p0)))
        assert g.size < q.size


# ------------------------------------------------------------------ table validation

def _tables(d):
    return {k: v.copy() for k, v in d.tables().items()}


def _find(t, state, pred):
    """The first codeword of `state` whose entry satisfies pred(length, nnz)."""
    ln, nnz = t["length"][state].astype(np.int64), t["nnz"][state].astype(np.int64)
    hits = np.flatnonzero(pred(ln, nnz))
    assert hits.size
    return int(hits[min(7, hits.size - 1)])


def _defect(t, kind, s):
    k = t["nz_pos"].shape[2]
    n_states = t["length"].shape[0]
    if kind == "length-0":
        c = _find(t, s, lambda ln, nnz: ln > 0)
        t["length"][s, c] = 0
        return c, "length is 0"
    if kind == "next-state":
        c = _find(t, s, lambda ln, nnz: ln > 0)
        t["next_state"][s, c] = n_states
        return c, f"next_state >= {n_states}"
    if kind == "nnz-over-k":
        c = _find(t, s, lambda ln, nnz: ln > 0)
        t["nnz"][s, c] = k + 1
        return c, f"nnz > K = {k}"
    if kind == "offset-past-length":
        c = _find(t, s, lambda ln, nnz: nnz >= 1)
        n = t["nnz"][s, c]
        t["nz_pos"][s, c, n - 1] = t["length"][s, c]
        return c, "nonzero offset >= length"
    if kind == "symbol-3":
        c = _find(t, s, lambda ln, nnz: nnz >= 1)
        t["nz_sym"][s, c, 0] = 3
        return c, "nonzero symbol not 1 or 2"
    if kind == "symbol-0":
        c = _find(t, s, lambda ln, nnz: nnz >= 1)
        t["nz_sym"][s, c, 0] = 0
        return c, "nonzero symbol not 1 or 2"
    if kind == "not-increasing":
        c = _find(t, s, lambda ln, nnz: nnz >= 2)
        t["nz_pos"][s, c, 1] = t["nz_pos"][s, c, 0]
        return c, "not strictly increasing"
    if kind == "pad-pos":
        c = _find(t, s, lambda ln, nnz: nnz < k)
        t["nz_pos"][s, c, k - 1] = 1
        return c, "padding slot not zero"
    if kind == "pad-sym":
        c = _find(t, s, lambda ln, nnz: nnz < k)
        t["nz_sym"][s, c, k - 1] = 1
        return c, "padding slot not zero"
    raise AssertionError(kind)


DEFECTS = ("length-0", "next-state", "nnz-over-k", "offset-past-length", "symbol-3",
           "symbol-0", "not-increasing", "pad-pos", "pad-sym")


@pytest.mark.parametrize("kind", ["qmoe-2023", "golomb-0.8808"])
@pytest.mark.parametrize("defect", DEFECTS)
def test_validation_rejects_bad_entry(kind, defect):
    d = dictionary(kind)
    t = _tables(d)
    validate_tables(t, "dict")                    # the untouched tables are fine
    s = t["length"].shape[0] - 1                  # golomb: the last state, not 0
    c, what = _defect(t, defect, s)
    with pytest.raises(FormatError) as e:
        validate_tables(t, "dict")
    msg = str(e.value)
    assert f"state {s} codeword {c}:" in msg, msg
    assert what in msg, msg


def test_validation_rejects_bad_shapes_and_dtypes():
    t0 = _tables(build_qmoe2023())

    def bad(mutate, what):
        t = {k: v.copy() for k, v in t0.items()}
        mutate(t)
        with pytest.raises(FormatError, match=what):
            validate_tables(t, "dict")

    bad(lambda t: t.pop("nnz"), "missing table 'nnz'")
    bad(lambda t: t.update(length=t["length"].astype(np.int32)), "dtype")
    bad(lambda t: t.update(nz_sym=t["nz_sym"].astype(np.uint16)), "dtype")
    bad(lambda t: t.update(length=t["length"][:, :100]), "shape")
    bad(lambda t: t.update(next_state=t["next_state"][:, :100]), "shape")
    bad(lambda t: t.update(nz_pos=t["nz_pos"][:, :, :2]), "shapes")
    bad(lambda t: t.update({n: a[:0] for n, a in t.items()}), "0 states")
    bad(lambda t: t.update({n: np.repeat(a, 65, axis=0) for n, a in t.items()}), "65 states")
    bad(lambda t: t.update(nz_pos=np.zeros((1, 65536, 33), np.uint16),
                           nz_sym=np.zeros((1, 65536, 33), np.uint8)), "K = 33")


# ------------------------------------------------------------------ decoder errors

def _qmoe_code(seq):
    return reference_sequences().index(tuple(seq))


@pytest.fixture(scope="module")
def qd():
    return build_qmoe2023()


def test_decode_short_stream(qd):
    c0 = _qmoe_code([0])                      # two zeros
    with pytest.raises(FormatError, match="fewer symbols than the row width"):
        decode_symbols(np.array([c0] * 3, np.uint16), np.array([3], np.uint16), 10, qd)
    with pytest.raises(FormatError, match="row 1: codewords expand to fewer"):
        decode_values(np.array([c0] * 9, np.uint16), np.array([5, 4], np.uint16), 10, qd,
                      np.zeros(2, np.float32), np.zeros(2, np.float32))
    # a row of nonzero width with no codewords at all
    with pytest.raises(FormatError, match="fewer symbols"):
        decode_symbols(np.zeros(0, np.uint16), np.array([0], np.uint16), 4, qd)


def test_decode_long_stream(qd):
    c0 = _qmoe_code([0])
    with pytest.raises(FormatError, match="codeword starts past the end of the row"):
        decode_symbols(np.array([c0] * 6, np.uint16), np.array([6], np.uint16), 10, qd)
    # rows of odd width: 5 symbols need 3 pairs; a 4th codeword starts past the end
    with pytest.raises(FormatError, match="starts past the end"):
        decode_symbols(np.array([c0] * 4, np.uint16), np.array([4], np.uint16), 5, qd)


def test_decode_nonzero_padding(qd):
    c0 = _qmoe_code([0])
    c_pad = _qmoe_code([0 + 3 * 1])           # pair (0, lo): the lo lands in the padding
    with pytest.raises(FormatError, match="padding must be zero"):
        decode_symbols(np.array([c0, c0, c_pad], np.uint16), np.array([3], np.uint16), 5, qd)
    # the same stream is fine for a row of 6
    got = decode_symbols(np.array([c0, c0, c_pad], np.uint16), np.array([3], np.uint16), 6, qd)
    assert got.tolist() == [[0, 0, 0, 0, 0, 1]]


def test_decode_row_codes_checks(qd):
    c0 = _qmoe_code([0])
    with pytest.raises(FormatError, match="sum to 4 but codes holds 3"):
        decode_symbols(np.array([c0] * 3, np.uint16), np.array([2, 2], np.uint16), 4, qd)
    with pytest.raises(FormatError, match="codewords for a row of 4 symbols"):
        decode_symbols(np.array([c0] * 5, np.uint16), np.array([5], np.uint16), 4, qd)
    with pytest.raises(FormatError, match="1-D"):
        decode_symbols(np.array([c0] * 2, np.uint16), np.array([[1, 1]], np.uint16), 4, qd)
    with pytest.raises(FormatError):
        decode_symbols(np.array([c0], np.uint16), np.array([1], np.uint16), 0, qd)
    with pytest.raises(FormatError):
        decode_symbols(np.array([c0], np.uint16), np.zeros(0, np.uint16), 4, qd)


def test_decode_golomb_short_and_long():
    d = build_golomb(0.8808)
    sym = np.zeros((1, 300), np.int8)
    sym[0, [5, 100, 299]] = [1, 2, 1]
    codes, rc = encode(sym, d)
    with pytest.raises(FormatError, match="fewer symbols"):
        decode_symbols(codes[:-1], np.array([rc[0] - 1], np.uint16), 300, d)
    with pytest.raises(FormatError, match="starts past the end"):
        decode_symbols(np.append(codes, codes[:1]), np.array([rc[0] + 1], np.uint16), 300, d)
    # the 300-wide stream read as 299 wide: the codeword holding the nonzero at 299
    # starts at 299, i.e. past the end of the row
    with pytest.raises(FormatError, match="starts past the end"):
        decode_symbols(codes, rc, 299, d)
    # an entry of state 0 whose first nonzero is at offset j >= 1, alone in a row of j
    t = d.tables()
    c = int(np.flatnonzero((t["nnz"][0] >= 1) & (t["nz_pos"][0, :, 0] >= 1))[0])
    j = int(t["nz_pos"][0, c, 0])
    with pytest.raises(FormatError, match="padding must be zero"):
        decode_symbols(np.array([c], np.uint16), np.array([1], np.uint16), j, d)
    got = decode_symbols(np.array([c], np.uint16), np.array([1], np.uint16),
                         int(t["length"][0, c]), d)
    assert got[0, j] == t["nz_sym"][0, c, 0]


@pytest.mark.parametrize("kind", ["qmoe-2023", "golomb-0.9707"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_decode_garbage_never_crashes(kind, data):
    """Arbitrary codewords with any row_codes: valid symbols or a FormatError."""
    d = dictionary(kind)
    rows = data.draw(st.integers(1, 4))
    cols = data.draw(st.integers(0, 200))
    counts = data.draw(st.lists(st.integers(0, max(cols, 0) + 2), min_size=rows, max_size=rows))
    n = sum(counts) + data.draw(st.sampled_from([0, 0, 0, 1, -1]))
    assume(n >= 0)
    codes = np.array(data.draw(st.lists(st.integers(0, 65535), min_size=n, max_size=n)),
                     np.uint16)
    rc = np.array(counts, data.draw(st.sampled_from([np.uint16, np.uint32])))
    lo = np.full(rows, -0.5, np.float32)
    hi = np.full(rows, 0.25, np.float32)
    try:
        sym = decode_symbols(codes, rc, cols, d)
    except FormatError:
        sym = None
    else:
        assert sym.shape == (rows, cols) and sym.dtype == np.int8
        assert ((sym >= 0) & (sym <= 2)).all()
    try:
        vals = decode_values(codes, rc, cols, d, lo, hi)
    except FormatError:
        assert sym is None
    else:
        assert sym is not None
        assert np.array_equal(vals, np.choose(sym, [np.float32(0), lo[:, None], hi[:, None]]))


def test_decode_values_out_argument(qd):
    sym = iid_symbols(np.random.default_rng(0), 3, 50, 0.8)
    codes, rc = encode(sym, qd)
    lo, hi = np.full(3, -1.0, np.float32), np.full(3, 2.0, np.float32)
    out = np.full((3, 50), 7.0, np.float32)
    got = decode_values(codes, rc, 50, qd, lo, hi, out=out)
    assert got is out
    assert np.array_equal(out, np.choose(sym, [np.float32(0), lo[:, None], hi[:, None]]))
    with pytest.raises(ValueError):
        decode_values(codes, rc, 50, qd, lo, hi, out=np.zeros((3, 49), np.float32))


# ------------------------------------------------------------------ quantizer

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
small32 = st.floats(-1.0, 1.0, width=32) | st.sampled_from([0.0, -0.0, 1e-45, -1e-45,
                                                            1e-38, -3e-39, 0.5, -0.25])


@settings(max_examples=200, deadline=None)
@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=0,
                                                    max_side=24), elements=small32 | finite32))
def test_quantizer_matches_reference(x):
    rsym, rscales, _ = reference_quantize(x)
    if ((rscales & 0x7FFF) == 0x7F80).any():
        # a finite weight whose bf16 scale rounds to infinity: refused (spec §5.1 wants
        # finite scales), naming the first such row
        with pytest.raises(NonFiniteError, match="beyond bfloat16"):
            quantize_rtn(x)
        return
    sym, scales, counts = quantize_rtn(x)
    assert sym.dtype == np.int8 and scales.dtype == np.uint16
    assert np.array_equal(sym, rsym)
    assert np.array_equal(scales, rscales)
    assert counts.tolist() == [int((rsym == s).sum()) for s in range(3)]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 8), cols=st.integers(1, 600),
       scale=st.sampled_from([1e-3, 0.02, 1.0, 300.0]), df=st.sampled_from([2.0, 5.0, 100.0]))
def test_quantizer_matches_reference_on_weights(seed, rows, cols, scale, df):
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(df, (rows, cols)) * scale).astype(np.float32)
    # bf16-exact data too, as bf16 checkpoints give
    for w in (x, (x.view(np.uint32) >> 16 << 16).view(np.float32)):
        sym, scales, _ = quantize_rtn(w)
        rsym, rscales, values = reference_quantize(w)
        assert np.array_equal(sym, rsym) and np.array_equal(scales, rscales)
        lo, hi = bf16.to_float32(scales).T
        assert np.array_equal(np.choose(sym, [np.float32(0), lo[:, None], hi[:, None]]), values)
        assert (lo <= 0).all() and (hi >= 0).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantizer_rejects_non_finite(bad):
    x = np.zeros((5, 9), np.float32)
    x[3, 4] = bad
    x[4, 0] = bad
    with pytest.raises(NonFiniteError) as e:
        quantize_rtn(x)
    assert e.value.row == 3
    assert "row 3" in str(e.value)


def test_quantizer_shapes():
    for shape in [(0, 5), (5, 0), (0, 0), (1, 1)]:
        sym, scales, counts = quantize_rtn(np.ones(shape, np.float32))
        assert sym.shape == shape and scales.shape == (shape[0], 2)
        assert counts.sum() == math.prod(shape)
