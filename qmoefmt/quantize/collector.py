"""HessianCollector: forward hooks on a PyTorch model's expert linears that sum x x^T of
the tokens each expert sees, saved as a calibration file (spec/calibration-v1.md). It
follows transformers 5's fused experts too (`FusedExperts`)."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .calibration import write_calibration


@dataclass(frozen=True)
class FusedExperts:
    """A module type that holds its experts fused into parameters `[E, out, in]`, expert
    e's slice applied as a linear to the tokens routed to e. `inputs(module, args, kwargs,
    wanted)` yields, from the arguments of one forward call, `(e, {param: x})` with `x
    [tokens, in]` the input of expert e's slice of each wanted parameter."""

    params: tuple[str, ...]
    inputs: Callable[..., Iterator[tuple[int, dict[str, torch.Tensor]]]]


def _gated_experts_inputs(module, args, kwargs, wanted):
    """transformers' `MixtralExperts.forward(hidden_states [T, H], top_k_index [T, k],
    top_k_weights)`: token t goes to expert `top_k_index[t, j]` for each j; an index of E
    or more marks an unused slot (expert parallelism) and reaches no expert here."""
    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    index = index.reshape(hidden.shape[0], -1)
    for e in range(module.gate_up_proj.shape[0]):
        x = hidden[torch.nonzero(index == e)[:, 0]]        # once per slot that chose e
        if not x.shape[0]:
            continue
        inputs = {"gate_up_proj": x} if "gate_up_proj" in wanted else {}
        if "down_proj" in wanted:
            # down_proj's input act(gate) * up exists only inside the forward (a tensor
            # expression there, or inside a grouped-GEMM kernel under transformers' other
            # experts implementations): no module boundary carries it to a hook, so it is
            # recomputed from the same routed tokens and the same gate_up_proj weights,
            # with the same ops in the model's dtype.
            gate_up = torch.nn.functional.linear(x, module.gate_up_proj[e])
            if hasattr(module, "_apply_gate"):
                inputs["down_proj"] = module._apply_gate(gate_up)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                inputs["down_proj"] = module.act_fn(gate) * up
        yield e, inputs


_GATED_EXPERTS = FusedExperts(("gate_up_proj", "down_proj"), _gated_experts_inputs)

# Known fused-expert module types by class name. Add an entry to teach HessianCollector
# another one.
FUSED_EXPERTS: dict[str, FusedExperts] = {"MixtralExperts": _GATED_EXPERTS}


def fused_experts(module: torch.nn.Module) -> FusedExperts | None:
    """How `module` routes tokens to its fused experts, or None if that is not known."""
    kind = FUSED_EXPERTS.get(type(module).__name__)
    if kind is not None:
        return kind
    # transformers 5 tags each experts class that its generic kernels (batched_mm,
    # grouped_mm) can run with layout flags; with these values the kernels compute
    # MixtralExperts' forward, so those classes (Qwen2/3-MoE, OLMoE, DeepSeek-V3 and
    # 50-odd others in 5.23) feed their experts alike.
    flags = {f: getattr(module, f, None) for f in
             ("is_concatenated", "is_transposed", "has_gate", "has_bias")}
    if (flags == {"is_concatenated": True, "is_transposed": False, "has_gate": True,
                  "has_bias": False}
            and all(getattr(module, p, None) is not None and getattr(module, p).dim() == 3
                    for p in _GATED_EXPERTS.params)):
        return _GATED_EXPERTS
    return None


class HessianCollector:
    """Accumulates H = sum x x^T (float32) over calibration batches for every expert weight
    of `model` that `selector` (e.g. an ExpertSelector) picks by parameter name: `with
    HessianCollector(model, sel) as c: run batches; c.save(path)`.

    An nn.Linear's `{module}.weight` gets H `[in, in]` and a token count. A fused parameter
    `[E, out, in]` of a module type `fused_experts` knows (transformers 5's MixtralExperts
    and its kind: `gate_up_proj`, `down_proj`) gets H `[E, in, in]` and a list of E counts,
    expert e's from the tokens routed to e; selecting a 3-D parameter of any other module
    is an error. Experts that receive no tokens are kept, with H = 0 and a count of 0 (GPTQ
    then falls back to round to nearest for them)."""

    def __init__(self, model: torch.nn.Module, selector: Callable[[str], bool]):
        self.model = model
        self.hessians: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int | list[int]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}    # of the weights
        self._hooks = []
        for mod_name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                weight_name = f"{mod_name}.weight"
                if selector(weight_name):
                    self._add(weight_name, mod.weight)
                    self._hooks.append(mod.register_forward_hook(self._hook(weight_name)))
                continue
            fused = {p: f"{mod_name}.{p}" for p, w in mod.named_parameters(recurse=False)
                     if w.dim() == 3 and selector(f"{mod_name}.{p}")}
            if not fused:
                continue
            kind = fused_experts(mod)
            for p, name in fused.items():
                if kind is None or p not in kind.params:
                    known = f"; its fused expert weights are {list(kind.params)}" if kind else (
                        ", which HessianCollector cannot route tokens for (add it to "
                        "qmoefmt.calibration.FUSED_EXPERTS)")
                    raise ValueError(f"{name}: selected 3-D parameter "
                                     f"{list(getattr(mod, p).shape)} of module type "
                                     f"{type(mod).__name__}{known}")
                self._add(name, getattr(mod, p))
            self._hooks.append(mod.register_forward_hook(self._fused_hook(kind, fused),
                                                         with_kwargs=True))
        if not self.hessians:
            raise ValueError("the selector matched no nn.Linear weights or fused expert "
                             "parameters of the model")

    def _add(self, name: str, weight: torch.Tensor) -> None:
        cols = weight.shape[-1]
        lead = tuple(weight.shape[:-2])
        self.hessians[name] = torch.zeros(*lead, cols, cols, dtype=torch.float32,
                                          device=weight.device)
        self.tokens[name] = [0] * lead[0] if lead else 0
        self.shapes[name] = tuple(weight.shape)

    def _hook(self, name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float32)
            if x.shape[0]:
                self.hessians[name].addmm_(x.T, x)
                self.tokens[name] += int(x.shape[0])
        return hook

    def _fused_hook(self, kind: FusedExperts, names: dict[str, str]):
        def hook(module, args, kwargs, _output):
            with torch.no_grad():
                for e, inputs in kind.inputs(module, args, kwargs, frozenset(names)):
                    for p, x in inputs.items():
                        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                        if x.shape[0]:
                            self.hessians[names[p]][e].addmm_(x.T, x)
                            self.tokens[names[p]][e] += int(x.shape[0])
        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> "HessianCollector":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def saved(self) -> tuple[dict[str, torch.Tensor], dict[str, int | list[int]]]:
        """The Hessians and counts under the names, and split as, `save_pretrained` writes
        the weights of a transformers model: transformers 5 writes Mixtral's fused
        `mlp.experts.gate_up_proj [E, 2I, H]` as `block_sparse_moe.experts.{e}.w1` and `w3
        [I, H]`, so each of those gets expert e's `[H, H]`. Other models: as collected."""
        return _as_saved(self.model, self.hessians, self.tokens, self.shapes)

    def save(self, path, *, names: str = "saved") -> None:
        """`names="saved"`: for packing the checkpoint `save_pretrained` writes (see
        `saved`); `"modules"`: the parameter names as collected, fused experts as 3-D
        Hessians, for a checkpoint of the module's own `state_dict`."""
        if names not in ("saved", "modules"):
            raise ValueError(f"names must be 'saved' or 'modules', not {names!r}")
        hessians, tokens = self.saved() if names == "saved" else (self.hessians, self.tokens)
        write_calibration(path, {k: v.cpu() for k, v in hessians.items()}, tokens)


def _as_saved(model, hessians: dict, tokens: dict, shapes: dict) -> tuple[dict, dict]:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return hessians, tokens
    if not isinstance(model, PreTrainedModel):
        return hessians, tokens
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        # Module names would not match the checkpoint: every expert would pack as RTN.
        raise ImportError("this transformers has no core_model_loading."
                          "revert_weight_conversion (qmoefmt follows transformers 5.x's); "
                          "save with names='modules' for a state_dict checkpoint") from None
    # save_pretrained renames, splits and merges weights through transformers' conversion
    # mapping. The same conversion run on probes (each collected weight as [..., rows, 1],
    # every row holding its own number) shows where each saved tensor's rows come from;
    # rows of one expert share its Hessian whatever the conversion does with them.
    sources, starts, probes, start = list(hessians), [], {}, 0
    for name in sources:
        shape = shapes[name]
        n = math.prod(shape[:-1])
        probes[name] = torch.arange(start, start + n, dtype=torch.float64).reshape(*shape[:-1], 1)
        starts.append(start)
        start += n
    bounds = torch.tensor(starts, dtype=torch.float64)
    out_h, out_t, used = {}, {}, set()
    for saved, probe in revert_weight_conversion(model, probes).items():
        if probe.dim() not in (2, 3) or probe.shape[-1] != 1:
            raise ValueError(f"{saved}: save_pretrained moves the input features of the "
                             f"collected weights in it (probes [..., rows, 1] came out "
                             f"{list(probe.shape)}); save with names='modules'")
        parts = []
        for rows in ([probe] if probe.dim() == 2 else list(probe)):
            src, expert = _probe_source(saved, rows, bounds, sources, starts, shapes)
            h = hessians[src] if expert is None else hessians[src][expert]
            # safetensors refuses to write one storage twice (w1 and w3 share expert e's).
            parts.append((h.clone() if (src, expert) in used else h,
                          tokens[src] if expert is None else tokens[src][expert]))
            used.add((src, expert))
        if probe.dim() == 2:
            out_h[saved], out_t[saved] = parts[0]
        else:
            out_h[saved] = torch.stack([h for h, _ in parts])
            out_t[saved] = [t for _, t in parts]
    missing = sorted(set(sources) - {src for src, _ in used})
    if missing:
        raise ValueError(f"save_pretrained would not write collected weights {missing[:3]}")
    return out_h, out_t


def _probe_source(saved: str, rows, bounds, sources: list, starts: list, shapes: dict):
    """(collected weight, expert or None) that every row of one saved probe comes from."""
    ids = rows.reshape(-1)
    k = torch.searchsorted(bounds, ids, right=True) - 1
    if not ids.numel() or (k != k[0]).any():
        raise ValueError(f"{saved}: save_pretrained mixes rows of several collected "
                         "weights in it; save with names='modules'")
    src = sources[int(k[0])]
    shape = shapes[src]
    if len(shape) != 3:
        return src, None
    e = torch.div(ids - starts[int(k[0])], shape[1], rounding_mode="floor")
    if (e != e[0]).any():
        raise ValueError(f"{saved}: save_pretrained mixes rows of several experts "
                         f"of {src} in it; save with names='modules'")
    return src, int(e[0])
