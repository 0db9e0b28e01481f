"""PyTorch checkpoints: ``torch.load(weights_only=True, mmap=True)``, never a full unpickle.
The pages it maps count toward RSS as tensors are read (clean file pages the kernel can
drop), and legacy non-zip files cannot be mapped at all, so they are loaded whole."""
from __future__ import annotations

import re
import warnings
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from .._torch import numpy_of, require_torch
from .checkpoint import _DTYPES, CheckpointError, Entry, unreadable


def torch_entries(path: str) -> list[Entry]:
    torch = require_torch(f"{path}: reading a PyTorch checkpoint")

    try:
        with warnings.catch_warnings():
            # torch's caution that its unpickler may lack a newer protocol's opcodes:
            # what it cannot read is refused below, in one line, warning or not
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # mmap needs the zipfile format; legacy pickles are loaded into memory.
            obj = torch.load(path, map_location="cpu", weights_only=True,
                             mmap=zipfile.is_zipfile(path))
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
            entries.append(Entry(name, path, shape, dtype, _torch_loader(tensor, dtype)))
    return entries


# torch's weights_only refusal is a page of advice around a one-line diagnosis; the
# advice's wording moves between releases, so lines are recognised by what they talk about
_ADVICE = re.compile(r"weights.only|torch\.load|file an issue|trusted source|pytorch\.org",
                     re.IGNORECASE)


def _torch_problem(error: Exception) -> str:
    """One line: torch's diagnosis, never its advice to set weights_only=False, which is
    exactly what must not be done with an untrusted file."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if not _ADVICE.search(ln)), "")
    if len(detail) > 300:
        detail = detail[:300] + "..."
    if any(_ADVICE.search(ln) for ln in lines):
        return ("refused by weights_only unpickling, nothing was executed: "
                + (detail or "it holds objects other than tensors and containers"))
    return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


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


def _torch_loader(tensor: Any, dtype: str) -> Callable[[], np.ndarray]:
    # Saved nn.Parameters come back requiring grad, which .numpy() refuses.
    tensor = tensor.detach()

    def load() -> np.ndarray:
        source = numpy_of(tensor)
        # Copy so the result owns its memory instead of pinning the file mapping.
        return np.array(source, dtype=_DTYPES[dtype], order="C", copy=True)

    return load
