"""The suite every decode backend passes (as zarr-python's `testing/store.py` StoreTests
does for stores). A backend's test module is one class:

    class TestCudaBackend(DecodeBackendTests):
        backend = "cuda"

The expected results come from plain-numpy decoders written from the spec (§5.2 through
the §5.6 tables, §12's bit order), never from another backend, plus the committed
conformance vectors. Inputs reach a kernel the way the codecs pass them: through
`stream.decode_symbols/decode_values` and `uint_packed.unpack_levels`, which validate
first, or, to see the per-row status of every row, directly with arguments those
functions would have accepted.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from .. import backends
from ..backends.base import ROW_EXTRA_CODES, ROW_NONZERO_PAD, ROW_OK, ROW_SHORT, ROW_STATUS
from ..codecs.uint_packed import row_bytes, unpack_levels
from ..dictionaries.stream import (decode_symbols, decode_values, encode, matmul_values,
                                   row_offsets)
from ..dictionaries.tables import Dictionary
from ..errors import FormatError
from ..format.constants import CODEWORDS, KBIT_BITS
from . import conformance
from .reference import (ALL, BUILT, assert_matmul_close, dictionary, reference_pack,
                        reference_symbols, reference_unpack, reference_values)

# ------------------------------------------------------------------ strategies

# differing_executors: Hypothesis flags a test method run on instances of different
# classes, which is this suite's design (a subclass a backend); an example that fails on
# one backend is worth replaying on every other. too_slow, data_too_large: the wide rows.
SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.differing_executors])

WIDTHS = st.sampled_from([1, 2, 3, 5, 7, 27, 28, 29, 77, 255, 256, 257, 1025]) | st.integers(1, 700)


@st.composite
def symbol_matrices(draw):
    """int8 [rows, cols] ternary symbols: 0 rows or 0 columns, odd widths, one column,
    all-zero rows, rows of one symbol, any P(0); widths of 65536 and more (uint32
    row_codes) in at most two rows."""
    cols = draw(st.just(0) | WIDTHS | st.sampled_from([65535, 65536, 70001]))
    rows = draw(st.integers(0, 2 if cols > 4096 else 6))
    p0 = draw(st.sampled_from([0.0, 0.3, 0.75, 0.885, 0.97, 0.999, 1.0]) | st.floats(0.0, 1.0))
    lo_share = draw(st.sampled_from([0.5, 0.0, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sym = rng.choice(3, size=(rows, cols), p=[p0, (1 - p0) * lo_share, (1 - p0) * (1 - lo_share)])
    if rows:
        sym[draw(st.lists(st.integers(0, rows - 1), max_size=rows))] = 0
    return sym.astype(np.int8)


def scales(rng, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """bf16-exact (lo, hi) per row with lo <= 0 <= hi, -0.0 and +0.0 among them."""
    x = np.abs(rng.standard_normal((2, rows))).astype(np.float32) / 8
    x = (x.view(np.uint32) >> 16 << 16).view(np.float32)      # truncated to bf16
    lo, hi = -x[0], x[1].copy()
    lo[::3] = -0.0
    hi[1::3] = 0.0
    return lo, hi


def random_stream(rng, d: Dictionary, rows: int, cols: int, tweaks):
    """Per row, random codewords until they cover the row (ends past it may put a nonzero
    in the padding), then tweaked: "keep", "drop" the last codeword (too short), "append"
    one (too long), or "garbage" (any count up to cols, any codewords).
    -> (codes uint16, row_codes uint16)."""
    codes, counts = [], []
    for r in range(rows):
        if tweaks[r] == "garbage":
            row = rng.integers(0, CODEWORDS, int(rng.integers(0, cols + 1))).tolist()
        else:
            row, state, pos = [], 0, 0
            while pos < cols:
                c = int(rng.integers(0, CODEWORDS))
                row.append(c)
                pos += int(d.length[state, c])
                state = int(d.next_state[state, c])
            if tweaks[r] == "drop" and row:
                row.pop()
            elif tweaks[r] == "append" and len(row) < cols:
                row.append(int(rng.integers(0, CODEWORDS)))
        codes += row
        counts.append(len(row))
    return np.array(codes, np.uint16), np.array(counts, np.uint16)


def stream_error(where: str, status: np.ndarray) -> str:
    """The FormatError text the stream coder raises for these row statuses."""
    bad = np.flatnonzero(status)
    more = f" (and {bad.size - 1} more rows)" if bad.size > 1 else ""
    return f"{where}: row {int(bad[0])}: {ROW_STATUS[int(status[bad[0]])]}{more}"


# ------------------------------------------------------------------ the suite


class DecodeBackendTests:
    """Subclass with `backend` set to a registered DecodeBackend name."""

    backend: ClassVar[str]

    @property
    def kernels(self) -> backends.DecodeBackend:
        return backends.get(self.backend)

    def test_registered(self):
        assert isinstance(self.kernels, backends.DecodeBackend)
        assert self.kernels.name == self.backend

    # ---- ternary streams (§5.2)

    @pytest.mark.parametrize("kind", BUILT)
    @SETTINGS
    @given(sym=symbol_matrices(), seed=st.integers(0, 2**32 - 1), uint32_counts=st.booleans())
    def test_encoded_streams_decode_to_their_symbols(self, kind, sym, seed, uint32_counts):
        d = dictionary(kind)
        rows, cols = sym.shape
        codes, rc = encode(sym, d)
        if uint32_counts:
            rc = rc.astype(np.uint32)        # readers accept uint32 at any width
        want, status = reference_symbols(codes, rc, cols, d)
        assert not status.any() and np.array_equal(want, sym)
        got = decode_symbols(codes, rc, cols, d, backend=self.backend)
        assert got.dtype == np.int8 and got.shape == (rows, cols)
        assert np.array_equal(got, want)
        lo, hi = scales(np.random.default_rng(seed), rows)
        # NaN in `out` catches a kernel that leaves zeros unwritten
        out = np.full((rows, cols), np.nan, np.float32)
        got = decode_values(codes, rc, cols, d, lo, hi, out=out, backend=self.backend)
        assert got is out
        assert got.view(np.uint32).tobytes() == reference_values(want, lo, hi).view(np.uint32).tobytes()

    @pytest.mark.parametrize("kind", BUILT)
    @SETTINGS
    @given(sym=symbol_matrices(), seed=st.integers(0, 2**32 - 1),
           batch=st.sampled_from([1, 2, 16, 64]) | st.integers(0, 9))
    def test_matmul_equals_decode_then_dense(self, kind, sym, seed, batch):
        """Y = X W^T from the codewords equals X times the decoded W within fp32 rounding,
        for every batch size, empty ones included."""
        d = dictionary(kind)
        rows, cols = sym.shape
        codes, rc = encode(sym, d)
        rng = np.random.default_rng(seed)
        lo, hi = scales(rng, rows)
        x = rng.standard_normal((batch if cols <= 4096 else min(batch, 2), cols)).astype(np.float32)
        y = matmul_values(codes, rc, cols, d, lo, hi, x, backend=self.backend)
        assert y.dtype == np.float32 and y.shape == (x.shape[0], rows)
        assert_matmul_close(y, x, reference_values(sym, lo, hi))

    @pytest.mark.parametrize("kind", ALL)
    @SETTINGS
    @given(rows=st.integers(1, 5), cols=WIDTHS, seed=st.integers(0, 2**32 - 1), data=st.data())
    def test_any_stream_gets_the_reference_status_per_row(self, kind, rows, cols, seed, data):
        """Random codewords: every row's status is the reference's, every row that
        decodes holds the reference's symbols and values, and the stream coder raises
        for the first failed row."""
        d = dictionary(kind)
        rng = np.random.default_rng(seed)
        tweaks = data.draw(st.lists(st.sampled_from(["keep", "keep", "drop", "append", "garbage"]),
                                    min_size=rows, max_size=rows))
        codes, rc = random_stream(rng, d, rows, cols, tweaks)
        want, want_status = reference_symbols(codes, rc, cols, d)
        ok = want_status == ROW_OK
        offsets = row_offsets(rc, codes.size, cols)
        lo, hi = scales(rng, rows)

        out = np.full((rows, cols), 7, np.int8)
        status = np.zeros(rows, np.uint8)
        self.kernels.ternary_symbols(codes, offsets, cols, d, out, status)
        assert status.tolist() == want_status.tolist()
        assert np.array_equal(out[ok], want[ok])
        vals = np.full((rows, cols), np.nan, np.float32)
        status = np.zeros(rows, np.uint8)
        self.kernels.ternary_values(codes, offsets, cols, d, lo, hi, vals, status)
        assert status.tolist() == want_status.tolist()
        assert vals[ok].tobytes() == reference_values(want, lo, hi)[ok].tobytes()

        for batch in (1, 2):         # backends may take batch 1 apart
            x = rng.standard_normal((batch, cols)).astype(np.float32)
            y = np.full((batch, rows), np.nan, np.float32)
            status = np.zeros(rows, np.uint8)
            self.kernels.ternary_matmul(codes, offsets, cols, d, lo, hi,
                                        np.ascontiguousarray(x.T), y, status)
            assert status.tolist() == want_status.tolist()
            assert_matmul_close(y[:, ok], x, reference_values(want, lo, hi)[ok])

        if ok.all():
            assert np.array_equal(decode_symbols(codes, rc, cols, d, "t", backend=self.backend), want)
            return
        for decode in (lambda: decode_symbols(codes, rc, cols, d, "t", backend=self.backend),
                       lambda: decode_values(codes, rc, cols, d, lo, hi, "t", backend=self.backend)):
            with pytest.raises(FormatError) as e:
                decode()
            assert str(e.value) == stream_error("t", want_status)

    @pytest.mark.parametrize("kind", ALL)
    def test_malformed_rows(self, kind):
        """Rows too short, too long and with a nonzero in their padding, between rows
        that decode: each gets its own status, and the error names the first."""
        d = dictionary(kind)
        # z: the longest state-0 entry of zeros only that returns to state 0; c: the
        # state-0 entry whose first nonzero comes latest, at offset j. After z, c's
        # nonzero lands exactly on the end of a row of length(z) + j symbols.
        loops = np.flatnonzero((d.nnz[0] == 0) & (d.next_state[0] == 0))
        z = int(loops[np.argmax(d.length[0, loops])])
        first = np.where(d.nnz[0] > 0, d.nz_pos[0, :, 0], 0)
        c = int(np.argmax(first))
        j = int(first[c])
        assert 1 <= j <= d.length[0, z]
        cols = int(d.length[0, z]) + j
        rows = [[z, z], [z], [z, z, z], [z, c], [z, z]]
        want_status = [ROW_OK, ROW_SHORT, ROW_EXTRA_CODES, ROW_NONZERO_PAD, ROW_OK]
        codes = np.array([x for r in rows for x in r], np.uint16)
        rc = np.array([len(r) for r in rows], np.uint16)
        assert reference_symbols(codes, rc, cols, d)[1].tolist() == want_status
        out = np.full((len(rows), cols), 7, np.int8)
        status = np.zeros(len(rows), np.uint8)
        self.kernels.ternary_symbols(codes, row_offsets(rc, codes.size, cols), cols, d, out, status)
        assert status.tolist() == want_status
        assert not out[[0, 4]].any()
        with pytest.raises(FormatError) as e:
            decode_symbols(codes, rc, cols, d, "t", backend=self.backend)
        assert str(e.value) == ("t: row 1: codewords expand to fewer symbols than the row "
                                "width (and 2 more rows)")
        for r in (2, 3):
            one = np.array(rows[r], np.uint16)
            with pytest.raises(FormatError) as e:
                decode_values(one, np.array([one.size], np.uint16), cols, d,
                              np.zeros(1, np.float32), np.zeros(1, np.float32), "t",
                              backend=self.backend)
            assert str(e.value) == f"t: row 0: {ROW_STATUS[want_status[r]]}"

    @pytest.mark.parametrize("kind", BUILT)
    @pytest.mark.parametrize("cols", [65536, 70001])
    def test_wide_rows(self, kind, cols):
        """uint32 row_codes: nonzeros at both ends, an all-zero row, a dense row."""
        d = dictionary(kind)
        rng = np.random.default_rng(cols)
        sym = np.zeros((3, cols), np.int8)
        sym[0, [0, 1, cols // 2, cols - 2, cols - 1]] = [2, 1, 1, 2, 1]
        sym[2] = rng.choice(3, cols, p=[0.5, 0.25, 0.25])
        codes, rc = encode(sym, d)
        assert rc.dtype == np.uint32
        want, status = reference_symbols(codes, rc, cols, d)
        assert not status.any() and np.array_equal(want, sym)
        assert np.array_equal(decode_symbols(codes, rc, cols, d, backend=self.backend), sym)
        lo, hi = scales(rng, 3)
        got = decode_values(codes, rc, cols, d, lo, hi, backend=self.backend)
        assert got.tobytes() == reference_values(sym, lo, hi).tobytes()
        # the dense row read one codeword short
        rc2 = rc.copy()
        rc2[2] -= 1
        with pytest.raises(FormatError, match="row 2: codewords expand to fewer"):
            decode_symbols(codes[:-1], rc2, cols, d, backend=self.backend)

    # ---- bit-packed levels (§12)

    @pytest.mark.parametrize("bits", KBIT_BITS)
    @SETTINGS
    @given(rows=st.integers(0, 6), cols=st.just(0) | WIDTHS, seed=st.integers(0, 2**32 - 1))
    def test_unpack_levels(self, bits, rows, cols, seed):
        rng = np.random.default_rng(seed)
        levels = rng.integers(0, 1 << bits, (rows, cols)).astype(np.uint8)
        if rows:
            levels[rng.integers(0, rows)] = (1 << bits) - 1      # every bit set
        packed = reference_pack(levels, bits)
        assert np.array_equal(reference_unpack(packed, bits, cols)[0], levels)
        got = unpack_levels(packed, bits, cols, backend=self.backend)
        assert got.dtype == np.uint8 and got.shape == (rows, cols)
        assert np.array_equal(got, levels)

    @pytest.mark.parametrize("bits", KBIT_BITS)
    @SETTINGS
    @given(rows=st.integers(1, 6), cols=WIDTHS, seed=st.integers(0, 2**32 - 1))
    def test_unpack_any_bytes(self, bits, rows, cols, seed):
        """Random bytes: rows whose padding bits are set are flagged (only those), the
        others hold the reference's levels, and unpack_levels names the first flagged."""
        rng = np.random.default_rng(seed)
        packed = rng.integers(0, 256, (rows, row_bytes(cols, bits)), dtype=np.uint8)
        clean = rng.random(rows) < 0.5          # most random rows have padding bits set
        packed[clean, -1] &= (1 << ((cols * bits - 1) % 8 + 1)) - 1
        want, want_bad = reference_unpack(packed, bits, cols)
        out = np.full((rows, cols), 0xFF, np.uint8)
        bad = np.zeros(rows, np.uint8)
        self.kernels.unpack_levels(packed, bits, cols, out, bad)
        assert bad.astype(bool).tolist() == want_bad.tolist()
        assert np.array_equal(out[~want_bad], want[~want_bad])
        if not want_bad.any():
            assert np.array_equal(unpack_levels(packed, bits, cols, "q", backend=self.backend), want)
            return
        with pytest.raises(FormatError) as e:
            unpack_levels(packed, bits, cols, "q", backend=self.backend)
        assert str(e.value) == f"q: row {int(np.argmax(want_bad))}: nonzero padding bits in q"

    @pytest.mark.parametrize("bits", KBIT_BITS)
    @SETTINGS
    @given(rows=st.integers(1, 6), cols=WIDTHS, group=st.sampled_from([1, 3, 16, 128, None]),
           batch=st.sampled_from([1, 2, 16]) | st.integers(0, 5), seed=st.integers(0, 2**32 - 1))
    @example(rows=3, cols=2051, group=None, batch=1, seed=0)      # long groups, partial byte
    @example(rows=3, cols=2051, group=1024, batch=1, seed=1)
    def test_kbit_matmul_equals_decode_then_dense(self, bits, rows, cols, group, batch, seed):
        """§12 rows times X, per group scale * (level - zero), within fp32 rounding of the
        dequantized product; rows with padding bits set are flagged, only those."""
        rng = np.random.default_rng(seed)
        size = group or cols
        groups = -(-cols // size)
        levels = rng.integers(0, 1 << bits, (rows, cols)).astype(np.uint8)
        zeros = rng.integers(0, 1 << bits, (rows, groups)).astype(np.uint8)
        sc = np.abs(rng.standard_normal((rows, groups))).astype(np.float32) / 16
        sc = (sc.view(np.uint32) >> 16 << 16).view(np.float32)       # bf16-exact
        packed = reference_pack(levels, bits)
        dirty = rng.random(rows) < 0.3
        if (cols * bits) % 8:
            packed[dirty, -1] |= np.uint8(0x80)                      # a padding bit set
        else:
            dirty[:] = False
        g = np.arange(cols) // size
        w = sc[:, g] * (levels.astype(np.float32) - zeros[:, g].astype(np.float32))
        x = rng.standard_normal((batch, cols)).astype(np.float32)
        y = np.full((batch, rows), np.nan, np.float32)
        bad = np.zeros(rows, np.uint8)
        self.kernels.kbit_matmul(packed, bits, cols, size, sc, zeros, np.ascontiguousarray(x.T),
                                 y, bad)
        assert bad.astype(bool).tolist() == dirty.tolist()
        assert_matmul_close(y[:, ~dirty], x, w[~dirty])

    # ---- the committed fixture stores

    @pytest.mark.parametrize("manifest,store", conformance.cases())
    def test_fixture_stores_decode_to_the_conformance_vectors(self, manifest, store):
        assert conformance.check_decodes(manifest, store, backend=self.backend) > 0
