"""Quantization grids and round-to-nearest (RTN) for expert weight matrices.

Two grids, both per output row of ``W`` (float32, ``[..., rows, cols]``; leading
batch dimensions, e.g. experts, are allowed everywhere):

* Ternary (QMoE): values ``{lo, 0, hi}`` with ``lo = bf16(min(row.min(), 0))`` and
  ``hi = bf16(max(row.max(), 0))``; symbol 1 (lo) if ``w < lo/2``, 2 (hi) if
  ``w > hi/2``, else 0.  This must stay bit-identical to the codec.
* k-bit (MoQE, k in 2/3/4): asymmetric min-max grid per row or per group of
  ``group_size`` columns, ``value = scale * (q - zero)``.  The range always
  includes 0 so zero weights stay exact; scales are rounded to bfloat16 before
  use so the stored scale is the one the codes were computed with.

``bf16`` is round-to-nearest-even to bfloat16 and back (torch and ml_dtypes agree).
Inputs may be numpy arrays; results are torch tensors on the input's device.
"""

from __future__ import annotations

import numpy as np
import torch

from ..format.constants import KBIT_BITS

ArrayLike = torch.Tensor | np.ndarray

SYMBOL_ZERO, SYMBOL_LO, SYMBOL_HI = 0, 1, 2


def _float32(x: ArrayLike) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.float32)


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to the nearest bfloat16 (ties to even), returned as float32."""
    return x.to(torch.bfloat16).to(torch.float32)


# --- ternary -------------------------------------------------------------------------


def ternary_grid(W: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(lo, hi)``, float32 ``[..., rows]``, exactly representable in bfloat16."""
    W = _float32(W)
    if W.shape[-1] == 0:  # rows without columns: the range is just {0}
        zeros = W.new_zeros(W.shape[:-1])
        return zeros, zeros.clone()
    lo = bf16_round(torch.clamp(W.amin(dim=-1), max=0.0))
    hi = bf16_round(torch.clamp(W.amax(dim=-1), min=0.0))
    return lo, hi


def ternary_symbols(W: ArrayLike, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """int8 symbols of ``W`` on the grid; ``lo``/``hi`` must broadcast against ``W``."""
    W = _float32(W)
    # The two tests exclude each other: lo/2 <= 0 <= hi/2.
    return (W < lo / 2).to(torch.int8) * SYMBOL_LO + (W > hi / 2).to(torch.int8) * SYMBOL_HI


def ternary_values(symbols: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """float32 values of symbols; ``lo``/``hi`` must broadcast against ``symbols``."""
    zero = torch.zeros((), dtype=torch.float32, device=symbols.device)
    return torch.where(symbols == SYMBOL_LO, lo, torch.where(symbols == SYMBOL_HI, hi, zero))


def ternary_rtn(W: ArrayLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest ternary: ``(symbols int8 [..., rows, cols], lo, hi)``."""
    W = _float32(W)
    lo, hi = ternary_grid(W)
    return ternary_symbols(W, lo[..., None], hi[..., None]), lo, hi


def ternary_dequant(symbols: ArrayLike, lo: ArrayLike, hi: ArrayLike) -> torch.Tensor:
    """float32 weights ``[..., rows, cols]`` from symbols and per-row ``lo``/``hi``."""
    symbols = torch.as_tensor(symbols)
    return ternary_values(symbols, _float32(lo)[..., None], _float32(hi)[..., None])


# --- k-bit ---------------------------------------------------------------------------


def _check_bits(bits: int) -> int:
    if bits not in KBIT_BITS:
        raise ValueError(f"bits must be one of {KBIT_BITS}, got {bits}")
    return (1 << bits) - 1


def n_groups(cols: int, group_size: int | None) -> int:
    """Number of column groups per row (1 when ``group_size`` is None)."""
    if group_size is None:
        return 1
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    return -(-cols // group_size)


def expand_groups(per_group: torch.Tensor, cols: int, group_size: int | None) -> torch.Tensor:
    """Repeat ``[..., rows, groups]`` parameters to one per column ``[..., rows, cols]``."""
    if per_group.shape[-1] != n_groups(cols, group_size):
        raise ValueError(f"{per_group.shape[-1]} groups do not fit {cols} columns, group_size {group_size}")
    size = cols if group_size is None else group_size
    return per_group.repeat_interleave(size, dim=-1)[..., :cols]


def kbit_grid(W: ArrayLike, bits: int, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scales float32, zeros uint8)``, each ``[..., rows, groups]``.

    Scales are bfloat16-representable; an all-zero group gets scale 1.
    """
    maxq = _check_bits(bits)
    W = _float32(W)
    cols = W.shape[-1]
    groups = n_groups(cols, group_size)
    # max(.., 1): a row without columns still has its one (all-zero) group.
    size = max(cols, 1) if group_size is None else group_size
    # Zero padding is harmless: the range is widened to include 0 anyway.
    padded = torch.nn.functional.pad(W, (0, groups * size - cols))
    grouped = padded.reshape(*W.shape[:-1], groups, size)
    xmin = torch.clamp(grouped.amin(dim=-1), max=0.0)
    xmax = torch.clamp(grouped.amax(dim=-1), min=0.0)
    scale = bf16_round((xmax - xmin) / maxq)
    # Also catches ranges so small that the bf16 rounding flushes them to zero.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero.to(torch.uint8)


def kbit_codes(W: ArrayLike, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``clamp(round(w / scale) + zero, 0, 2^bits - 1)`` (ties to even).

    ``scale``/``zero`` must broadcast against ``W``.
    """
    maxq = _check_bits(bits)
    q = torch.round(_float32(W) / scale) + zero.to(torch.float32)
    return torch.clamp(q, 0, maxq).to(torch.uint8)


def kbit_values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float32 ``scale * (q - zero)``; ``scale``/``zero`` must broadcast against ``q``."""
    return scale * (q.to(torch.float32) - zero.to(torch.float32))


def kbit_rtn(
    W: ArrayLike, bits: int, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest k-bit: ``(q uint8 [..., rows, cols], scales, zeros)``."""
    W = _float32(W)
    scales, zeros = kbit_grid(W, bits, group_size)
    cols = W.shape[-1]
    scale = expand_groups(scales, cols, group_size)
    zero = expand_groups(zeros, cols, group_size)
    return kbit_codes(W, scale, zero, bits), scales, zeros


def kbit_dequant(
    q: ArrayLike, scales: ArrayLike, zeros: ArrayLike, group_size: int | None = None
) -> torch.Tensor:
    """float32 weights ``[..., rows, cols]`` from codes and per-group scales/zero points."""
    q = torch.as_tensor(q)
    cols = q.shape[-1]
    scale = expand_groups(_float32(scales), cols, group_size)
    zero = expand_groups(torch.as_tensor(zeros), cols, group_size)
    return kbit_values(q, scale, zero)
