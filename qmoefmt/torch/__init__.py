"""PyTorch modules that run straight from a store: expert linears multiply from their
compressed arrays (`Tensor.matmul`), never holding a dense weight.

CPU only for now: the GPU kernels plug in here when a CUDA decode backend exists.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import QmoeError
from ..selection import ExpertSelector
from ..store.reader import Store, Tensor


class CompressedLinear(nn.Module):
    """`nn.Linear` whose weight stays coded in the store: forward is the fused
    decode-matmul, with fp32 accumulation, returned in the input's dtype."""

    def __init__(self, tensor: Tensor, bias: torch.Tensor | None = None,
                 backend: str | None = None):
        super().__init__()
        if not hasattr(tensor.unit, "matmul") or len(tensor.shape) != 2:
            raise QmoeError(f"{tensor.where}: {tensor.codec} {list(tensor.shape)} has no fused "
                            "matmul; load it dense instead")
        for name in tensor.unit.arrays:        # checksums once, not on every forward
            tensor.array(name)
        self.tensor = tensor
        self.backend = backend
        self.out_features, self.in_features = tensor.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, codec={self.tensor.codec}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise QmoeError(f"{self.tensor.name}: compressed experts run on the CPU only "
                            f"(input on {x.device})")
        flat = x.detach().reshape(-1, self.in_features).to(torch.float32).numpy()
        y = torch.from_numpy(self.tensor.matmul(flat, check_crc=False, backend=self.backend))
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


def load_model(store: Store, model: nn.Module, *, experts=(), preset: str | None = None,
               backend: str | None = None) -> dict:
    """Runs `model` from `store`: every `nn.Linear` whose weight the selector picks (the
    pack globs / preset) and whose codec multiplies fused becomes a CompressedLinear;
    every other parameter and buffer the store holds is loaded dense (dequantized where
    coded). Every model tensor must be in the store. -> what was done, by tensor name."""
    selector = ExpertSelector(experts, preset)
    compressed = []
    for name, module in list(model.named_modules()):
        weight = f"{name}.weight"
        if not (isinstance(module, nn.Linear) and selector(weight) and weight in store):
            continue
        t = store[weight]
        if not hasattr(t.unit, "matmul"):
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, CompressedLinear(t, module.bias, backend))
        compressed.append(weight)
    state = model.state_dict()        # a CompressedLinear's bias is in it, dense as stored
    missing = [k for k in state if k not in store]
    if missing:
        raise QmoeError(f"{store.path}: the store lacks {len(missing)} tensors of the model, "
                        f"e.g. {missing[:3]}")
    dense = {k: store[k].torch(dtype=v.dtype) for k, v in state.items()}
    model.load_state_dict(dense, strict=False)
    return {"compressed": compressed, "dense": sorted(dense)}


__all__ = ["CompressedLinear", "load_model"]
