"""Calibration files (spec/calibration-v1.md): the writer and the validating reader.

A calibration file is a safetensors file: for each expert weight `W [out, in]` named N, a
float32 `[in, in]` tensor under the same name holding H = sum over the tokens that reached
that expert of x x^T (x the expert linear's input), and in the metadata the token count of
each. Experts fused into one weight `[E, out, in]` (transformers 5's MoE layers) get an
`[E, in, in]` Hessian and a list of E counts (since 1.1). Any runtime can write one; GPTQ
reads it.
"""
from __future__ import annotations

import json
import math

import numpy as np
import torch

from ..errors import FormatError
from ..format.constants import GRIDS

FORMAT = "qmoefmt.calibration"
VERSION = "1.1"
MAX_HEADER = 100_000_000

# A sequential file's GPTQ settings (metadata key "sequential", since 1.1) are what its
# later layers' Hessians depend on, so a packer can refuse to quantize with other settings.


def check_sequential(value) -> dict:
    """The `sequential` settings {bits, group_size, act_order, damp}, validated; ValueError
    names the bad field."""
    if not isinstance(value, dict) or set(value) != {"bits", "group_size", "act_order", "damp"}:
        raise ValueError("must be an object with exactly bits, group_size, act_order, damp")
    bits, gs, ao, damp = (value[k] for k in ("bits", "group_size", "act_order", "damp"))
    if bits not in GRIDS:
        raise ValueError(f"bits {bits!r} is not one of {list(GRIDS)}")
    if gs is not None and (not isinstance(gs, int) or isinstance(gs, bool) or gs < 1
                           or bits == "ternary"):
        raise ValueError(f"group_size {gs!r} must be null, or a positive integer with k-bit bits")
    if not isinstance(ao, bool):
        raise ValueError(f"act_order {ao!r} is not a boolean")
    if (not isinstance(damp, (int, float)) or isinstance(damp, bool) or not math.isfinite(damp)
            or damp <= 0):
        raise ValueError(f"damp {damp!r} is not a positive number")
    return {"bits": bits, "group_size": gs, "act_order": ao, "damp": float(damp)}


def write_calibration(path, hessians: dict, tokens: dict[str, int | list[int]],
                      sequential: dict | None = None) -> None:
    """`tokens`: per tensor a count, or for a 3-D `[E, in, in]` Hessian a list of E counts.
    `sequential`: the GPTQ settings a sequential pass quantized under (see
    check_sequential), for a file whose Hessians were collected that way. The same
    Hessians and counts give the same bytes (tensors by name, metadata in a fixed order;
    safetensors' own save_file orders metadata by a hash map, and pack records the file's
    sha256)."""
    from ..io.safetensors_writer import SafetensorsWriter

    if set(hessians) != set(tokens):
        raise ValueError("hessians and tokens must name the same experts")
    counts = {}
    for k, v in sorted(tokens.items()):
        fused = len(hessians[k].shape) == 3
        if fused != isinstance(v, (list, tuple)) or (fused and len(v) != hessians[k].shape[0]):
            raise ValueError(f"{k}: tokens {v!r} do not fit a Hessian of shape "
                             f"{list(hessians[k].shape)} (a 3-D one takes a count per expert)")
        counts[k] = [int(c) for c in v] if fused else int(v)
    meta = {"format": FORMAT, "version": VERSION, "tokens": json.dumps(counts, sort_keys=True)}
    if sequential is not None:
        try:
            meta["sequential"] = json.dumps(check_sequential(sequential), sort_keys=True)
        except ValueError as e:
            raise ValueError(f"sequential settings: {e}") from None
    names = sorted(hessians)
    entries = [(k, "float32", list(hessians[k].shape)) for k in names]
    with SafetensorsWriter(path, entries, metadata=meta) as w:
        for k in names:
            w.write(k, torch.as_tensor(hessians[k], dtype=torch.float32).contiguous().numpy())


class CalibrationFile:
    """A calibration file, checked on open (format, token counts) and per Hessian on read
    (shape [in, in], or [E, in, in] with E counts, float32, finite, symmetric, non-negative
    diagonal, per expert)."""

    def __init__(self, path):
        from safetensors import safe_open

        self.path = str(path)
        try:
            self._f = safe_open(self.path, framework="pt")
            meta = self._f.metadata() or {}
        except Exception as e:  # noqa: BLE001 - any unreadable file is one clean error
            raise FormatError(self.path, f"not a readable safetensors file ({e})") from None
        if meta.get("format") != FORMAT:
            raise FormatError(self.path, f"metadata format is {meta.get('format')!r}, "
                                         f"expected {FORMAT!r}")
        if str(meta.get("version", "")).split(".")[0] != VERSION.split(".")[0]:
            raise FormatError(self.path, f"calibration version {meta.get('version')!r} unsupported")
        try:
            tokens = json.loads(meta.get("tokens", ""))
        except ValueError:
            raise FormatError(self.path, "metadata 'tokens' is not JSON") from None
        names = set(self._f.keys())
        if (not isinstance(tokens, dict) or set(tokens) != names or not all(
                _is_count(v) or (isinstance(v, list) and all(_is_count(c) for c in v))
                for v in tokens.values())):
            raise FormatError(self.path, "metadata 'tokens' must map every tensor to a "
                                         "non-negative integer (or a list of them, one per "
                                         "expert of a 3-D tensor)")
        self.tokens: dict[str, int | list[int]] = tokens
        # None: Hessians of one model state (e.g. the dense model), usable with any settings.
        self.sequential: dict | None = None
        if "sequential" in meta:
            try:
                value = json.loads(meta["sequential"])
            except ValueError:
                raise FormatError(self.path, "metadata 'sequential' is not JSON") from None
            try:
                self.sequential = check_sequential(value)
            except ValueError as e:
                raise FormatError(self.path, f"metadata 'sequential': {e}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tokens

    def names(self) -> list[str]:
        return sorted(self.tokens)

    def hessian(self, name: str, shape) -> torch.Tensor:
        """The Hessian of expert weight `name` of shape `[out, in]` (an int: `in`, for a
        2-D weight), or `[E, out, in]` for experts fused into one weight: `[in, in]` or
        `[E, in, in]`, checked against the weight and its token counts."""
        where = f"{self.path}: {name}"
        if name not in self.tokens:
            raise FormatError(self.path, f"no Hessian for {name!r}")
        shape = (None, shape) if isinstance(shape, int) else tuple(shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"{name}: expert weights are 2-D or 3-D, not {list(shape)}")
        cols = shape[-1]
        expect = (cols, cols) if len(shape) == 2 else (shape[0], cols, cols)
        count = self.tokens[name]
        if len(shape) == 3 and (not isinstance(count, list) or len(count) != shape[0]):
            raise FormatError(where, f"metadata 'tokens' holds {_describe(count)}, expected "
                                     f"a list of {shape[0]} counts, one per expert")
        if len(shape) == 2 and isinstance(count, list):
            raise FormatError(where, f"metadata 'tokens' holds {_describe(count)} (a 3-D "
                                     "tensor's), expected one count for a 2-D weight")
        h = self._f.get_tensor(name)
        if h.dtype != torch.float32 or tuple(h.shape) != expect:
            raise FormatError(where, f"Hessian is {h.dtype} {list(h.shape)}, expected float32 "
                                     f"{list(expect)}")
        if not torch.isfinite(h).all():
            raise FormatError(where, "Hessian holds NaN or infinity")
        if h.numel():
            hb = h.reshape(-1, cols, cols)
            bad = (torch.diagonal(hb, dim1=-2, dim2=-1) < 0).any(dim=-1)
            if bad.any():
                raise FormatError(where, "Hessian has a negative diagonal entry" + _expert(h, bad))
            tol = 1e-4 * hb.abs().amax(dim=(-2, -1))
            bad = (hb - hb.mT).abs().amax(dim=(-2, -1)) > tol
            if bad.any():
                raise FormatError(where, "Hessian is not symmetric" + _expert(h, bad))
        return h


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _describe(count) -> str:
    return f"a list of {len(count)} counts" if isinstance(count, list) else f"the count {count}"


def _expert(h: torch.Tensor, bad: torch.Tensor) -> str:
    return f" (expert {int(torch.nonzero(bad)[0])})" if h.dim() == 3 else ""


def hessian_from_inputs(x: np.ndarray) -> np.ndarray:
    """sum x x^T over the rows of x [tokens, in], float32: what a collector accumulates."""
    x = np.asarray(x, np.float32)
    return (x.T @ x).astype(np.float32)
