"""Running a model from its store: CompressedLinear and load_model on the bundled model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qmoefmt
from qmoefmt.demo.model import heldout_loss, load_model as load_dense
from qmoefmt.demo.textdata import heldout_tokens
from qmoefmt.errors import QmoeError
from qmoefmt.pack import PackOptions, pack
from qmoefmt.testing import paths
from qmoefmt.torch import CompressedLinear, load_model


@pytest.fixture(scope="module")
def tiny_store(bundled_store):
    return bundled_store


def dequantized_model(store):
    """The decode-then-dense reference: the bundled model with every weight decoded."""
    model = load_dense(paths.checkpoint("moe-tiny")).eval()
    model.load_state_dict({k: store[k].torch(dtype=v.dtype) for k, v in model.state_dict().items()})
    return model


def test_compressed_linear_is_the_dequantized_linear(tiny_store):
    t = tiny_store["blocks.0.mlp.experts.expert_0.wi.weight"]
    lin = CompressedLinear(t)
    assert (lin.out_features, lin.in_features) == t.shape and "ternary" in repr(lin)
    x = torch.randn(2, 5, t.shape[1])
    want = x.double() @ torch.from_numpy(t.decode()).double().T
    assert torch.allclose(lin(x).double(), want, rtol=0, atol=1e-5)
    assert lin(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with torch.no_grad():
        assert lin(x[:0]).shape == (0, 5, t.shape[0])


def test_compressed_linear_stacks_tensors_by_rows(tiny_store):
    """Several store tensors of one input width are one weight, their rows stacked in order
    (transformers' fused gate_up = [w1; w3]), never stacked in memory."""
    ts = [tiny_store[f"blocks.0.mlp.experts.expert_{e}.wi.weight"] for e in (2, 0)]
    lin = CompressedLinear(ts)
    assert lin.weight is None and lin.out_features == 2 * ts[0].shape[0]
    x = torch.randn(3, ts[0].shape[1])
    w = np.concatenate([t.decode() for t in ts])
    want = x.double() @ torch.from_numpy(w).double().T
    assert torch.allclose(lin(x).double(), want, rtol=0, atol=1e-5)
    wo = tiny_store["blocks.0.mlp.experts.expert_0.wo.weight"]
    with pytest.raises(QmoeError, match="input features"):
        CompressedLinear([ts[0], wo])


def test_the_bundled_model_runs_from_its_store(tiny_store):
    """Same logits as the dequantized dense model within fp32 accumulation, and the same
    held-out loss to 4 decimals."""
    model = load_dense(paths.checkpoint("moe-tiny")).eval()
    done = load_model(tiny_store, model, preset="switch")
    assert len(done["compressed"]) == 64 and done["dequantized"] == done["unused"] == []
    assert sorted(done["compressed"] + done["dense"]) == sorted(tiny_store)
    assert sum(isinstance(m, CompressedLinear) for m in model.modules()) == 64
    assert not any(n.endswith(("wi.weight", "wo.weight")) for n, _ in model.named_parameters())
    ref = dequantized_model(tiny_store)
    tokens = torch.from_numpy(heldout_tokens()[:4 * 257].astype(np.int64)).reshape(4, 257)
    with torch.no_grad():
        got, _ = model(tokens[:, :-1])
        want, _ = ref(tokens[:, :-1])
    assert torch.allclose(got, want, rtol=0, atol=1e-4)
    sample = heldout_tokens()[:32 * 257]
    assert round(heldout_loss(model, sample), 4) == round(heldout_loss(ref, sample), 4)


def test_the_bundled_model_runs_from_a_2bit_store(tmp_path):
    out = tmp_path / "moe-tiny-2bit.qmoe"
    pack(paths.checkpoint("moe-tiny"), out, PackOptions(preset="switch", bits="2"))
    store = qmoefmt.open(out)
    # --kbit-codec auto: the signs pay for their 48 KiB compact dictionary (spec §5.7)
    assert {store[n].codec for n in store if store[n].unit.expert} == {"qmoe.uint-dict16"}
    model = load_dense(paths.checkpoint("moe-tiny")).eval()
    assert len(load_model(store, model, preset="switch")["compressed"]) == 64
    tokens = torch.from_numpy(heldout_tokens()[:2 * 257].astype(np.int64)).reshape(2, 257)
    with torch.no_grad():
        got, _ = model(tokens[:, :-1])
        want, _ = dequantized_model(store)(tokens[:, :-1])
    assert torch.allclose(got, want, rtol=0, atol=1e-4)


def test_load_model_names_what_the_store_lacks(tiny_store, tmp_path):
    model = load_dense(paths.checkpoint("moe-tiny")).eval()
    model.register_buffer("extra", torch.zeros(3))
    with pytest.raises(QmoeError, match=r"lacks 1 tensors of the model, e.g. \['extra'\]"):
        load_model(tiny_store, model, preset="switch")


def test_dict16_experts_multiply_too():
    store = qmoefmt.open(paths.store("switch-tiny-2bit-dict16.qmoe"))
    t = next(store[n] for n in store if store[n].unit.expert)
    x = torch.randn(3, t.shape[1])
    torch.testing.assert_close(CompressedLinear(t)(x), x @ torch.from_numpy(t.decode()).T,
                               rtol=1e-5, atol=1e-5)


def test_a_dense_tensor_is_not_a_compressed_linear():
    store = qmoefmt.open(paths.store("switch-tiny-2bit-dict16.qmoe"))
    t = next(store[n] for n in store if not store[n].unit.expert and len(store[n].shape) == 2)
    with pytest.raises(QmoeError, match="no fused matmul"):
        CompressedLinear(t)
