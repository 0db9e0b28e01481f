"""GPTQ for batches of experts, onto the ternary or the k-bit grid.

The algorithm is the reference GPTQ (Frantar et al. 2022): quantize columns in
order, spreading each column's error over the not yet quantized columns through
the upper Cholesky factor of the inverse Hessian, with lazy updates in blocks of
``block_size`` columns.  As in QMoE, it runs on a batch of experts of one layer at
once (``W [E, rows, cols]``, ``H [E, cols, cols]``, H = sum over tokens of x x^T)
so many small experts share each kernel launch / BLAS call, and the grid comes
from the original weights, before any GPTQ update.

Robustness (QMoE): dampening ``damp * mean(diag H)`` per expert; dead inputs
(zero diagonal) get ``H_ii = 1`` and a zero weight column; an expert whose
Cholesky factorization fails is rounded to nearest with a warning; an expert
without tokens (H all zero) is rounded to nearest.  RTN experts are run through
the same loop with an identity Hessian, for which GPTQ reduces to exactly RTN.

Everything runs on the device of the inputs (CPU or CUDA), in float32.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from qmoefmt import quantizers as qz

STATUS_GPTQ = "gptq"
STATUS_NO_TOKENS = "rtn-no-tokens"
STATUS_CHOLESKY_FAILED = "rtn-cholesky-failed"

# Quantizes column ``col`` of all experts: w [E, rows] -> (codes, float32 values).
ColumnQuantizer = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class GPTQResult:
    """Quantized experts.  ``codes`` are ternary symbols (int8 0/1/2, with ``lo``/``hi``
    ``[E, rows]``) or k-bit codes (uint8, with ``scales``/``zeros`` ``[E, rows, groups]``);
    ``dequantized`` is the float32 weight ``[E, rows, cols]`` they decode to."""

    codes: torch.Tensor
    dequantized: torch.Tensor
    status: list[str]
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None


def _invert_lower(L: torch.Tensor) -> torch.Tensor:
    """Inverse of batched lower-triangular ``L`` by recursive 2x2 blocking.

    Mostly matrix products, hence several times faster than a triangular solve
    against the identity (which does not know that the result is triangular).
    """
    n = L.shape[-1]
    if n <= 128:
        eye = torch.eye(n, dtype=L.dtype, device=L.device).expand_as(L)
        return torch.linalg.solve_triangular(L, eye, upper=False)
    h = n // 2
    a_inv = _invert_lower(L[..., :h, :h])
    c_inv = _invert_lower(L[..., h:, h:])
    out = torch.zeros_like(L)
    out[..., :h, :h] = a_inv
    out[..., h:, h:] = c_inv
    out[..., h:, :h] = -c_inv @ (L[..., h:, :h] @ a_inv)
    return out


def _inverse_cholesky_upper(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper ``U`` with ``U^T U = H^-1`` for each matrix of the batch, and a per-matrix ok flag.

    The reference computes it as cholesky(cholesky_inverse(cholesky(H)), upper).
    Factoring the index-reversed H instead gives ``H = R R^T`` with R upper, so
    ``U = R^-1``: one factorization and one triangular inverse instead of two
    factorizations and a full inverse, about half the work.
    """
    flipped, info = torch.linalg.cholesky_ex(H.flip(-2, -1))
    ok = (info == 0) & torch.isfinite(flipped).all(dim=-1).all(dim=-1)
    flipped[~ok] = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    U = _invert_lower(flipped).flip(-2, -1)
    ok &= torch.isfinite(U).all(dim=-1).all(dim=-1)
    return U, ok


def _prepare_hessian(W: torch.Tensor, H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Damped, dead-input-fixed copy of H, weights with dead columns zeroed, and statuses."""
    cols = H.shape[-1]
    no_tokens = (H == 0).all(dim=-1).all(dim=-1)
    H = H.clone()  # modified in place below: the batch of Hessians can be large
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = (diag == 0) & ~no_tokens[:, None]
    # A dead input is always zero, so its row and column of H are zero and it
    # decouples: any positive diagonal works, and its weights never matter.
    W = W.masked_fill(dead[:, None, :], 0.0)
    damping = damp * diag.mean(dim=-1, keepdim=True)
    diag.add_(dead.to(H.dtype) + damping)
    # Identity Hessian: the GPTQ loop then leaves the weights alone, i.e. plain RTN.
    H[no_tokens] = torch.eye(cols, dtype=H.dtype, device=H.device)
    status = [STATUS_NO_TOKENS if n else STATUS_GPTQ for n in no_tokens.tolist()]
    return W, H, status


def _gptq(W: torch.Tensor, H: torch.Tensor, quantize: ColumnQuantizer, block_size: int, damp: float):
    if W.dim() != 3 or H.dim() != 3 or H.shape != (W.shape[0], W.shape[2], W.shape[2]):
        raise ValueError(f"expected W [E, rows, cols] and H [E, cols, cols], got {tuple(W.shape)} and {tuple(H.shape)}")
    original = W.to(torch.float32)
    W, H, status = _prepare_hessian(original, H.to(torch.float32), damp)
    U, ok = _inverse_cholesky_upper(H)
    del H
    for e in torch.nonzero(~ok).flatten().tolist():
        warnings.warn(
            f"GPTQ: Cholesky factorization failed for expert {e}; using round-to-nearest",
            RuntimeWarning,
            stacklevel=3,
        )
        status[e] = STATUS_CHOLESKY_FAILED
    rtn = torch.tensor([s != STATUS_GPTQ for s in status], device=W.device)
    U[rtn] = torch.eye(U.shape[-1], dtype=U.dtype, device=U.device)
    W[rtn] = original[rtn]

    E, rows, cols = W.shape
    codes = None
    values = torch.empty_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, :, i1:i2].clone()
        U1 = U[:, i1:i2, i1:i2]
        err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            w = W1[:, :, i]
            code, value = quantize(w, i1 + i)
            if codes is None:
                codes = torch.empty((E, rows, cols), dtype=code.dtype, device=W.device)
            codes[:, :, i1 + i] = code
            values[:, :, i1 + i] = value
            err = (w - value) / U1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * U1[:, None, i, i:]
            err1[:, :, i] = err
        # Lazy batch update: the rest of the matrix sees this block's errors at once.
        W[:, :, i2:] -= err1 @ U[:, i1:i2, i2:]
    return codes, values, status


def _batched(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    single = W.dim() == 2
    return (W[None], H[None], True) if single else (W, H, False)


def gptq_ternary(
    W: torch.Tensor, H: torch.Tensor, *, block_size: int = 128, damp: float = 0.1
) -> GPTQResult:
    """GPTQ onto the per-row ternary grid {lo, 0, hi} of the original ``W``.

    ``W`` is ``[E, rows, cols]`` (or one ``[rows, cols]`` matrix) and ``H`` the matching
    ``[E, cols, cols]`` Hessians; results keep the batch dimension only if the input had it.
    """
    W, H, single = _batched(torch.as_tensor(W), torch.as_tensor(H))
    lo, hi = qz.ternary_grid(W)

    def quantize(w: torch.Tensor, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        symbols = qz.ternary_symbols(w, lo, hi)
        return symbols, qz.ternary_values(symbols, lo, hi)

    codes, values, status = _gptq(W, H, quantize, block_size, damp)
    if single:
        return GPTQResult(codes[0], values[0], status, lo=lo[0], hi=hi[0])
    return GPTQResult(codes, values, status, lo=lo, hi=hi)


def gptq_kbit(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    *,
    block_size: int = 128,
    damp: float = 0.1,
) -> GPTQResult:
    """GPTQ onto the asymmetric ``bits``-bit grid (per row or per ``group_size`` columns)
    of the original ``W``; shapes as in :func:`gptq_ternary`."""
    W, H, single = _batched(torch.as_tensor(W), torch.as_tensor(H))
    scales, zeros = qz.kbit_grid(W, bits, group_size)
    size = W.shape[-1] if group_size is None else group_size

    def quantize(w: torch.Tensor, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = scales[:, :, col // size], zeros[:, :, col // size]
        q = qz.kbit_codes(w, scale, zero, bits)
        return q, qz.kbit_values(q, scale, zero)

    codes, values, status = _gptq(W, H, quantize, block_size, damp)
    if single:
        return GPTQResult(codes[0], values[0], status, scales=scales[0], zeros=zeros[0])
    return GPTQResult(codes, values, status, scales=scales, zeros=zeros)
