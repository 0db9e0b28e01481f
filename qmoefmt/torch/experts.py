"""`CompressedExperts`: stands in for a transformers 5 fused experts module (Mixtral's
`MixtralExperts` and the classes built like it: `gate_up_proj [E, 2I, H]`,
`down_proj [E, H, I]`), each expert's projections multiplied from their codes."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import QmoeError
from ..quantize.collector import fused_experts
from ..runtime import ExpertCache
from ..store.reader import Tensor
from .linear import CompressedLinear

GATED_PARAMS = ("gate_up_proj", "down_proj")


def is_gated_experts(module: nn.Module) -> bool:
    """Whether `module` computes MixtralExperts' forward: per expert e,
    down_e(act(gate_e x) * up_e x) with [gate; up] = gate_up_proj[e], weighted and summed."""
    kind = fused_experts(module)
    if kind is None or tuple(kind.params) != GATED_PARAMS or not hasattr(module, "act_fn"):
        return False
    # A class with its own _apply_gate (clamped or interleaved gates) computes something
    # else from the same weights.
    gate = getattr(type(module), "_apply_gate", None)
    return gate is None or gate.__name__ == "_default_apply_gate"


class CompressedExperts(nn.Module):
    """Same forward as MixtralExperts, `(hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]`, with expert e's weights coded in the store:
    `gate_up[e]` the store tensors whose rows stacked are its [gate; up] (w1 then w3),
    `down[e]` those of its down projection. Only experts that tokens were routed to run,
    on those tokens only; no dense expert weight is ever built."""

    def __init__(self, gate_up: Sequence[Sequence[Tensor]], down: Sequence[Sequence[Tensor]],
                 act_fn: nn.Module, backend: str | None = None,
                 cache: ExpertCache | None = None):
        super().__init__()
        if len(gate_up) != len(down) or not gate_up:
            raise QmoeError(f"CompressedExperts: {len(gate_up)} gate_up and {len(down)} down "
                            "projections; each expert needs one of each")
        self.gate_up = nn.ModuleList(CompressedLinear(ts, backend=backend, cache=cache)
                                     for ts in gate_up)
        self.down = nn.ModuleList(CompressedLinear(ts, backend=backend, cache=cache)
                                  for ts in down)
        for up, dn in zip(self.gate_up, self.down):
            if (up.out_features != 2 * dn.in_features or dn.out_features != up.in_features
                    or up.in_features != self.gate_up[0].in_features):
                raise QmoeError(f"{dn.tensor.where}: down [{dn.out_features}, "
                                f"{dn.in_features}] does not fit gate_up [{up.out_features}, "
                                f"{up.in_features}] (or another expert's width)")
        self.num_experts = len(gate_up)
        self.act_fn = act_fn

    def extra_repr(self) -> str:
        up = self.gate_up[0]
        return (f"num_experts={self.num_experts}, hidden={up.in_features}, "
                f"intermediate={up.out_features // 2}")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            # An index of E or more marks an unused slot (expert parallelism), as in the
            # original's one_hot over E + 1 classes.
            if not 0 <= e < self.num_experts:
                continue
            # A token picks an expert at most once, so its rows here are distinct.
            token, slot = torch.nonzero(top_k_index == e, as_tuple=True)
            gate, up = self.gate_up[e](hidden_states[token]).chunk(2, dim=-1)
            y = self.down[e](self.act_fn(gate) * up) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out
