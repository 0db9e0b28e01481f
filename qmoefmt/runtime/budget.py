"""The expert memory budget: for models whose experts exceed device memory (what QMoE was
built for), compressed experts stay in mmap-backed host memory and an expert's arrays are
brought to the device on first use, the least recently used evicted to stay under the
budget. The policy knows nothing of devices: `move` makes a device copy of one array."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from ..codecs.base import RuntimeWeight
from ..errors import QmoeError


def host_copy(a: np.ndarray) -> np.ndarray:
    """The CPU's "device copy": the array read out of its file mapping into process memory."""
    return np.array(a, copy=True)


class ExpertCache:
    """Device copies of runtime weights, least recently used evicted beyond `budget`
    bytes. An expert larger than the whole budget is moved for each use and not kept."""

    def __init__(self, budget: int, move: Callable[[np.ndarray], object] = host_copy,
                 device: str = "cpu"):
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
            raise QmoeError(f"device_budget must be a number of bytes >= 0, not {budget!r}")
        self.budget, self.device, self._move = budget, device, move
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
