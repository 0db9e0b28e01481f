"""QMoE's sequential mode for a PyTorch model run in-process.

The experts are quantized layer by layer: each layer's Hessians are collected from the
model whose earlier layers already hold their GPTQ weights, so later layers calibrate on
(and compensate) the error of earlier ones. The result is an ordinary calibration file
(spec/calibration-v1.md) whose metadata key `sequential` records the GPTQ settings; `pack
--method gptq --calibration FILE` with those settings recomputes exactly the weights this
pass used, because the experts go through pack's own batched GPTQ
(`expert_gptq.quantize_batch`) with the same weights and the same Hessians.

Layers. An expert linear's step is given by `layer_key(weight_name)`. `default_layer_key`
is its MoE layer: the module path up to the last component named `experts` (Switch,
Mixtral, and most Hugging Face MoE models name their expert containers so), or else the
expert module's parent. The default, `sublayer_key`, splits that layer by the linear's
name within the expert (wi, then wo), so wo calibrates on the quantized wi's outputs.
Layers are taken in order of first use in a forward pass, not module order: registration
order need not be execution order (a decoder registered before its encoder), and sequential
mode is only right in execution order. The first pass over the calibration batches both
finds that order and collects the first layer's Hessians (the model is still dense then),
so n layers cost n passes. Layers that no calibration token reaches follow in module order;
nothing downstream sees them, so their place is immaterial.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ..format.constants import GPTQ_ACT_ORDER
from .calibration import check_sequential, write_calibration
from .collector import HessianCollector
from .expert_gptq import GPTQSettings, quantize_batch


def default_layer_key(weight_name: str) -> str:
    """`blocks.3.mlp.experts.expert_5.wi.weight` -> `blocks.3.mlp.experts`."""
    parts = weight_name.split(".")[:-1]          # the linear's module path
    if "experts" in parts[:-1]:
        return ".".join(parts[: len(parts) - parts[::-1].index("experts")])
    return ".".join(parts[:-2])


def sublayer_key(weight_name: str) -> str:
    """True-sequential (the GPTQ reference's --true-sequential): each linear of an expert is
    its own step, `blocks.3.mlp.experts.expert_5.wo.weight` -> `blocks.3.mlp.experts/wo`, so
    a layer's wo is calibrated on the outputs of its already quantized wi. Experts that are
    a single linear keep their layer's key."""
    layer = default_layer_key(weight_name)
    inner = weight_name.split(".")[:-1][len(layer.split(".")) + 1:]   # below the expert itself
    return f"{layer}/{'.'.join(inner)}" if inner else layer


def expert_layers(model: torch.nn.Module, selector: Callable[[str], bool],
                  layer_key: Callable[[str], str] = default_layer_key) -> dict[str, list[str]]:
    """{layer: [weight names]} of the nn.Linear weights the selector picks, in module order."""
    fused = [n for n, p in model.named_parameters() if p.dim() == 3 and selector(n)]
    if fused:
        # pack quantizes a fused [E, out, in] weight as one tensor; writing its GPTQ
        # weights back per layer is not done here yet.
        raise ValueError(f"sequential mode takes experts that are nn.Linear modules; the "
                         f"selector picks fused 3-D expert weights {fused[:3]}")
    layers: dict[str, list[str]] = {}
    for mod_name, mod in model.named_modules():
        name = f"{mod_name}.weight"
        if isinstance(mod, torch.nn.Linear) and selector(name):
            layers.setdefault(layer_key(name), []).append(name)
    if not layers:
        raise ValueError("the selector matched no nn.Linear weights of the model")
    return layers


@dataclass
class SequentialCalibration:
    """What a sequential pass made: the Hessians and token counts of every expert (each
    layer's collected after the layers before it were quantized), the layers in the order
    they were quantized, each expert's GPTQ status, and the settings."""

    settings: dict
    layers: list[tuple[str, list[str]]]
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    calibration_seconds: float = 0.0
    quantization_seconds: float = 0.0

    def save(self, path) -> None:
        write_calibration(path, self.hessians, self.tokens, sequential=self.settings)


class _LayerCalibration:
    """The slice of a calibration file that pack's GPTQ reads, held in memory."""

    def __init__(self, hessians: dict[str, torch.Tensor], tokens: dict[str, int]):
        self._hessians = hessians
        self.tokens = tokens

    def __contains__(self, name: str) -> bool:
        return name in self.tokens

    def hessian(self, name: str, cols: int) -> torch.Tensor:
        h = self._hessians[name]
        if tuple(h.shape) != (cols, cols):
            raise ValueError(f"{name}: Hessian {list(h.shape)}, expected [{cols}, {cols}]")
        return h


def _runner(batches) -> Callable[[torch.nn.Module], None]:
    if callable(batches):
        return batches
    if iter(batches) is batches:
        raise TypeError("calibration batches must be re-iterable (a list or tuple; every "
                        "layer runs them again) or a callable run(model)")

    def run(model: torch.nn.Module) -> None:
        for batch in batches:
            model(batch)
    return run


@torch.no_grad()
def sequential_calibrate(
    model: torch.nn.Module,
    batches: Iterable | Callable[[torch.nn.Module], None],
    selector: Callable[[str], bool],
    *,
    bits: str = "ternary",
    group_size: int | None = None,
    act_order: bool | None = None,
    layer_key: Callable[[str], str] = sublayer_key,
    progress: Callable[[int, int, str], None] | None = None,
) -> SequentialCalibration:
    """Quantize `model`'s selected expert linears in place, layer by layer, with GPTQ
    (`bits` "ternary" | "2" | "3" | "4", `group_size` for k-bit, `act_order` None = pack's
    default for the grid), each layer calibrated on the model with the layers before it
    quantized. A "layer" is what `layer_key` says: by default each linear of the experts
    of one MoE layer (true-sequential: on the bundled model's 2-bit grid it took the loss
    ratio from 0.242-0.250 to 0.233-0.241 over two seeds, bench/quality.py on the bf16
    model, 2026-12-02; for 2n passes instead of n);
    `default_layer_key` gives QMoE's whole-layer steps. `batches` is a re-iterable of model inputs (run as `model(batch)`) or a
    callable `run(model)`; it runs once per layer. `progress(done, layers, layer)` is called
    after each layer. Weights are written back in the model's dtype (exact for float32)."""
    settings = GPTQSettings(bits=bits, group_size=group_size,
                            act_order=GPTQ_ACT_ORDER if act_order is None else act_order)
    check_sequential(settings.recorded)
    run = _runner(batches)
    groups = expert_layers(model, selector, layer_key)
    layer_of = {name: key for key, names in groups.items() for name in names}
    modules = {name: model.get_submodule(name.removesuffix(".weight")) for name in layer_of}
    result = SequentialCalibration(settings=settings.recorded, layers=[])

    t0 = time.perf_counter()
    order, collector = _first_pass(model, run, groups, layer_of, modules)
    for i, key in enumerate(order):
        names = groups[key]
        if i > 0:
            t0 = time.perf_counter()
            with HessianCollector(model, set(names).__contains__) as collector:
                run(model)
        hessians = {n: collector.hessians[n].cpu() for n in names}
        tokens = {n: collector.tokens[n] for n in names}
        result.calibration_seconds += time.perf_counter() - t0
        del collector

        t1 = time.perf_counter()
        _quantize_layer(names, modules, settings, _LayerCalibration(hessians, tokens), result)
        result.quantization_seconds += time.perf_counter() - t1
        result.hessians.update(hessians)
        result.tokens.update(tokens)
        result.layers.append((key, names))
        if progress:
            progress(i + 1, len(order), key)
    return result


def _first_pass(model, run, groups: dict, layer_of: dict, modules: dict):
    """The layers in order of first use, and a collector holding the first layer's
    Hessians (one pass over the batches does both: the model is still dense)."""
    first_use: list[str] = []

    def seen(key: str):
        def hook(_module, _inputs, _output):
            if key not in first_use:
                first_use.append(key)
        return hook

    order_hooks = [modules[n].register_forward_hook(seen(layer_of[n])) for n in layer_of]
    try:
        with HessianCollector(model, layer_of.__contains__) as collector:
            run(model)
    finally:
        for h in order_hooks:
            h.remove()
    return first_use + [key for key in groups if key not in first_use], collector


def _quantize_layer(names: list[str], modules: dict, settings: GPTQSettings, layer_cal,
                    result: SequentialCalibration) -> None:
    """GPTQ on one layer's experts, one batch per shape as pack batches them (bit-identical
    to one at a time), written back into the model."""
    by_shape: dict[tuple, list[str]] = {}
    for name in names:
        by_shape.setdefault(tuple(modules[name].weight.shape), []).append(name)
    for same in by_shape.values():
        rows = [modules[n].weight.detach().to("cpu", torch.float32, copy=True).contiguous().numpy()
                for n in same]
        for name, (gptq, quantizer) in zip(same, quantize_batch(same, rows, settings, layer_cal)):
            weight = modules[name].weight
            weight.copy_(gptq.dequantized.to(weight.device, weight.dtype))
            result.status[name] = quantizer["status"]
