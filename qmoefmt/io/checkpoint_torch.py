"""PyTorch checkpoints: ``torch.load(weights_only=True, mmap=True)``, never a full unpickle.
The pages it maps count toward RSS as tensors are read (clean file pages the kernel can
drop), and legacy non-zip files cannot be mapped at all, so they are loaded whole."""
from __future__ import annotations

import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from .._torch import require_torch
from .checkpoint import _DTYPES, CheckpointError, Entry, unreadable


def torch_entries(path: str) -> list[Entry]:
    torch = require_torch(f"{path}: reading a PyTorch checkpoint")

    try:
        # mmap needs the zipfile format; legacy pickles are loaded into memory.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # weights_only refusals, corrupt archives, I/O errors
        problem = _torch_problem(e)
        raise CheckpointError(f"{path}: cannot load as a PyTorch state dict: {problem}") from e
    state = _find_state_dict(obj, path, torch.Tensor)
    entries = []
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: state dict key {name!r} is not a string")
        dtype = str(tensor.dtype).removeprefix("torch.")
        shape = tuple(tensor.shape)
        if dtype not in _DTYPES or tensor.layout != torch.strided:
            problem = f"unsupported dtype {tensor.dtype} / layout {tensor.layout}"
            entries.append(unreadable(name, path, shape, problem))
        else:
            entries.append(Entry(name, path, shape, dtype, _torch_loader(torch, tensor, dtype)))
    return entries


def _torch_problem(error: Exception) -> str:
    # torch's refusal is a page of advice that ends in "set weights_only=False", which is
    # exactly what we must not do; keep only its one-line diagnosis.
    marker = "WeightsUnpickler error: "
    text = str(error)
    if marker in text:
        detail = text.split(marker, 1)[1].split(". ", 1)[0]
        return f"refused by weights_only unpickling, nothing was executed: {detail}"
    return f"{type(error).__name__}: {text}"


def _find_state_dict(obj: object, path: str, tensor_type: type) -> dict[Any, Any]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    if not all(isinstance(v, tensor_type) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    for name, value in obj.items():
        if not isinstance(value, tensor_type):
            kind = type(value).__name__
            raise CheckpointError(f"{path}: entry {name!r} is a {kind}, not a tensor")
    return obj


def _torch_loader(torch: Any, tensor: Any, dtype: str) -> Callable[[], np.ndarray]:
    # Saved nn.Parameters come back requiring grad, which .numpy() refuses.
    tensor = tensor.detach()

    def load() -> np.ndarray:
        if dtype == "bfloat16":  # numpy has no bfloat16: reinterpret the bits
            source = tensor.view(torch.int16).numpy().view(_DTYPES[dtype])
        else:
            source = tensor.numpy()
        # Copy so the result owns its memory instead of pinning the file mapping.
        return np.array(source, dtype=_DTYPES[dtype], order="C", copy=True)

    return load
