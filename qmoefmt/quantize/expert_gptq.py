"""GPTQ of named expert tensors with their Hessians from a calibration file: the public
batch API that pack and sequential mode share. `gptq` holds the algorithm; this module
stacks same-shape experts, falls back to round to nearest where there is nothing to
calibrate on, and writes each expert's quantizer record."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from ..errors import QuantizeError
from ..format import constants as C

# the per-expert fields of a GPTQ result, [E, ...] in a batch
_PER_EXPERT = ("codes", "dequantized", "lo", "hi", "scales", "zeros")


@dataclass(frozen=True)
class GPTQSettings:
    """What GPTQ's output depends on; `recorded` is what sequential calibration files and
    quantizer records keep of it."""
    bits: str = C.TERNARY                 # "ternary" | "2" | "3" | "4"
    group_size: int | None = None         # k-bit only
    act_order: bool = C.GPTQ_ACT_ORDER
    damp: float = C.GPTQ_DAMP
    device: str = "cpu"                   # a torch device string; GPU rounding can differ

    @property
    def recorded(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "act_order": self.act_order,
                "damp": self.damp}


def _finite(name: str, rows: np.ndarray) -> None:
    if not np.isfinite(rows).all():
        raise QuantizeError(f"tensor {name!r}: non-finite weights; refusing to quantize it")


def run(W, H, settings: GPTQSettings):
    """GPTQ of W [E, rows, cols] with H [E, cols, cols] on the settings' grid: the result
    (on the CPU) and the quantizer record's common part."""
    from . import gptq
    W, H = W.to(settings.device), H.to(settings.device)
    if settings.bits == C.TERNARY:
        result = gptq.gptq_ternary(W, H, damp=settings.damp, act_order=settings.act_order)
        grid = "qmoe-ternary"
    else:
        result = gptq.gptq_kbit(W, H, int(settings.bits), settings.group_size,
                                damp=settings.damp, act_order=settings.act_order)
        grid = "minmax-asymmetric"
    if settings.device != "cpu":
        result = replace(result, **{f.name: getattr(result, f.name).cpu() for f in fields(result)
                                    if hasattr(getattr(result, f.name), "cpu")})
    return result, {"method": "gptq", "grid": grid, "damp": settings.damp,
                    "act_order": settings.act_order}


def quantize_expert(name: str, rows: np.ndarray, settings: GPTQSettings, calibration, shape):
    """GPTQ on one expert tensor with its Hessian. `rows` is the tensor as [prod(shape[:-1]),
    cols]: a 2-D weight, or experts fused into one weight [E, out, in], which the file gives
    an [E, in, in] Hessian and E token counts (calibration 1.1). Fused experts go through
    GPTQ as one batch, each exactly as if alone; results come back as rows either way. An
    expert the file lacks, or that saw no tokens, falls back to round to nearest, recorded
    in the quantizer: `status` and `tokens` per tensor, or lists of E of them for fused
    experts. `shape` is the tensor's, checked against the Hessian."""
    import torch

    _finite(name, rows)
    cols = rows.shape[1]
    W = torch.from_numpy(rows)
    present = name in calibration
    count = calibration.tokens.get(name, 0)
    if present and len(shape) == 3:
        shape = tuple(shape)
        if math.prod(shape[:-1]) != rows.shape[0] or shape[-1] != cols:
            raise QuantizeError(f"tensor {name!r}: rows {list(rows.shape)} are not of shape "
                                f"{list(shape)}")
        H = calibration.hessian(name, shape)
        W = W.reshape(shape)
    else:
        # a 2-D weight: one [in, in] Hessian
        H = calibration.hessian(name, cols) if present else torch.zeros(cols, cols)
    result, quantizer = run(W, H, settings)
    if W.dim() == 3:
        def as_rows(t):     # [E, out, ...] -> [E * out, ...], as the codecs take them
            return None if t is None else t.reshape(rows.shape[0], *t.shape[2:])
        status = result.status
        result = replace(result, **{f: as_rows(getattr(result, f)) for f in _PER_EXPERT})
    else:
        status = result.status[0] if present else "rtn-no-calibration"
    return result, dict(quantizer, status=status, tokens=count)


def quantize_batch(names: list[str], rows: list[np.ndarray], settings: GPTQSettings, calibration):
    """GPTQ on same-shape 2-D experts as one [E, rows, cols] batch (QMoE quantizes a
    layer's experts as one 3-D batch: per-column work is a few small torch calls, which a
    batch shares): per expert, the (result, quantizer record) that `quantize_expert` gives
    it alone, bit for bit."""
    import torch

    for name, r in zip(names, rows):
        _finite(name, r)
    cols = rows[0].shape[1]
    W = torch.from_numpy(np.stack(rows))
    H = torch.stack([calibration.hessian(n, cols) if n in calibration else torch.zeros(cols, cols)
                     for n in names])
    result, quantizer = run(W, H, settings)
    out = []
    for e, name in enumerate(names):
        one = replace(result, status=[result.status[e]], **{
            f: None if getattr(result, f) is None else getattr(result, f)[e] for f in _PER_EXPERT})
        status = result.status[e] if name in calibration else "rtn-no-calibration"
        out.append((one, dict(quantizer, status=status, tokens=calibration.tokens.get(name, 0))))
    return out
