"""Calibration files (spec/calibration-v1.md) and the PyTorch collector that makes them.

A calibration file is a safetensors file: for each expert weight `W [out, in]` named N, a
float32 `[in, in]` tensor under the same name holding H = sum over the tokens that reached
that expert of x x^T (x the expert linear's input), and in the metadata the token count of
each. Any runtime can write one; GPTQ reads it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import FormatError
from .selection import ExpertSelector

FORMAT = "qmoefmt.calibration"
VERSION = "1.0"
MAX_HEADER = 100_000_000


class HessianCollector:
    """Accumulates H = sum x x^T (float32) over calibration batches for every nn.Linear of
    `model` whose weight name the selector picks: `with HessianCollector(model, sel) as c:
    run batches; c.save(path)`. Experts that receive no tokens are kept, with H = 0 and a
    count of 0 (GPTQ then falls back to round to nearest for them)."""

    def __init__(self, model: torch.nn.Module, selector: ExpertSelector):
        self.hessians: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._hooks = []
        for mod_name, mod in model.named_modules():
            weight_name = f"{mod_name}.weight"
            if isinstance(mod, torch.nn.Linear) and selector(weight_name):
                cols = mod.in_features
                self.hessians[weight_name] = torch.zeros(cols, cols, dtype=torch.float32,
                                                         device=mod.weight.device)
                self.tokens[weight_name] = 0
                self._hooks.append(mod.register_forward_hook(self._hook(weight_name)))
        if not self.hessians:
            raise ValueError("the selector matched no nn.Linear weights of the model")

    def _hook(self, name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float32)
            if x.shape[0]:
                self.hessians[name].addmm_(x.T, x)
                self.tokens[name] += int(x.shape[0])
        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> "HessianCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def save(self, path) -> None:
        write_calibration(path, {k: v.cpu() for k, v in self.hessians.items()}, self.tokens)


def write_calibration(path, hessians: dict, tokens: dict[str, int]) -> None:
    from safetensors.torch import save_file

    if set(hessians) != set(tokens):
        raise ValueError("hessians and tokens must name the same experts")
    meta = {"format": FORMAT, "version": VERSION,
            "tokens": json.dumps({k: int(v) for k, v in sorted(tokens.items())}, sort_keys=True)}
    tensors = {k: torch.as_tensor(v, dtype=torch.float32).contiguous() for k, v in hessians.items()}
    tmp = Path(str(path) + ".partial")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


class CalibrationFile:
    """A calibration file, checked on open (format, token counts) and per Hessian on read
    (shape [in, in], float32, finite, symmetric, non-negative diagonal)."""

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
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in tokens.values())):
            raise FormatError(self.path, "metadata 'tokens' must map every tensor to a "
                                         "non-negative integer")
        self.tokens: dict[str, int] = tokens

    def __contains__(self, name: str) -> bool:
        return name in self.tokens

    def names(self) -> list[str]:
        return sorted(self.tokens)

    def hessian(self, name: str, cols: int) -> torch.Tensor:
        """The Hessian of expert weight `name` with `cols` input features."""
        where = f"{self.path}: {name}"
        if name not in self.tokens:
            raise FormatError(self.path, f"no Hessian for {name!r}")
        h = self._f.get_tensor(name)
        if h.dtype != torch.float32 or tuple(h.shape) != (cols, cols):
            raise FormatError(where, f"Hessian is {h.dtype} {list(h.shape)}, expected float32 "
                                     f"[{cols}, {cols}]")
        if not torch.isfinite(h).all():
            raise FormatError(where, "Hessian holds NaN or infinity")
        if (torch.diagonal(h) < 0).any():
            raise FormatError(where, "Hessian has a negative diagonal entry")
        tol = 1e-4 * float(h.abs().max()) if h.numel() else 0.0
        if not torch.allclose(h, h.T, rtol=0, atol=tol):
            raise FormatError(where, "Hessian is not symmetric")
        return h


def hessian_from_inputs(x: np.ndarray) -> np.ndarray:
    """sum x x^T over the rows of x [tokens, in], float32: what a collector accumulates."""
    x = np.asarray(x, np.float32)
    return (x.T @ x).astype(np.float32)
