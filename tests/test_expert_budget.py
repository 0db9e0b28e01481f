"""The expert memory budget (spec-independent policy, tested on the CPU): experts stay
mapped from the store and are copied to the "device" on first use, the least recently
used evicted under the budget, and outputs never change."""
import numpy as np
import pytest
import torch

import qmoefmt
from qmoefmt.demo.model import load_model as load_dense
from qmoefmt.errors import QmoeError
from qmoefmt.runtime import ExpertCache
from qmoefmt.testing import paths
from qmoefmt.torch import load_model


def experts(store_name="switch-tiny.qmoe", n=6):
    store = qmoefmt.open(paths.store(store_name))
    names = [k for k in store if store[k].unit.multiplies and len(store[k].shape) == 2][:n]
    return [store[k].runtime() for k in names]


def test_lru_evicts_the_least_recently_used_under_the_budget():
    ws = experts()
    size = max(w.nbytes for w in ws)
    cache = ExpertCache(2 * size)
    for i in (0, 1, 0, 2):          # 0 was used after 1: 1 goes when 2 comes
        cache.get(ws[i])
    s = cache.stats()
    assert (s["hits"], s["misses"], s["evictions"]) == (1, 3, 1)
    assert s["bytes_moved"] == ws[0].nbytes + ws[1].nbytes + ws[2].nbytes
    assert s["resident_bytes"] <= 2 * size
    cache.get(ws[0])
    assert cache.stats()["hits"] == 2          # still resident
    cache.get(ws[1])
    assert cache.stats()["misses"] == 4        # was evicted


def test_device_copies_multiply_like_the_mapped_weights():
    rng = np.random.default_rng(0)
    cache = ExpertCache(10**9)
    for w in experts():
        copy = cache.get(w)
        for name, a in copy.arrays().items():
            assert not isinstance(a, np.memmap) and a.base is None, name
            assert np.array_equal(a, w.arrays()[name])
        x = rng.standard_normal((3, w.shape[1])).astype(np.float32)
        assert np.array_equal(copy.matmul(x), w.matmul(x))


def test_an_expert_over_the_budget_is_moved_each_time_and_not_kept():
    w = experts(n=1)[0]
    cache = ExpertCache(w.nbytes - 1)
    cache.get(w)
    cache.get(w)
    s = cache.stats()
    assert (s["misses"], s["hits"], s["resident"], s["bytes_moved"]) == (2, 0, 0, 2 * w.nbytes)


@pytest.mark.parametrize("budget", [-1, 1.5, True, "1e6"])
def test_a_bad_budget_is_refused(budget):
    with pytest.raises(QmoeError, match="device_budget"):
        ExpertCache(budget)


def test_the_bundled_model_under_a_small_budget_gives_the_same_logits(bundled_store):
    store = bundled_store
    x = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    free = load_dense(paths.checkpoint("moe-tiny")).eval()
    load_model(store, free, preset="switch")
    sizes = [store[k].runtime().nbytes for k in store if store[k].unit.multiplies]
    small = load_dense(paths.checkpoint("moe-tiny")).eval()
    report = load_model(store, small, preset="switch", device_budget=3 * max(sizes))
    with torch.no_grad():
        want, got = free(x), small(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    s = report["cache"].stats()
    assert s["misses"] > 3 and s["evictions"] > 0
    assert s["resident_bytes"] <= 3 * max(sizes)
    assert min(sizes) * s["misses"] <= s["bytes_moved"] <= max(sizes) * s["misses"]
    with torch.no_grad():
        small(x[:, :1])
    assert report["cache"].stats()["hits"] + report["cache"].stats()["misses"] > s["misses"]


def test_without_a_budget_there_is_no_cache(bundled_store):
    model = load_dense(paths.checkpoint("moe-tiny")).eval()
    assert load_model(bundled_store, model, preset="switch")["cache"] is None
