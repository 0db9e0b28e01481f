"""The GPU runtime on torch CUDA tensors: dense decode and products of every conformance
tensor, CompressedLinear and the bundled model on CUDA inputs, the expert budget moving
experts to the GPU, and a caller's stream. Skips without CuPy, CUDA torch or a device."""
from __future__ import annotations

import numpy as np
import pytest

from qmoefmt.backends import cuda

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (cuda.available() and torch.cuda.is_available()),
                                 reason="no CUDA GPU (or no CuPy / CUDA torch)")]

import qmoefmt  # noqa: E402
from qmoefmt.demo.model import load_model as load_dense  # noqa: E402
from qmoefmt.runtime import ExpertCache  # noqa: E402
from qmoefmt.testing import conformance, paths  # noqa: E402
from qmoefmt.testing.reference import assert_matmul_close  # noqa: E402
from qmoefmt.torch import CompressedLinear, load_model  # noqa: E402

# dense dtype -> (torch dtype, a same-width integer view for bitwise comparison)
DTYPES = {"float32": (torch.float32, torch.int32), "float16": (torch.float16, torch.int16),
          "bfloat16": (torch.bfloat16, torch.int16)}


def conformance_weights():
    return [(kind, store, name) for kind, store in conformance.cases()
            for name in conformance.manifest(kind)["stores"][store]["tensors"]]


@pytest.mark.parametrize("kind,store,name", conformance_weights())
def test_conformance_tensors_on_the_gpu(kind, store, name):
    """Decode bit for bit (float32, and float16 / bfloat16 as torch casts the float32
    values), products within fp32 accumulation for batches 1, 2, 3, 16, 19."""
    t = qmoefmt.open(paths.store(store))[name]
    want = conformance.vectors(kind, store)[f"{name}/values"].reshape(t.rows_cols)
    w = t.unit.runtime(t).copy(cuda.to_device)
    ref = torch.from_numpy(want)
    for dtype, (tdt, bits) in DTYPES.items():
        got = cuda.decode(w, dtype)
        assert got.is_cuda and got.dtype == tdt and tuple(got.shape) == want.shape
        assert torch.equal(got.cpu().view(bits), ref.to(tdt).view(bits)), dtype
    rng = np.random.default_rng(len(name))
    for batch in (1, 2, 3, 16, 19):
        x = rng.standard_normal((batch, want.shape[1])).astype(np.float32)
        y = cuda.matmul(w, torch.from_numpy(x).cuda())
        assert y.is_cuda and y.dtype == torch.float32 and tuple(y.shape) == (batch, want.shape[0])
        assert_matmul_close(y.cpu().numpy(), x, want)


def test_a_weight_left_on_the_host_is_refused():
    t = qmoefmt.open(paths.store("switch-tiny.qmoe"))[
        "encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight"]
    with pytest.raises(ValueError, match="not on cuda"):
        cuda.matmul(t.runtime(), torch.ones(1, t.shape[1], device="cuda"))


@pytest.mark.parametrize("store", ["switch-tiny.qmoe", "switch-tiny-qmoe2023.qmoe",
                                   "switch-tiny-2bit.qmoe", "switch-tiny-2bit-dict16.qmoe"])
def test_compressed_linear_on_cuda_inputs(store):
    """The CUDA forward equals the CPU one within fp32 accumulation, keeps the input's
    leading shape and dtype, and runs on the caller's stream."""
    st = qmoefmt.open(paths.store(store))
    lin = CompressedLinear(st["encoder.block.1.layer.1.mlp.experts.expert_1.wi.weight"])
    x = torch.randn(2, 5, lin.in_features)
    want = lin(x)
    got = lin(x.cuda())
    assert got.is_cuda and got.shape == want.shape
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-5)
    assert lin(x.cuda().to(torch.bfloat16)).dtype == torch.bfloat16
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        y = lin(x.cuda())
    side.synchronize()
    torch.testing.assert_close(y.cpu(), want, rtol=0, atol=1e-5)


def test_the_bundled_model_on_the_gpu_with_an_expert_budget(bundled_store):
    """The bundled model's logits on the GPU equal the dequantized dense model's there
    within fp32 accumulation, with every expert resident, and the same again with a
    budget of three experts on the GPU (moved and evicted by the cache)."""
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = load_dense(paths.checkpoint("moe-tiny")).eval()
    ref.load_state_dict({k: bundled_store[k].torch(dtype=v.dtype)
                         for k, v in ref.state_dict().items()})
    ref.cuda()
    gpu = load_dense(paths.checkpoint("moe-tiny")).eval()
    load_model(bundled_store, gpu, preset="switch")
    gpu.cuda()
    sizes = [bundled_store[k].runtime().nbytes for k in bundled_store
             if bundled_store[k].unit.multiplies]
    small = load_dense(paths.checkpoint("moe-tiny")).eval()
    load_model(bundled_store, small, preset="switch")
    cache = ExpertCache(3 * max(sizes), device="cuda")
    for m in small.modules():
        if isinstance(m, CompressedLinear):
            m.cache = cache
    small.cuda()
    with torch.no_grad():
        want, _ = ref(tokens.cuda())
        got, _ = gpu(tokens.cuda())
        budgeted, _ = small(tokens.cuda())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    torch.testing.assert_close(budgeted, got, rtol=0, atol=0)
    s = cache.stats()
    assert s["device"] == "cuda" and s["misses"] > 3 and s["evictions"] > 0
    assert s["resident_bytes"] <= 3 * max(sizes)
