"""`from_pretrained`: a transformers model from its store alone (spec §14).

The store's config.json attachment names the model class (`architectures`) and its sizes;
the class is one transformers ships (no remote code runs, nothing is downloaded). The model
is built with its parameters on the meta device (no memory, no initialisation), given
uninitialised storage, and filled by `load_model`: expert weights stay coded, everything
else is loaded dense from the store.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..errors import MissingExtraError, QmoeError
from ..format import constants as C
from ..store.reader import Store, open as open_store


def from_pretrained(store, *, experts=None, preset: str | None = None,
                    backend: str | None = None, model_class=None, dtype=None) -> nn.Module:
    """The model the store (a Store or its path) was packed from, in eval mode, run from
    the store. `experts`/`preset` select the weights left coded (default: those the pack
    selected); `model_class` overrides the config's `architectures` (a transformers
    PreTrainedModel subclass); `dtype` the config's dtype."""
    transformers = _require_transformers()
    store = store if isinstance(store, Store) else open_store(store)
    config = _config(transformers, store)
    cls = model_class or _model_class(transformers, config, store)
    with _parameters_on_meta():
        model = cls._from_config(config, **({} if dtype is None else {"dtype": dtype}))
    _materialize(model)
    if C.GENERATION_CONFIG in store.attachments and model.can_generate():
        model.generation_config = transformers.GenerationConfig.from_dict(
            store.attachment_json(C.GENERATION_CONFIG))
    if experts is None and preset is None:
        pack = store.meta.get("pack") or {}
        experts, preset = tuple(pack.get("experts") or ()), pack.get("preset")
    from . import load_model     # here: the package's __init__ may import this module first
    load_model(store, model, experts=experts or (), preset=preset, backend=backend)
    return model.eval()


def _require_transformers():
    """transformers, or a MissingExtraError saying which remedy applies (as require_torch)."""
    try:
        import transformers
    except ImportError as e:
        missing = isinstance(e, ModuleNotFoundError) and e.name == "transformers"
        first = (str(e).splitlines() or [type(e).__name__])[0]
        why = "which is not installed" if missing else f"which failed to import ({first})"
        raise MissingExtraError(f"from_pretrained needs Hugging Face transformers, {why}; "
                                "pip install 'qmoefmt[hf]'") from None
    return transformers


def _config(transformers, store: Store):
    """The store's config.json as a transformers config of its `model_type`."""
    where = f"{store.path}: attachment {C.CONFIG!r}"
    cfg = store.config
    if cfg is None:
        raise QmoeError(f"{store.path}: the store carries no {C.CONFIG} (its checkpoint "
                        "directory had none, or it was packed before format 1.3); build the "
                        "model yourself and call qmoefmt.torch.load_model")
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise QmoeError(f"{where}: model_type {model_type!r} is not one transformers "
                        f"{transformers.__version__} knows")
    return transformers.CONFIG_MAPPING[model_type].from_dict(cfg)


def _model_class(transformers, config, store: Store):
    """The class config.json's `architectures` names, if transformers has it."""
    names = getattr(config, "architectures", None)
    first = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
    cls = getattr(transformers, first, None) if first else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise QmoeError(f"{store.path}: attachment {C.CONFIG!r}: architectures {names!r} names "
                        f"no model class of transformers {transformers.__version__} (remote "
                        "code is never run); pass model_class=")
    return cls


@contextmanager
def _parameters_on_meta():
    """Every parameter a module registers meanwhile goes to the meta device, so neither
    its memory nor its initialisation is paid. Buffers stay real: non-persistent ones
    (rotary frequencies) are computed at construction and are in no store. Patches
    nn.Module for the duration, as accelerate's init_empty_weights does: not thread-safe."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _materialize(model: nn.Module) -> None:
    """Uninitialised CPU storage for every meta parameter, for load_model to fill; tied
    parameters stay one. Pages nobody writes cost no memory, so the dense expert weights
    that load_model replaces by coded modules are dropped before they are ever touched."""
    made: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}   # id -> (old, new): old kept
    for module in model.modules():                            # alive so no id is reused
        for name, p in list(module.named_parameters(recurse=False, remove_duplicate=False)):
            if not p.is_meta:
                continue
            if id(p) not in made:
                made[id(p)] = (p, nn.Parameter(torch.empty_like(p, device="cpu"),
                                               requires_grad=p.requires_grad))
            setattr(module, name, made[id(p)][1])


__all__ = ["from_pretrained"]
