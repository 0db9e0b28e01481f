"""`CompressedLinear`: an `nn.Linear` whose weight stays coded in the store."""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import QmoeError
from ..runtime import ExpertCache
from ..store.reader import Tensor


def check_fused(tensor: Tensor) -> None:
    """Raises unless `tensor` multiplies straight from its codes (a 2-D coded weight)."""
    if not tensor.unit.multiplies or len(tensor.shape) != 2:
        raise QmoeError(f"{tensor.where}: {tensor.codec} {list(tensor.shape)} has no fused "
                        "matmul; load it dense instead")


class CompressedLinear(nn.Module):
    """`nn.Linear` whose weight stays coded in the store: forward is the fused
    decode-matmul, with fp32 accumulation, returned in the input's dtype.

    `tensor` may be several store tensors of one input width whose rows, stacked in order,
    make the weight (transformers' fused gate_up = [w1; w3]): each is multiplied on its
    own and the outputs concatenated, so the stack is never built either.

    The arrays are validated once, here (`Tensor.runtime`); with a `cache` (the expert
    memory budget) each forward takes the weights' device copies from it."""

    def __init__(self, tensor: Tensor | Sequence[Tensor], bias: torch.Tensor | None = None,
                 backend: str | None = None, cache: ExpertCache | None = None):
        super().__init__()
        tensors = [tensor] if isinstance(tensor, Tensor) else list(tensor)
        if not tensors:
            raise QmoeError("CompressedLinear needs at least one store tensor")
        for t in tensors:
            check_fused(t)
            if t.shape[1] != tensors[0].shape[1]:
                raise QmoeError(f"{t.where}: {t.shape[1]} input features, {tensors[0].name} "
                                f"has {tensors[0].shape[1]}; they cannot stack into one weight")
        self.tensors = tensors
        self.weights = [t.runtime() for t in tensors]
        self.backend = backend
        self.cache = cache
        self._device_weights: dict[torch.device, list] = {}     # GPU copies, without a cache
        self.in_features = tensors[0].shape[1]
        self.out_features = sum(t.shape[0] for t in tensors)
        # Declared absent, as nn.Linear's bias can be: code that reads `.weight` (e.g.
        # Switch's dtype check before `wo`) sees None instead of an AttributeError.
        self.register_parameter("weight", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    @property
    def tensor(self) -> Tensor:
        """The store tensor, when the weight is one."""
        return self.tensors[0]

    def extra_repr(self) -> str:
        codecs = sorted({t.codec for t in self.tensors})
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, codec={','.join(codecs)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            return self._forward_cuda(x)
        if x.device.type != "cpu":
            raise QmoeError(f"{self.tensor.name}: compressed experts run on the CPU or a CUDA "
                            f"GPU (input on {x.device})")
        flat = x.detach().reshape(-1, self.in_features).to(torch.float32).numpy()
        weights = self.weights if self.cache is None else map(self.cache.get, self.weights)
        parts = [torch.from_numpy(w.matmul(flat, self.backend)) for w in weights]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def _forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        """The GPU runtime's fused kernels on x's device and current stream; the weights'
        copies there come from the cache, else are made on first use and kept."""
        from ..backends import cuda
        if self.cache is not None:
            weights = [self.cache.get(w) for w in self.weights]
        else:
            if x.device not in self._device_weights:
                move = functools.partial(cuda.to_device, index=x.device.index)
                self._device_weights[x.device] = [w.copy(move) for w in self.weights]
            weights = self._device_weights[x.device]
        parts = [cuda.matmul(w, x) for w in weights]
        y = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(x.dtype)
        return y if self.bias is None else y + self.bias
