"""The expert memory budget: for models whose experts exceed device memory (what QMoE was
built for), compressed experts stay in mmap-backed host memory and an expert's arrays are
brought to the device on first use, the least recently used evicted to stay under the
budget. The policy knows nothing of devices: `move` makes a device copy of one array."""
from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from ..codecs.base import RuntimeWeight
from ..errors import QmoeError


def host_copy(a: np.ndarray) -> np.ndarray:
    """The CPU's "device copy": the array read out of its file mapping into process memory."""
    return np.array(a, copy=True)


def device_move(device: str) -> Callable[[np.ndarray], object]:
    """The `move` for a device name: host_copy for "cpu", a CuPy copy for "cuda" or
    "cuda:N" (the GPU runtime, imported only then)."""
    if device == "cpu":
        return host_copy
    kind, _, index = device.partition(":")
    if kind != "cuda" or not (index.isdigit() or not index):
        raise QmoeError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {device!r}")
    from ..backends import cuda
    return functools.partial(cuda.to_device, index=int(index) if index else None)


class ExpertCache:
    """Device copies of runtime weights, least recently used evicted beyond `budget`
    bytes. An expert larger than the whole budget is moved for each use and not kept.
    `move` defaults to `device_move(device)`."""

    def __init__(self, budget: int, move: Callable[[np.ndarray], object] | None = None,
                 device: str = "cpu"):
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise QmoeError(f"device_budget must be a number of bytes >= 0, not {budget!r}")
        self.budget, self.device = budget, device
        self._move = move or device_move(device)
        self._resident: OrderedDict[int, tuple[RuntimeWeight, RuntimeWeight]] = OrderedDict()
        self.resident_bytes = self.hits = self.misses = self.evictions = self.bytes_moved = 0

    def get(self, weight: RuntimeWeight) -> RuntimeWeight:
        """`weight` on the device: its resident copy (a hit), else a new one (a miss)."""
        key = id(weight)           # the entry holds `weight`, so its id is not reused
        entry = self._resident.get(key)
        if entry is not None:
            self.hits += 1
            self._resident.move_to_end(key)
            return entry[1]
        self.misses += 1
        n = weight.nbytes
        copy = weight.copy(self._move)
        self.bytes_moved += n
        if n > self.budget:
            return copy
        while self.resident_bytes + n > self.budget:
            _, (old, _) = self._resident.popitem(last=False)
            self.resident_bytes -= old.nbytes
            self.evictions += 1
        self._resident[key] = (weight, copy)
        self.resident_bytes += n
        return copy

    def stats(self) -> dict:
        return {"device": self.device, "budget": self.budget, "resident_bytes": self.resident_bytes,
                "resident": len(self._resident), "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "bytes_moved": self.bytes_moved}
