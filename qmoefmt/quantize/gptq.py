"""GPTQ for batches of experts, onto the ternary or the k-bit grid.

GPTQ (Frantar et al. 2022) quantizes the columns of ``W`` in order and feeds each
column's rounding error forward into the columns not yet quantized, weighted by
the Hessian ``H = sum over tokens of x x^T``.  As in QMoE it runs on a batch of
experts of one layer at once (``W [E, rows, cols]``, ``H [E, cols, cols]``) so
many small experts share each BLAS call, and the grid comes from the original
weights, before any update.

The reference propagates ``err_i = (w_i - q_i) / U_ii`` through ``U``, the upper
Cholesky factor of ``H^-1``, with lazy updates in blocks of 128 columns.  Summing
its updates gives ``W - Q = Err U``, i.e. ``Err = (W - Q) U^-1``, and ``U^-1 = R``
where ``H = R R^T`` with ``R`` upper triangular.  So the column GPTQ actually
quantizes is

    w'_j = w_j + sum_{i<j} (w_i - q_i) R_ij / R_jj

(the LDLQ form of GPTQ, Chee et al. 2023).  ``R`` is one Cholesky factorization
of the index-reversed ``H``: no inverse, no second factorization, a quarter of
the reference's O(cols^3) work, which dominates for experts with many columns.  Blocks are kept: each block of ``block_size`` columns receives the
feedback of all earlier blocks in one matrix product, then its columns are
quantized one by one with rank-1 updates inside the block.

Robustness (QMoE): dampening ``damp * mean(diag H)`` per expert; dead inputs
(zero diagonal) get ``H_ii = 1`` and a zero weight column; an expert whose
Cholesky factorization fails is rounded to nearest with a warning; an expert
without tokens (zero diagonal, hence H = 0) is rounded to nearest.  RTN experts
go through the same loop with an identity Hessian, for which there is no
feedback: plain RTN.  Optionally (``act_order``, not in QMoE) columns are taken
in order of decreasing ``diag(H)``.

Everything runs on the device of the inputs (CPU or CUDA), in float32.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..format.constants import GPTQ_DAMP
from . import grids as qz

STATUS_GPTQ = "gptq"
STATUS_NO_TOKENS = "rtn-no-tokens"
STATUS_CHOLESKY_FAILED = "rtn-cholesky-failed"

# Codes and float32 values of one column of every expert: (w [E, rows], col) -> (codes, values),
# where col [E] is the column's index in the original W of each expert.
ColumnQuantizer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class GPTQResult:
    """Quantized experts.  ``codes`` are ternary symbols (int8 0/1/2, with ``lo``/``hi``
    ``[E, rows]``) or k-bit codes (uint8, with ``scales``/``zeros`` ``[E, rows, groups]``);
    ``dequantized`` is the float32 weight ``[E, rows, cols]`` they decode to;
    ``status[e]`` is one of "gptq", "rtn-no-tokens", "rtn-cholesky-failed"."""

    codes: torch.Tensor
    dequantized: torch.Tensor
    status: list[str]
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None


def _feedback_matrix(H: torch.Tensor, damp: float, order: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``M^T`` where ``M = R / diag(R)`` (column-wise) and ``H + damping = R R^T``, R upper,
    for H's inputs taken in ``order`` ``[E, cols]`` (None: as they are).

    Also returns the dead inputs ``[E, cols]``, and per expert whether it has no
    tokens (every input dead) and whether the factorization succeeded.  Reversing the
    index order turns LAPACK's lower Cholesky factor into the upper one we need; the
    damping and dead-input fixes are applied to that reversed copy, so the caller's
    (possibly large) batch of Hessians is never copied twice: a column order is applied
    in that same copy, one expert at a time (a batched gather would need an index as
    large as H).
    """
    cols = H.shape[-1]
    eye = torch.eye(cols, dtype=H.dtype, device=H.device)
    diag = H.diagonal(dim1=-2, dim2=-1)
    if order is not None:
        diag = torch.take_along_dim(diag, order, dim=-1)
    dead = diag == 0
    # For a Hessian sum x x^T a zero diagonal means a zero matrix: no tokens at all.
    no_tokens = dead.all(dim=-1)
    dead &= ~no_tokens[:, None]
    # A dead input is always zero, so its row and column of H are zero and it
    # decouples: any positive diagonal works, and its weights never matter.
    fix = dead.to(H.dtype) + damp * diag.mean(dim=-1, keepdim=True)
    if order is None:
        flipped = H.flip(-2, -1)
    else:
        flipped = torch.empty_like(H)
        for h, rev, out in zip(H, order.flip(-1), flipped):
            torch.index_select(h.index_select(0, rev), 1, rev, out=out)
    flipped.diagonal(dim1=-2, dim2=-1).add_(fix.flip(-1))
    # Identity Hessian: no error feedback, i.e. plain RTN.
    flipped[no_tokens] = eye
    L, info = torch.linalg.cholesky_ex(flipped)
    del flipped
    # L is column-major, so L^T is the cheap row-major view: M^T = flip(L^T / diag(L) row-wise),
    # divided in place (L is ours) so that only the flip allocates.
    LT = L.mT
    LT.div_(L.diagonal(dim1=-2, dim2=-1).clone()[..., :, None])
    MT = LT.flip(-2, -1)
    del L, LT
    # A sum is finite only if every entry is (overflow counts as failure too).
    ok = (info == 0) & torch.isfinite(MT.sum(dim=(-2, -1)))
    MT[~ok] = eye
    return MT, dead, no_tokens, ok


def _gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    quantize: ColumnQuantizer,
    code_dtype: torch.dtype,
    block_size: int,
    damp: float,
    act_order: bool,
) -> tuple[torch.Tensor, list[str]]:
    """Codes [E, rows, cols] and per-expert statuses."""
    if W.dim() != 3 or H.dim() != 3 or H.shape != (W.shape[0], W.shape[2], W.shape[2]):
        raise ValueError(f"expected W [E, rows, cols] and H [E, cols, cols], got {tuple(W.shape)} and {tuple(H.shape)}")
    E, rows, cols = W.shape
    W = W.to(torch.float32)
    if act_order:
        # GPTQ's act-order: inputs with the most energy first, while many columns
        # are left to absorb their errors.  The grid stays that of the original W.
        order = torch.argsort(H.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)
        W = torch.take_along_dim(W, order[:, None, :], dim=2)
        MT, dead, no_tokens, ok = _feedback_matrix(H.to(torch.float32), damp, order)
    else:
        order = torch.arange(cols, device=W.device).expand(E, cols)
        MT, dead, no_tokens, ok = _feedback_matrix(H.to(torch.float32), damp)
    status = [STATUS_NO_TOKENS if n else STATUS_GPTQ for n in no_tokens.tolist()]
    for e in torch.nonzero(~ok).flatten().tolist():
        warnings.warn(
            f"GPTQ: Cholesky factorization failed for expert {e}; using round-to-nearest",
            RuntimeWarning,
            stacklevel=3,
        )
        status[e] = STATUS_CHOLESKY_FAILED
    rtn = torch.tensor([s != STATUS_GPTQ for s in status], device=W.device)
    MT[rtn] = torch.eye(MT.shape[-1], dtype=MT.dtype, device=MT.device)
    # RTN experts keep their original weights; the others lose their dead columns.
    W = W.masked_fill(dead[:, None, :] & ~rtn[:, None, None], 0.0)

    # Transposed so that a column is contiguous; column j is replaced by its
    # error w_j - q_j once quantized, which is what later columns feed on.
    WT = W.transpose(1, 2).contiguous()
    codes = torch.empty((E, cols, rows), dtype=code_dtype, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        feedback = torch.bmm(MT[:, i1:i2, :i1], WT[:, :i1])
        for j in range(i1, i2):
            codes[:, j], value = quantize(WT[:, j] + feedback[:, j - i1], order[:, j])
            err = WT[:, j] - value
            WT[:, j] = err
            feedback[:, j - i1 + 1 :].addcmul_(MT[:, j + 1 : i2, j, None], err[:, None, :])
    if act_order:
        codes = torch.empty_like(codes).scatter_(1, order[:, :, None].expand_as(codes), codes)
    return codes.transpose(1, 2).contiguous(), status


def _batched(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    W, H = torch.as_tensor(W), torch.as_tensor(H)
    single = W.dim() == 2
    return (W[None], H[None], True) if single else (W, H, False)


def gptq_ternary(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    block_size: int = 128,
    damp: float = GPTQ_DAMP,
    act_order: bool = False,
) -> GPTQResult:
    """GPTQ onto the per-row ternary grid {lo, 0, hi} of the original ``W``.

    ``W`` is ``[E, rows, cols]`` (or one ``[rows, cols]`` matrix) and ``H`` the matching
    ``[E, cols, cols]`` Hessians; results keep the batch dimension only if the input had it.
    ``act_order`` quantizes columns in order of decreasing ``diag(H)`` (QMoE does not).
    """
    W, H, single = _batched(W, H)
    lo, hi = qz.ternary_grid(W)

    def quantize(w: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        symbols = qz.ternary_symbols(w, lo, hi)
        return symbols, qz.ternary_values(symbols, lo, hi)

    codes, status = _gptq(W, H, quantize, torch.int8, block_size, damp, act_order)
    result = GPTQResult(codes, qz.ternary_dequant(codes, lo, hi), status, lo=lo, hi=hi)
    return _unbatch(result) if single else result


def gptq_kbit(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    *,
    block_size: int = 128,
    damp: float = GPTQ_DAMP,
    act_order: bool = False,
) -> GPTQResult:
    """GPTQ onto the asymmetric ``bits``-bit grid (per row or per ``group_size`` columns)
    of the original ``W``; shapes and options as in :func:`gptq_ternary`."""
    W, H, single = _batched(W, H)
    scales, zeros = qz.kbit_grid(W, bits, group_size)
    size = W.shape[-1] if group_size is None else group_size
    # Per-group parameters laid out like the transposed weights: [E, groups, rows].
    scale_t = scales.transpose(1, 2).contiguous()
    zero_t = zeros.transpose(1, 2).to(torch.float32).contiguous()
    experts = torch.arange(W.shape[0], device=W.device)

    def quantize(w: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        group = col // size
        scale, zero = scale_t[experts, group], zero_t[experts, group]
        q = qz.kbit_codes(w, scale, zero, bits)
        return q, qz.kbit_values(q, scale, zero)

    codes, status = _gptq(W, H, quantize, torch.uint8, block_size, damp, act_order)
    result = GPTQResult(codes, qz.kbit_dequant(codes, scales, zeros, group_size), status, scales=scales, zeros=zeros)
    return _unbatch(result) if single else result


def _unbatch(result: GPTQResult) -> GPTQResult:
    def first(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[0]

    return GPTQResult(
        first(result.codes),
        first(result.dequantized),
        result.status,
        lo=first(result.lo),
        hi=first(result.hi),
        scales=first(result.scales),
        zeros=first(result.zeros),
    )
