import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qmoefmt.codecs.kbit_grid import dequantize
from qmoefmt.format import bf16
from qmoefmt.quantize import grids as qz


def _bf16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _ternary_spec(W: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The codec's definition, written independently with numpy and ml_dtypes."""
    lo = _bf16(np.minimum(W.min(axis=1), 0))
    hi = _bf16(np.maximum(W.max(axis=1), 0))
    sym = np.zeros(W.shape, dtype=np.int8)
    sym[W < (lo / np.float32(2))[:, None]] = 1
    sym[W > (hi / np.float32(2))[:, None]] = 2
    return sym, lo, hi


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@st.composite
def matrices(draw) -> np.ndarray:
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 40))
    W = draw(hnp.arrays(np.float32, (rows, cols), elements=finite))
    zero_rows = draw(st.lists(st.integers(0, rows - 1), max_size=2))
    W[zero_rows] = 0
    return W


@settings(max_examples=150, deadline=None)
@given(matrices())
def test_ternary_rtn_matches_codec_definition(W):
    symbols, lo, hi = qz.ternary_rtn(W)
    sym_ref, lo_ref, hi_ref = _ternary_spec(W)
    assert symbols.dtype == torch.int8
    assert set(np.unique(symbols.numpy())) <= {0, 1, 2}
    np.testing.assert_array_equal(symbols.numpy(), sym_ref)
    np.testing.assert_array_equal(lo.numpy(), lo_ref)
    np.testing.assert_array_equal(hi.numpy(), hi_ref)
    assert (lo <= 0).all() and (hi >= 0).all()


@settings(max_examples=150, deadline=None)
@given(matrices())
def test_ternary_dequant_error_bound(W):
    symbols, lo, hi = qz.ternary_rtn(W)
    deq = qz.ternary_dequant(symbols, lo, hi)
    assert deq.dtype == torch.float32
    # Every weight lies within half a step of its value; bf16 rounding of lo/hi adds 2^-8.
    half_step = 0.5 * torch.maximum(-lo, hi)[:, None] * (1 + 2**-7)
    assert ((torch.from_numpy(W) - deq).abs() <= half_step + 1e-30).all()
    expected = torch.where(symbols == 1, lo[:, None], torch.where(symbols == 2, hi[:, None], 0.0))
    assert torch.equal(deq, expected)


def test_ternary_rtn_matches_the_packer():
    from qmoefmt.quantize import rtn as ternary

    W = torch.randn(16, 300).numpy()
    W[3] = 0
    W[5] = np.abs(W[5])
    symbols, lo, hi = qz.ternary_rtn(W)
    packer_symbols, packer_scales, _ = ternary.quantize_rtn(W)
    packer_lo, packer_hi = bf16.to_float32(packer_scales).T
    np.testing.assert_array_equal(symbols.numpy(), packer_symbols)
    np.testing.assert_array_equal(lo.numpy(), packer_lo)
    np.testing.assert_array_equal(hi.numpy(), packer_hi)


def test_kbit_dequant_matches_the_codec():

    W = torch.randn(8, 40)
    q, scales, zeros = qz.kbit_rtn(W, 3, group_size=16)
    codec = dequantize(q.numpy(), scales.numpy(), zeros.numpy(), 16)
    np.testing.assert_array_equal(qz.kbit_dequant(q, scales, zeros, 16).numpy(), codec)


def test_ternary_zero_rows_and_single_column():
    W = np.array([[0.0], [3.0], [-2.0], [0.0]], dtype=np.float32)
    symbols, lo, hi = qz.ternary_rtn(W)
    assert symbols[:, 0].tolist() == [0, 2, 1, 0]
    assert lo.tolist() == [0.0, 0.0, -2.0, 0.0] and hi.tolist() == [0.0, 3.0, 0.0, 0.0]
    assert qz.ternary_dequant(symbols, lo, hi)[:, 0].tolist() == [0.0, 3.0, -2.0, 0.0]


def test_ternary_thresholds_are_strict_halves():
    W = np.array([[-4.0, -2.0, -1.99, 0.0, 1.0, 1.01, 2.0]], dtype=np.float32)
    symbols, lo, hi = qz.ternary_rtn(W)
    assert (lo.item(), hi.item()) == (-4.0, 2.0)
    assert symbols[0].tolist() == [1, 0, 0, 0, 0, 2, 2]


def test_ternary_batched_matches_per_matrix():
    W = torch.randn(3, 5, 7)
    symbols, lo, hi = qz.ternary_rtn(W)
    for e in range(3):
        s, l, h = qz.ternary_rtn(W[e])
        assert torch.equal(symbols[e], s) and torch.equal(lo[e], l) and torch.equal(hi[e], h)


@settings(max_examples=150, deadline=None)
@given(matrices(), st.sampled_from(qz.KBIT_BITS), st.sampled_from([None, 1, 3, 8, 128]))
def test_kbit_rtn_properties(W, bits, group_size):
    q, scales, zeros = qz.kbit_rtn(W, bits, group_size)
    rows, cols = W.shape
    groups = qz.n_groups(cols, group_size)
    assert q.dtype == torch.uint8 and q.shape == (rows, cols)
    assert scales.shape == zeros.shape == (rows, groups) and zeros.dtype == torch.uint8
    assert int(q.max()) <= 2**bits - 1 and int(zeros.max()) <= 2**bits - 1
    assert (scales > 0).all()
    np.testing.assert_array_equal(_bf16(scales.numpy()), scales.numpy())

    deq = qz.kbit_dequant(q, scales, zeros, group_size)
    scale = qz.expand_groups(scales, cols, group_size)
    padded = np.pad(W, ((0, 0), (0, groups * (group_size or cols) - cols)))
    grouped = padded.reshape(rows, groups, -1)
    span = np.maximum(grouped.max(-1), 0) - np.minimum(grouped.min(-1), 0)
    span = qz.expand_groups(torch.from_numpy(span), cols, group_size)
    # Half a step, plus what rounding the scale to bf16 can push the range end out.
    bound = 0.5 * scale + span * 2**-8 + 1e-6 * span
    assert ((torch.from_numpy(W) - deq).abs() <= bound).all()


def test_kbit_exact_on_grid_and_zero_preserved():
    W = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0, 0.0]])
    q, scales, zeros = qz.kbit_rtn(W, 2)
    assert scales.item() == pytest.approx(4 / 3, rel=2**-8)
    deq = qz.kbit_dequant(q, scales, zeros)
    assert deq[0, 0] == 0 and deq[0, 5] == 0
    W0 = torch.zeros(2, 4)
    q, scales, zeros = qz.kbit_rtn(W0, 3, group_size=2)
    assert (scales == 1).all() and (zeros == 0).all() and (q == 0).all()


def test_kbit_group_size_covering_row_equals_per_row():
    W = torch.randn(4, 10)
    per_row = qz.kbit_rtn(W, 4)
    one_group = qz.kbit_rtn(W, 4, group_size=10)
    for a, b in zip(per_row, one_group):
        assert torch.equal(a, b)


def test_kbit_groups_are_independent():
    W = torch.randn(3, 10)
    W[:, 8:] *= 1000  # a wide last (partial) group must not coarsen the others
    q, scales, zeros = qz.kbit_rtn(W, 4, group_size=4)
    q_head, s_head, z_head = qz.kbit_rtn(W[:, :8], 4, group_size=4)
    assert torch.equal(q[:, :8], q_head) and torch.equal(scales[:, :2], s_head)


def test_kbit_codes_formula():
    W = torch.tensor([[-0.75, -0.2, 0.1, 0.5, 1.3]])
    q, scales, zeros = qz.kbit_rtn(W, 3)
    scale = qz.bf16_round(torch.tensor(2.05 / 7))
    assert scales.item() == scale.item()
    zero = torch.clamp(torch.round(0.75 / scale), 0, 7)
    assert zeros.item() == zero.item()
    assert q[0].tolist() == torch.clamp(torch.round(W[0] / scale) + zero, 0, 7).tolist()


def test_bad_arguments():
    with pytest.raises(ValueError):
        qz.kbit_rtn(torch.ones(2, 2), 5)
    with pytest.raises(ValueError):
        qz.kbit_rtn(torch.ones(2, 2), 2, group_size=0)
    q, scales, zeros = qz.kbit_rtn(torch.ones(2, 8), 2, group_size=4)
    with pytest.raises(ValueError):
        qz.kbit_dequant(q, scales, zeros, group_size=None)


def test_rows_without_columns():
    W = torch.zeros(3, 0)
    symbols, lo, hi = qz.ternary_rtn(W)
    assert symbols.shape == (3, 0) and lo.tolist() == hi.tolist() == [0.0, 0.0, 0.0]
    q, scales, zeros = qz.kbit_rtn(W, 2)
    assert q.shape == (3, 0) and scales.tolist() == [[1.0]] * 3 and zeros.tolist() == [[0]] * 3
    assert qz.kbit_dequant(q, scales, zeros).shape == (3, 0)
    q, scales, zeros = qz.kbit_rtn(W, 2, group_size=4)
    assert scales.shape == zeros.shape == (3, 0)
