"""Where each tensor of a model lives in a store.

A store packed from a model's own state dict holds its tensors under their names. One
packed from what transformers' `save_pretrained` writes holds them as the checkpoint names
them: transformers 5 renames and splits weights on saving (Mixtral's fused
`mlp.experts.gate_up_proj [E, 2I, H]` is written as `block_sparse_moe.experts.{e}.w1` and
`.w3 [I, H]`, router `mlp.gate` as `block_sparse_moe.gate`). That same conversion, run on
probes whose every row holds its own number, says which rows of which model tensor each
saved tensor holds, so the mapping is transformers' own rather than a copy of it.
"""
from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import QmoeError
from ..store.reader import Store


class StoreMismatchError(QmoeError):
    """The store lacks a tensor of the model, or holds it in another shape."""


@dataclass(frozen=True)
class Piece:
    """Store tensor `name`, of shape `shape`, holds rows [start, stop) of a model tensor's
    [prod(shape[:-1]), cols] view (the whole tensor when it is one piece)."""
    name: str
    start: int
    stop: int
    shape: tuple[int, ...]


def rows_of(shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1]) if shape else 1


def locate(store: Store, model: nn.Module) -> dict[str, list[Piece]]:
    """Each tensor of `model`'s state dict -> the store pieces that make it, in row order.
    A tied tensor (one tensor under several names) appears once, under the first of its
    names the store can fill. Raises StoreMismatchError, naming the store and the tensor,
    when the store lacks one or holds it in another shape."""
    state = model.state_dict(keep_vars=True)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    saved = _saved_pieces(model, {k: s for k, s in shapes.items() if k not in store})
    found, lacking = {}, []
    for names in _tied_groups(state):
        hits = ((k, _pieces(k, shapes[k], store, saved)) for k in names)
        hit = next(((k, p) for k, p in hits if p is not None), None)
        if hit is None:
            lacking.append(_lacking(names[0], saved.get(names[0], []), store))
        else:
            found[hit[0]] = hit[1]
    if lacking:
        raise StoreMismatchError(f"{store.path}: the store lacks {len(lacking)} tensors of "
                                 f"the model, e.g. {lacking[:3]}")
    for name, pieces in found.items():
        for p in pieces:
            have = store[p.name].shape
            if have != p.shape:
                raise StoreMismatchError(f"{store.path}: {p.name} is {list(have)} in the "
                                         f"store, the model's {name} needs {list(p.shape)}")
    return found


def read_dense(store: Store, pieces: list[Piece], shape: tuple[int, ...],
               dtype: torch.dtype) -> torch.Tensor:
    """A model tensor dense from its pieces (coded ones dequantized), in `dtype`."""
    if len(pieces) == 1 and pieces[0].shape == shape:
        return store[pieces[0].name].torch(dtype=dtype)
    out = torch.empty(rows_of(shape), shape[-1], dtype=dtype)
    for p in pieces:
        out[p.start:p.stop] = store[p.name].torch(dtype=dtype).reshape(p.stop - p.start, -1)
    return out.reshape(shape)


def _tied_groups(state: dict) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def _pieces(name: str, shape: tuple[int, ...], store: Store,
            saved: dict[str, list[Piece]]) -> list[Piece] | None:
    """The pieces of one model tensor, or None unless the store holds all of them and they
    tile its rows."""
    if name in store:
        return [Piece(name, 0, rows_of(shape), shape)]
    pieces = sorted(saved.get(name, []), key=lambda p: p.start)
    edges = [0] + [p.stop for p in pieces]
    if (pieces and all(p.name in store for p in pieces)
            and [p.start for p in pieces] == edges[:-1] and edges[-1] == rows_of(shape)):
        return pieces
    return None


def _lacking(name: str, pieces: list[Piece], store: Store) -> str:
    absent = [p.name for p in pieces if p.name not in store and p.name != name]
    return f"{name} (saved as {absent[0]})" if absent else name


def _saved_pieces(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[Piece]]:
    """Model tensor -> the pieces save_pretrained writes it as ({} for a model that
    transformers does not convert)."""
    revert = _reverter(model) if shapes else None
    if revert is None:
        return {}
    names = list(shapes)
    starts = list(itertools.accumulate((rows_of(shapes[k]) for k in names), initial=0))
    probes = {k: torch.arange(starts[i], starts[i + 1], dtype=torch.float64)
              .reshape(*shapes[k][:-1], 1) for i, k in enumerate(names)}
    bounds = torch.tensor(starts[:-1], dtype=torch.float64)
    out: dict[str, list[Piece]] = {}
    for saved, probe in revert(model, probes).items():
        ids = probe.reshape(-1)
        if not ids.numel():
            continue
        i = int(torch.searchsorted(bounds, ids[:1], right=True)[0]) - 1
        name, start, n = names[i], int(ids[0]) - starts[i], ids.numel()
        if (probe.shape[-1] != 1 or start + n > rows_of(shapes[name])
                or not torch.equal(ids, ids[0] + torch.arange(n, dtype=torch.float64))):
            raise StoreMismatchError(f"{saved}: transformers' conversion of "
                                     f"{type(model).__name__} moves columns or mixes rows of "
                                     "its tensors into it; qmoefmt maps row ranges only")
        shape = shapes[name] if n == rows_of(shapes[name]) else (*probe.shape[:-1],
                                                                  *shapes[name][-1:])
        out.setdefault(name, []).append(Piece(saved, start, start + n, shape))
    return out


def _reverter(model: nn.Module):
    """transformers' save-time conversion if `model` is a transformers model, else None."""
    # A model built without transformers ever imported cannot be one of its models: no
    # need to pay the import (or to need transformers at all).
    if "transformers" not in sys.modules:
        return None
    from transformers import PreTrainedModel
    if not isinstance(model, PreTrainedModel):
        return None
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:          # transformers 4: checkpoint and module names agree
        return None
    return revert_weight_conversion
