"""The Tensor API beyond decode(): row ranges, torch tensors, the fused matmul."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qmoefmt
from qmoefmt.errors import FormatError, NotApplicableError
from qmoefmt.format.constants import FLOAT_DTYPES
from qmoefmt.testing import paths
from qmoefmt.testing.reference import assert_matmul_close


def tensors(store: str):
    st_ = qmoefmt.open(paths.store(store))
    return [st_[n] for n in st_]


@pytest.mark.parametrize("store", paths.STORES)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_row_ranges_decode_like_the_whole(store, data):
    """decode(rows=) and symbols(rows=) give those rows of the [prod(shape[:-1]), cols]
    view, for every codec, whatever the range (empty, negative, past the end)."""
    for t in tensors(store):
        n, cols = t.rows_cols
        a = data.draw(st.integers(-n - 2, n + 2))
        b = data.draw(st.integers(-n - 2, n + 2))
        whole = t.decode().reshape(n, cols)
        got = t.decode(rows=slice(a, b))
        assert got.shape == whole[a:b].shape and got.dtype == whole.dtype
        # float32 but for dense integer and bool tensors, which keep their dtype (spec §7)
        assert whole.dtype == (np.float32 if t.unit.expert or t.dtype in FLOAT_DTYPES
                               else np.dtype(t.dtype))
        assert got.tobytes() == whole[a:b].tobytes(), t.name
        if t.unit.expert:
            assert np.array_equal(t.symbols(rows=slice(a, b)), t.symbols().reshape(n, cols)[a:b])


def test_row_ranges_take_step_one_slices_only():
    t = tensors("switch-tiny.qmoe")[0]
    with pytest.raises(ValueError, match="step 1"):
        t.decode(rows=slice(0, 4, 2))


@pytest.mark.parametrize("kind", ["qmoe-2023", "golomb"])
def test_a_bad_row_is_named_by_its_index_in_the_tensor(kind):
    """A damaged row found while decoding a range is reported by its row number in the
    tensor, not in the range; the rows before it still decode."""
    from qmoefmt.dictionaries import build_golomb, build_qmoe2023
    from qmoefmt.dictionaries.stream import decode_symbols, encode
    d = build_qmoe2023() if kind == "qmoe-2023" else build_golomb(0.8808)
    sym = np.random.default_rng(1).choice(3, size=(6, 300), p=[0.88, 0.06, 0.06]).astype(np.int8)
    codes, rc = encode(sym, d)
    ends = np.cumsum(rc.astype(np.int64))
    codes = np.delete(codes, ends[3] - 1)          # row 3 loses its last codeword
    rc = rc.copy()
    rc[3] -= 1
    with pytest.raises(FormatError, match="row 3: codewords expand to fewer symbols"):
        decode_symbols(codes, rc, 300, d, "t", rows=slice(2, 6))
    assert np.array_equal(decode_symbols(codes, rc, 300, d, "t", rows=slice(1, 3)), sym[1:3])


def exact_dtype(t) -> str:
    """Where every decoded value fits: ternary values are the bf16 scales themselves;
    k-bit ones, scale * (level - zero), need float32."""
    if not t.unit.expert or t.dtype in ("float32", "float64"):
        return t.dtype
    return t.dtype if t.codec == "qmoe.ternary-dict16" and t.dtype == "bfloat16" else "float32"


@pytest.mark.parametrize("store", ["switch-tiny.qmoe", "switch-tiny-2bit.qmoe",
                                   "switch-tiny-2bit-dict16.qmoe", "edge.qmoe"])
def test_torch_tensors_hold_the_values_exactly(store):
    for t in tensors(store):
        got = t.torch()
        assert got.dtype == getattr(torch, exact_dtype(t)) and t.value_dtype == exact_dtype(t)
        assert tuple(got.shape) == t.shape
        want = np.asarray(t.decode() if t.unit.expert else t.numpy(), np.float64)
        assert np.array_equal(got.double().numpy(), want), t.name
        assert t.torch(dtype=torch.float64).dtype == torch.float64


def test_unpack_keeps_kbit_values_exact(tmp_path):
    """2-bit experts of a bf16 checkpoint unpack to float32: bf16 would round them."""
    from safetensors.numpy import load_file

    from qmoefmt.io.unpack import unpack
    st_ = qmoefmt.open(paths.store("switch-tiny-2bit.qmoe"))
    unpack(st_, tmp_path / "u.safetensors")
    out = load_file(str(tmp_path / "u.safetensors"))
    for t in st_.tensors():
        if t.unit.expert:
            assert out[t.name].dtype == np.float32 and np.array_equal(out[t.name], t.decode())


@pytest.mark.parametrize("store", ["switch-tiny.qmoe", "switch-tiny-qmoe2023.qmoe", "edge.qmoe",
                                   "edge-auto.qmoe", "switch-tiny-2bit.qmoe", "edge-3bit-g16.qmoe",
                                   "switch-tiny-2bit-dict16.qmoe"])
def test_matmul_of_every_expert_codec(store):
    """Every 2-D expert tensor (ternary, uint-packed, uint-dict16), at several batch
    sizes, one vector, and bfloat16 input (widened exactly)."""
    rng = np.random.default_rng(0)
    for t in tensors(store):
        if not t.unit.expert or len(t.shape) != 2:
            continue
        w = t.decode()
        for batch in (1, 3, 16):
            x = rng.standard_normal((batch, t.shape[1])).astype(np.float32)
            assert_matmul_close(t.matmul(x), x, w)
        v = rng.standard_normal(t.shape[1]).astype(np.float32)
        assert t.matmul(v).shape == (t.shape[0],)
        assert_matmul_close(t.matmul(v)[None], v[None], w)
        vb = v.astype(ml_dtypes.bfloat16)
        assert_matmul_close(t.matmul(vb)[None], vb.astype(np.float32)[None], w)


def test_matmul_refusals():
    dense = next(x for x in tensors("switch-tiny.qmoe") if x.codec == "qmoe.dense")
    with pytest.raises(NotApplicableError, match="matmul"):
        dense.matmul(np.zeros(dense.shape[-1], np.float32))
    t = tensors("switch-tiny.qmoe")
    ternary = next(x for x in t if x.codec == "qmoe.ternary-dict16")
    with pytest.raises(ValueError, match="columns"):
        ternary.matmul(np.zeros((1, ternary.shape[1] + 1), np.float32))
    edge = qmoefmt.open(paths.store("edge.qmoe"))
    three_d = next(edge[n] for n in edge if len(edge[n].shape) == 3 and edge[n].unit.expert)
    with pytest.raises(NotApplicableError, match="2-D"):
        three_d.matmul(np.zeros(three_d.shape[-1], np.float32))


@pytest.mark.parametrize("store", ["switch-tiny-2bit-dict16.qmoe", "edge-2bit-g16-dict16.qmoe"])
def test_dict16_runtime_weights_check_once_then_multiply_fused(store):
    """The first product decodes and checks the escapes against the stream; later ones
    (fused where a row has one group) give the same result within fp32 rounding."""
    rng = np.random.default_rng(1)
    for t in tensors(store):
        if t.codec != "qmoe.uint-dict16" or len(t.shape) != 2:
            continue
        w, dense = t.runtime(), t.decode()
        for batch in (1, 5, 16):
            x = rng.standard_normal((batch, t.shape[1])).astype(np.float32)
            assert_matmul_close(w.matmul(x), x, dense)
        assert w.checked


def test_runtime_weights_are_built_once_and_copies_rebuild_derived_state():
    t = next(x for x in tensors("switch-tiny-2bit-dict16.qmoe") if x.codec == "qmoe.uint-dict16")
    assert t.runtime() is t.runtime()
    w = t.runtime()
    x = np.random.default_rng(2).standard_normal((3, t.shape[1])).astype(np.float32)
    w.matmul(x)
    w.matmul(x)                      # checked, then fused: the corrections exist
    assert w._corrections is not None
    c = w.copy(np.array)
    assert c.checked and c._corrections is None
    assert_matmul_close(c.matmul(x), x, t.decode())
