"""`load_model`: a PyTorch model run from its store, expert weights left coded."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..runtime import ExpertCache
from ..selection import ExpertSelector
from ..store.reader import Store, Tensor
from .experts import GATED_PARAMS, CompressedExperts, is_gated_experts
from .linear import CompressedLinear
from .sources import Piece, locate, read_dense

Selector = Callable[[str], bool]


def load_model(store: Store, model: nn.Module, *, experts=(), preset: str | None = None,
               backend: str | None = None, device_budget: int | None = None,
               device: str = "cpu") -> dict:
    """Runs `model` from `store`. Expert weights the selector picks (the pack globs /
    preset, matched on the model's name or on every stored name it is made of) whose
    codec multiplies fused stay coded: an `nn.Linear` becomes a CompressedLinear, a
    transformers 5 fused experts module (MixtralExperts and its kind) a CompressedExperts.
    Every other tensor is loaded dense (dequantized where coded), from the store tensors
    that hold it under its own name or under the names save_pretrained writes it as.

    Raises StoreMismatchError before changing the model when the store lacks one of the
    model's tensors or holds it in another shape. -> {"compressed": store tensors run
    from their codes, "dense": model tensors loaded dense, "dequantized": coded store
    tensors decoded into those, "unused": store tensors the model has no place for,
    "cache": the ExpertCache or None}.

    With `device_budget` (bytes), the coded experts' arrays stay mapped from the store
    and each forward brings the ones it uses to the device through one ExpertCache of
    that size (least recently used evicted; `cache.stats()` counts hits, misses and
    bytes moved) on `device` ("cpu", or "cuda"/"cuda:N" for the GPU runtime, whose modules
    then take CUDA inputs). Without it, they are read from the mapping in place."""
    selector = ExpertSelector(experts, preset)
    found = locate(store, model)
    cache = None if device_budget is None else ExpertCache(device_budget, device=device)
    compressed = (_compress_linears(store, model, found, selector, backend, cache)
                  + _compress_experts(store, model, found, selector, backend, cache))
    state = model.state_dict()        # a CompressedLinear's bias is in it, dense as stored
    dense = {k: read_dense(store, found[k], tuple(v.shape), v.dtype)
             for k, v in state.items() if k in found}   # tied names are filled once
    model.load_state_dict(dense, strict=False)
    read = {p.name for k in dense for p in found[k]}
    return {"compressed": compressed, "dense": sorted(dense),
            "dequantized": sorted(n for n in read if store[n].unit.expert),
            "unused": sorted(set(store) - read - set(compressed)), "cache": cache}


def _compress_linears(store: Store, model: nn.Module, found: dict, selector: Selector,
                      backend: str | None, cache: ExpertCache | None) -> list[str]:
    done = []
    for name, module in list(model.named_modules()):
        key = f"{name}.weight"
        if not (isinstance(module, nn.Linear) and key in found
                and _selected(selector, key, found[key])):
            continue
        tensors = _fused_tensors(store, found[key])
        if tensors is not None:
            _replace(model, name, CompressedLinear(tensors, module.bias, backend, cache))
            done += [t.name for t in tensors]
    return done


def _compress_experts(store: Store, model: nn.Module, found: dict, selector: Selector,
                      backend: str | None, cache: ExpertCache | None) -> list[str]:
    done = []
    for name, module in list(model.named_modules()):
        keys = [f"{name}.{p}" for p in GATED_PARAMS]
        if not (is_gated_experts(module)
                and all(k in found and _selected(selector, k, found[k]) for k in keys)):
            continue
        projections = [_per_expert(store, found[k], tuple(getattr(module, p).shape))
                       for k, p in zip(keys, GATED_PARAMS)]
        if None not in projections:
            _replace(model, name, CompressedExperts(*projections, module.act_fn, backend, cache))
            done += [t.name for proj in projections for ts in proj for t in ts]
    return done


def _per_expert(store: Store, pieces: list[Piece],
                shape: tuple[int, ...]) -> list[list[Tensor]] | None:
    """Expert e's store tensors of a fused [E, out, in] parameter, in row order; None when
    a piece spans experts (the fused tensor stored whole, which Tensor.matmul cannot take
    one expert of) or one has no fused matmul."""
    out = shape[1]
    groups: list[list[Piece]] = [[] for _ in range(shape[0])]
    for p in pieces:
        e = p.start // out
        if p.stop > (e + 1) * out:
            return None
        groups[e].append(p)
    tensors = [_fused_tensors(store, g) for g in groups]
    return None if None in tensors else tensors


def _fused_tensors(store: Store, pieces: list[Piece]) -> list[Tensor] | None:
    """The store tensors of `pieces` if each is a 2-D weight that multiplies from its
    codes, else None (it is loaded dense)."""
    tensors = [store[p.name] for p in pieces]
    if tensors and all(len(t.shape) == 2 and t.unit.multiplies for t in tensors):
        return tensors
    return None


def _selected(selector: Selector, name: str, pieces: list[Piece]) -> bool:
    return selector(name) or all(selector(p.name) for p in pieces)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
