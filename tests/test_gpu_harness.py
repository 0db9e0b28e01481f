"""The CUDA kernels' decode logic, run on the host (gpu/host_harness.cpp: the kernels' warp
drivers with 32 simulated lanes), against the backend suite's plain-numpy decoders, the
committed conformance vectors and the CPU runtime. Needs a C++ compiler, no GPU."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qmoefmt
from qmoefmt.backends import cuda_build, cuda_host
from qmoefmt.codecs.kbit_grid import dequantize
from qmoefmt.codecs.uint_dict16 import DictLevelsWeight, split
from qmoefmt.dictionaries.stream import encode, row_offsets
from qmoefmt.dictionaries.tables import Dictionary
from qmoefmt.errors import FormatError
from qmoefmt.testing import conformance, paths
from qmoefmt.testing.backends import DecodeBackendTests, random_stream, scales
from qmoefmt.testing.reference import (assert_matmul_close, dictionary, reference_symbols,
                                       reference_values)

pytestmark = pytest.mark.skipif(cuda_build.compiler() is None, reason="no C++ compiler")


class TestCudaHostHarness(DecodeBackendTests):
    backend = "cuda-host"


# ------------------------------------------------------------------ the GPU runtime's operations

# the kernels' dense outputs: float32, and float16 / bfloat16 bits rounded to nearest even
CASTS = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@pytest.fixture(scope="module")
def runtime():
    return cuda_host.RUNTIME


def dense_bits(values: np.ndarray, dtype: str) -> bytes:
    return values.astype(CASTS[dtype]).tobytes()


def conformance_weights():
    """(manifest, store, tensor name) of every coded conformance tensor."""
    return [(kind, store, name) for kind, store in conformance.cases()
            for name in conformance.manifest(kind)["stores"][store]["tensors"]]


@pytest.mark.parametrize("kind,store,name", conformance_weights())
def test_conformance_tensors_decode_and_multiply(runtime, kind, store, name):
    """Dense decode bit for bit in all three dtypes (-0.0 included), and products for
    batches that take every kernel width and more than one tile, within fp32 accumulation
    of the vectors' values and of the CPU runtime's product."""
    t = qmoefmt.open(paths.store(store))[name]
    want = conformance.vectors(kind, store)[f"{name}/values"]
    want = want.reshape(t.rows_cols)
    w = t.unit.runtime(t)
    for dtype in CASTS:
        got = runtime.decode(w, dtype)
        assert got.shape == want.shape
        assert got.tobytes() == dense_bits(want, dtype), dtype
    rng = np.random.default_rng(len(name))
    for batch in (1, 2, 3, 16, 19):
        x = rng.standard_normal((batch, want.shape[1])).astype(np.float32)
        y = runtime.matmul(w, x)
        assert y.shape == (batch, want.shape[0]) and y.dtype == np.float32
        assert_matmul_close(y, x, want)
        assert_matmul_close(w.matmul(x), x, want)      # the CPU runtime, same bound


def test_float16_rounding_matches_numpy():
    """The kernels' own float32 -> float16 / bfloat16 conversions (host and device share
    them) against numpy's and ml_dtypes' casts: normals, subnormals, ties, overflow."""
    rng = np.random.default_rng(7)
    bits = np.concatenate([rng.integers(0, 2**32, 20000, dtype=np.uint64),
                           # around float16's subnormal, normal and overflow boundaries
                           (np.arange(0x33000000 - 64, 0x33000000 + 64)),
                           (np.arange(0x38800000 - 4096, 0x38800000 + 4096)),
                           (np.arange(0x477fe000 - 64, 0x477ff000 + 4096)),
                           [0x7f800000, 0xff800000, 0, 0x80000000]]).astype(np.uint32)
    f = bits.view(np.float32)
    f = f[~np.isnan(f)]                 # stored scales are finite; inf is kept to test overflow
    rows = f.size // 2
    lo, hi = f[:rows].copy(), f[rows:2 * rows].copy()
    d = dictionary("qmoe-2023")
    sym = np.tile(np.array([[1, 2]], np.int8), (rows, 1))
    codes, rc = encode(sym, d)
    offsets = row_offsets(rc, codes.size, 2)
    for dtype in ("float16", "bfloat16"):
        out = np.empty((rows, 2), np.uint16)
        status = np.zeros(rows, np.uint8)
        cuda_host.OPS.ternary_values(codes, offsets, 2, d, lo, hi, out, status, dtype)
        assert not status.any()
        with np.errstate(over="ignore"):       # overflow to inf is what is tested
            want = np.stack([lo, hi], axis=1).astype(CASTS[dtype]).view(np.uint16)
        bad = np.flatnonzero((out != want).any(axis=1))
        assert not bad.size, (dtype, np.stack([lo, hi], 1)[bad[:4]], out[bad[:4]], want[bad[:4]])


def dict_weight(levels, zeros, sc, bits, group_size, kind="golomb-0.8808"):
    """A uint-dict16 RuntimeWeight built as the codec builds one, from levels."""
    rows, cols = levels.shape
    ternary, counts, ecols, elevels = split(levels, zeros, group_size)
    d = dictionary(kind)
    codes, rc = encode(ternary, d)
    ends = np.zeros(rows + 1, np.int64)
    np.cumsum(counts, out=ends[1:])
    return DictLevelsWeight("t", (rows, cols), codes, row_offsets(rc, codes.size, cols), counts,
                            ends, ecols, elevels, sc, zeros, d, bits, group_size)


@st.composite
def kbit_grids(draw):
    bits = draw(st.sampled_from([2, 3, 4]))
    rows = draw(st.integers(1, 6))
    cols = draw(st.sampled_from([1, 7, 33, 256, 300]) | st.integers(1, 130))
    group = draw(st.sampled_from([1, 16, 64, cols, cols + 5]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    groups = -(-cols // group)
    zeros = rng.integers(0, 1 << bits, (rows, groups)).astype(np.uint8)
    near = np.clip(zeros[:, np.arange(cols) // group].astype(np.int16)
                   + rng.choice([-1, 0, 0, 0, 1], (rows, cols)), 0, (1 << bits) - 1)
    far = rng.integers(0, 1 << bits, (rows, cols))
    levels = np.where(rng.random((rows, cols)) < draw(st.sampled_from([0.0, 0.05, 0.5])),
                      far, near).astype(np.uint8)
    sc = np.abs(rng.standard_normal((rows, groups))).astype(np.float32) / 16
    sc = (sc.view(np.uint32) >> 16 << 16).view(np.float32)      # bf16-exact
    return levels, zeros, sc, bits, group, rng


@settings(max_examples=25, deadline=None)
@given(grid=kbit_grids(), batch=st.sampled_from([1, 2, 5, 16, 17]))
def test_random_uint_dict16_weights(runtime, grid, batch):
    """Random levels with escapes: decode equals §12's dequantization bit for bit; the
    product (fused at one group a row, dense blocks otherwise) is within fp32 of it."""
    levels, zeros, sc, bits, group, rng = grid
    want = dequantize(levels, sc, zeros, group)
    w = dict_weight(levels, zeros, sc, bits, group)
    assert runtime.decode(w).tobytes() == want.tobytes()
    x = rng.standard_normal((batch, levels.shape[1])).astype(np.float32)
    assert_matmul_close(runtime.matmul(w, x), x, want)
    assert_matmul_close(runtime.matmul(w, x), x, want)     # checked now: the fused path


def test_bad_escapes_raise_the_readers_error(runtime):
    """An escape one step from its zero point: the kernel flags the row and the error is
    the CPU reader's, naming the row and column."""
    rng = np.random.default_rng(3)
    levels = rng.integers(0, 4, (4, 40)).astype(np.uint8)
    zeros = np.full((4, 1), 1, np.uint8)
    sc = np.full((4, 1), 0.5, np.float32)
    w = dict_weight(levels, zeros, sc, 2, 40)
    assert w.escape_levels.size
    w.escape_levels[-1] = 2          # zero point 1: one step, not an escape
    x = np.ones((1, 40), np.float32)
    with pytest.raises(FormatError) as cpu:
        w.matmul(x)
    w.checked = False
    with pytest.raises(FormatError) as gpu:
        runtime.matmul(w, x)
    assert str(gpu.value) == str(cpu.value)


def test_bad_rows_raise_the_cpu_runtimes_error(runtime):
    """A ternary row one codeword short: the first product raises the stream coder's
    error (as the CPU runtime does); padding bits set in a packed row likewise."""
    t = qmoefmt.open(paths.store("switch-tiny.qmoe"))[
        "encoder.block.1.layer.1.mlp.experts.expert_0.wo.weight"]
    w = t.runtime()
    short = type(w)(w.where, w.shape, w.codes[:-1], np.minimum(w.offsets, w.codes.size - 1),
                    w.lo, w.hi, w.dictionary)
    x = np.ones((1, w.shape[1]), np.float32)
    with pytest.raises(FormatError) as cpu:
        short.matmul(x)
    with pytest.raises(FormatError) as gpu:
        runtime.matmul(short, x)
    assert str(gpu.value) == str(cpu.value)

    k = qmoefmt.open(paths.store("edge-3bit-g16.qmoe"))["edge.odd"].runtime()
    q = k.q.copy()
    q[2, -1] |= 0x80
    dirty = type(k)(k.where, k.shape, q, k.scales, k.zeros, k.bits, k.group_size)
    with pytest.raises(FormatError) as cpu:
        dirty.matmul(x[:, :1].repeat(k.shape[1], 1))
    with pytest.raises(FormatError) as gpu:
        runtime.matmul(dirty, x[:, :1].repeat(k.shape[1], 1))
    assert str(gpu.value) == str(cpu.value)


def random_dictionary(n_states: int, k: int, seed: int):
    """Valid §5.6 tables of any number of states (up to the spec's 64): the kernels take
    S <= 8 by a warp scan of byte-packed state maps, S <= 16 of nibble-packed ones, and
    more by walking the chain."""
    rng = np.random.default_rng(seed)
    shape = (n_states, 1 << 16)
    nnz = rng.integers(0, k + 1, shape)
    pos = np.cumsum(rng.integers(1, 4, shape + (k,)), axis=2) - 1
    used = np.arange(k) < nnz[..., None]
    last = np.take_along_axis(pos, np.maximum(nnz - 1, 0)[..., None], axis=2)[..., 0]
    length = np.where(nnz > 0, last + 1, 1) + rng.integers(0, 6, shape)
    d = Dictionary(kind="random", params={"seed": seed}, length=length.astype(np.uint16),
                   next_state=rng.integers(0, n_states, shape).astype(np.uint8),
                   nnz=nnz.astype(np.uint8), nz_pos=np.where(used, pos, 0).astype(np.uint16),
                   nz_sym=np.where(used, rng.integers(1, 3, shape + (k,)), 0).astype(np.uint8))
    d.validate()
    return d


@pytest.mark.parametrize("n_states", [2, 3, 8, 9, 15, 16, 17, 64])
def test_state_chains_of_any_length(n_states):
    """Every row's status and symbols as the reference's, and products within fp32, for
    dictionaries on both sides of each state-map packing's limit."""
    d = random_dictionary(n_states, 3, n_states)
    rng = np.random.default_rng(n_states)
    rows, cols = 16, 333
    tweaks = ["keep"] * 12 + ["drop", "append", "garbage", "keep"]   # keeps may end in a nonzero
    codes, rc = random_stream(rng, d, rows, cols, tweaks)
    want, want_status = reference_symbols(codes, rc, cols, d)
    ok = want_status == 0
    assert ok.sum() >= 3
    offsets = row_offsets(rc, codes.size, cols)
    out = np.full((rows, cols), 7, np.int8)
    status = np.zeros(rows, np.uint8)
    cuda_host.OPS.ternary_symbols(codes, offsets, cols, d, out, status)
    assert status.tolist() == want_status.tolist()
    assert np.array_equal(out[ok], want[ok])
    lo, hi = scales(rng, rows)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    y = np.full((3, rows), np.nan, np.float32)
    cuda_host.OPS.ternary_matmul(codes, offsets, cols, d, lo, hi, x, y, status)
    assert_matmul_close(y[:, ok], x, reference_values(want, lo, hi)[ok])
