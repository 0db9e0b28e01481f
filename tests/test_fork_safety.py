"""A process that decoded (a Numba parallel kernel ran) can fork, and the child decodes
too: multiprocessing's fork start method, torch DataLoader workers and Dask process pools
do this. Under GNU OpenMP, Numba's default layer in pip wheels, the child died."""
from __future__ import annotations

import multiprocessing
import queue as queues

import numba
import numpy as np
import pytest

import qmoefmt
from qmoefmt.testing import paths

STORE = "edge-3bit-g16.qmoe"       # k-bit: its decode unpacks levels in a parallel kernel
TERNARY = "edge.qmoe"


def _child(store: str, name: str, queue) -> None:
    queue.put(qmoefmt.open(store)[name].decode().tobytes())


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                    reason="no fork on this platform")
@pytest.mark.parametrize("store", [STORE, TERNARY])
def test_a_forked_child_decodes_after_its_parent_did(store):
    st = qmoefmt.open(paths.store(store))
    name = next(n for n in st if st[n].unit.expert and min(st[n].shape) > 1)
    want = st[name].decode()
    # the layer chosen at the first launch, above: never GNU OpenMP unless asked for
    assert numba.threading_layer() in ("tbb", "workqueue") or (
        numba.config.THREADING_LAYER not in ("default", "forksafe"))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(str(paths.store(store)), name, queue))
    child.start()
    got = None
    for _ in range(240):
        try:
            got = queue.get(timeout=0.5)
            break
        except queues.Empty:
            if not child.is_alive():
                break
    child.join(timeout=60)
    assert child.exitcode == 0
    assert np.array_equal(np.frombuffer(got, np.float32).reshape(want.shape), want)


def test_threads_decode_at_once():
    """With TBB (a dependency where wheels exist), kernels launched from several threads at
    once are fine: a threaded server or Dask's threaded scheduler decodes in parallel.
    (Under workqueue, the fallback, the process would abort: hence the skip.)"""
    from concurrent.futures import ThreadPoolExecutor
    st = qmoefmt.open(paths.store(STORE))
    names = [n for n in st if st[n].unit.expert and min(st[n].shape) > 1]
    want = {n: st[n].decode() for n in names}
    if numba.threading_layer() != "tbb":
        pytest.skip(f"threading layer {numba.threading_layer()}, not tbb")
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda n: st[n].decode(), names * 8))
    assert all(np.array_equal(g, want[n]) for g, n in zip(got, names * 8))
