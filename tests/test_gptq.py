import warnings

import pytest
import torch

from qmoefmt.quantize import gptq
from qmoefmt.quantize import grids as qz

GRIDS = ["ternary", 2, 3, 4]


def _run(grid, W, H, group_size=None, **options):
    if grid == "ternary":
        return gptq.gptq_ternary(W, H, **options)
    return gptq.gptq_kbit(W, H, grid, group_size, **options)


def _rtn(grid, W, group_size=None):
    if grid == "ternary":
        return qz.ternary_dequant(*qz.ternary_rtn(W))
    return qz.kbit_dequant(*qz.kbit_rtn(W, grid, group_size), group_size)


def _problem(E=3, rows=24, cols=160, tokens=600, seed=0):
    """Random weights and correlated inputs (a random mixing plus a shared offset)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    X = torch.randn(E, tokens, cols, generator=g) @ mix + 0.5 * torch.randn(E, 1, cols, generator=g)
    return W, X, X.transpose(1, 2) @ X


def _output_error(W, Q, X):
    return ((W - Q) @ X.transpose(-1, -2)).norm(dim=(-2, -1)) / (W @ X.transpose(-1, -2)).norm(dim=(-2, -1))


def _reference_gptq(W, H, quantize_column, blocksize=128, percdamp=0.1):
    """The reference GPTQ (one matrix, cholesky -> cholesky_inverse -> cholesky)."""
    W, H = W.clone(), H.clone()
    dead = torch.diag(H) == 0
    damp = percdamp * torch.mean(torch.diag(H))
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.eye(H.shape[0])
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            q = quantize_column(W1[:, i], i1 + i)
            Q[:, i1 + i] = q
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


@pytest.mark.parametrize("grid", GRIDS)
def test_gptq_beats_rtn_on_output_error(grid):
    W, X, H = _problem()
    W_before, H_before = W.clone(), H.clone()
    result = _run(grid, W, H)
    assert torch.equal(W, W_before) and torch.equal(H, H_before)
    assert result.status == ["gptq"] * 3
    gptq_err = _output_error(W, result.dequantized, X)
    rtn_err = _output_error(W, _rtn(grid, W), X)
    assert (gptq_err < 0.9 * rtn_err).all(), (gptq_err, rtn_err)


def test_gptq_beats_rtn_with_groups():
    W, X, H = _problem()
    result = gptq.gptq_kbit(W, H, 2, group_size=32)
    assert (_output_error(W, result.dequantized, X) < _output_error(W, _rtn(2, W, 32), X)).all()


def test_matches_reference_implementation():
    W, _, H = _problem(E=2, cols=200)
    lo, hi = qz.ternary_grid(W)
    result = gptq.gptq_ternary(W, H)
    for e in range(2):
        ref = _reference_gptq(W[e], H[e], lambda w, c: qz.ternary_values(qz.ternary_symbols(w, lo[e], hi[e]), lo[e], hi[e]))
        assert (ref != result.dequantized[e]).float().mean() < 1e-3

    scales, zeros = qz.kbit_grid(W, 3, 64)
    result = gptq.gptq_kbit(W, H, 3, 64)
    for e in range(2):

        def column(w, c, e=e):
            s, z = scales[e, :, c // 64], zeros[e, :, c // 64]
            return qz.kbit_values(qz.kbit_codes(w, s, z, 3), s, z)

        assert (_reference_gptq(W[e], H[e], column) != result.dequantized[e]).float().mean() < 1e-3


@pytest.mark.parametrize("grid", GRIDS)
def test_codes_decode_to_dequantized_on_original_grid(grid):
    W, _, H = _problem(E=2)
    result = _run(grid, W, H, group_size=64)
    if grid == "ternary":
        lo, hi = qz.ternary_grid(W)
        assert torch.equal(result.lo, lo) and torch.equal(result.hi, hi)
        assert result.codes.dtype == torch.int8
        assert torch.equal(qz.ternary_dequant(result.codes, result.lo, result.hi), result.dequantized)
    else:
        scales, zeros = qz.kbit_grid(W, grid, 64)
        assert torch.equal(result.scales, scales) and torch.equal(result.zeros, zeros)
        assert result.codes.dtype == torch.uint8
        deq = qz.kbit_dequant(result.codes, result.scales, result.zeros, 64)
        assert torch.equal(deq, result.dequantized)


@pytest.mark.parametrize("grid", ["ternary", 3])
def test_batched_equals_per_expert(grid):
    W, _, H = _problem(E=4, cols=150)
    batched = _run(grid, W, H)
    for e in range(4):
        single = _run(grid, W[e], H[e])
        assert single.dequantized.shape == W[e].shape
        assert (single.codes != batched.codes[e]).float().mean() < 1e-3


@pytest.mark.parametrize("grid", GRIDS)
def test_act_order_is_gptq_on_permuted_columns(grid):
    W, X, H = _problem(E=2, cols=96)
    result = _run(grid, W, H, group_size=32, act_order=True)
    # The same as plain GPTQ on columns sorted by decreasing diag(H), un-permuted,
    # except that the grid (and its groups) stay those of the original columns.
    assert (_output_error(W, result.dequantized, X) < _output_error(W, _rtn(grid, W, 32), X)).all()
    for e in range(2):
        order = torch.argsort(H[e].diagonal(), descending=True, stable=True)
        inverse = torch.argsort(order)
        lo, hi = qz.ternary_grid(W[e])
        scales, zeros = qz.kbit_grid(W[e], grid if grid != "ternary" else 2, 32)

        def column(w, c, order=order, lo=lo, hi=hi, scales=scales, zeros=zeros):
            if grid == "ternary":
                return qz.ternary_values(qz.ternary_symbols(w, lo, hi), lo, hi)
            s, z = scales[:, order[c] // 32], zeros[:, order[c] // 32]
            return qz.kbit_values(qz.kbit_codes(w, s, z, grid), s, z)

        ref = _reference_gptq(W[e][:, order], H[e][order][:, order], column)[:, inverse]
        assert (ref != result.dequantized[e]).float().mean() < 1e-3


def test_dead_inputs():
    W, X, _ = _problem(E=2)
    dead = [3, 50, 159]
    X[:, :, dead] = 0
    H = X.transpose(1, 2) @ X
    for grid, act_order in [(g, a) for g in GRIDS for a in (False, True)]:
        result = _run(grid, W, H, act_order=act_order)
        assert result.status == ["gptq", "gptq"]
        assert torch.isfinite(result.dequantized).all()
        # Dead inputs never contribute, so their weights are zeroed before quantizing.
        assert (result.dequantized[:, :, dead] == 0).all()
        assert (_output_error(W, result.dequantized, X) < _output_error(W, _rtn(grid, W), X)).all()


@pytest.mark.parametrize("bad", ["nan", "negative"])
def test_cholesky_failure_falls_back_to_rtn(bad):
    W, _, H = _problem()
    H = H.clone()
    H[1] = float("nan") if bad == "nan" else -H[1]
    for grid in GRIDS:
        with pytest.warns(RuntimeWarning, match="expert 1"):
            result = _run(grid, W, H)
        assert result.status == ["gptq", "rtn-cholesky-failed", "gptq"]
        assert torch.equal(result.dequantized[1], _rtn(grid, W[1]))
        assert not torch.equal(result.dequantized[0], _rtn(grid, W[0]))


def test_experts_without_tokens_use_rtn():
    W, _, H = _problem()
    H = H.clone()
    H[0] = 0
    H[2] = 0
    for grid in GRIDS:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = _run(grid, W, H)
        assert result.status == ["rtn-no-tokens", "gptq", "rtn-no-tokens"]
        assert torch.equal(result.dequantized[0], _rtn(grid, W[0]))
        assert torch.equal(result.dequantized[2], _rtn(grid, W[2]))


def test_single_column_is_rtn():
    W, _, H = _problem(E=1, rows=5, cols=1)
    assert torch.equal(gptq.gptq_ternary(W, H).dequantized, _rtn("ternary", W))


def test_block_size_does_not_change_result():
    # Lazy batch updates only reorder the arithmetic.
    W, _, H = _problem(E=2, cols=70)
    a = gptq.gptq_kbit(W, H, 4, block_size=16).codes
    b = gptq.gptq_kbit(W, H, 4, block_size=128).codes
    assert (a != b).float().mean() < 1e-3


def test_experts_without_columns():
    result = gptq.gptq_kbit(torch.zeros(2, 3, 0), torch.zeros(2, 0, 0), 3)
    assert result.codes.shape == result.dequantized.shape == (2, 3, 0)
    assert result.status == ["rtn-no-tokens"] * 2


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        gptq.gptq_ternary(torch.zeros(2, 4, 8), torch.zeros(2, 4, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    W, _, H = _problem()
    cpu = gptq.gptq_ternary(W, H)
    gpu = gptq.gptq_ternary(W.cuda(), H.cuda())
    assert gpu.dequantized.device.type == "cuda"
    assert (gpu.codes.cpu() != cpu.codes).float().mean() < 1e-3
