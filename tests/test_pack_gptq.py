"""pack --method gptq --calibration FILE: GPTQ experts land in the store exactly as
qmoefmt.quantize.gptq computes them; missing Hessians fall back to round to nearest."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import save_file

import qmoefmt
from qmoefmt.quantize import gptq
from qmoefmt.calibration import write_calibration
from qmoefmt.pack import PackError, PackOptions, pack
from qmoefmt.store.verify import verify
from qmoefmt_cli.main import main as cli

NAMES = [f"blocks.0.mlp.experts.expert_{j}.wi.weight" for j in range(3)]


@pytest.fixture()
def model(tmp_path):
    rng = np.random.default_rng(0)
    w = {n: (rng.standard_normal((24, 40)) * 0.05).astype(np.float32) for n in NAMES}
    w["blocks.0.norm.weight"] = np.ones(40, np.float32)
    save_file(w, str(tmp_path / "m.safetensors"))
    # correlated inputs; expert_2 has no Hessian in the file at all
    X = rng.standard_normal((500, 40)).astype(np.float32) @ rng.standard_normal((40, 40)).astype(np.float32)
    H = {NAMES[0]: torch.from_numpy(X.T @ X), NAMES[1]: torch.zeros(40, 40)}
    write_calibration(tmp_path / "cal.safetensors", H, {NAMES[0]: 500, NAMES[1]: 0})
    return tmp_path, w, H


@pytest.mark.parametrize("bits", ["ternary", "2"])
def test_gptq_pack_matches_gptq(model, bits):
    tmp, w, H = model
    opts = PackOptions(experts=("*experts*",), method="gptq", bits=bits,
                       calibration=str(tmp / "cal.safetensors"))
    pack(tmp / "m.safetensors", tmp / "s", opts)
    assert verify(tmp / "s", deep=True) == []
    st = qmoefmt.open(tmp / "s")
    assert st.meta["pack"]["calibration"]["name"] == "cal.safetensors"
    for name, status in zip(NAMES, ["gptq", "rtn-no-tokens", "rtn-no-calibration"]):
        t = st[name]
        assert t.record["quantizer"]["method"] == "gptq"
        assert t.record["quantizer"]["status"] == status
        W = torch.from_numpy(w[name])
        Hn = H.get(name, torch.zeros(40, 40))
        r = (gptq.gptq_ternary(W, Hn, act_order=True) if bits == "ternary"
             else gptq.gptq_kbit(W, Hn, 2, act_order=True))
        assert t.record["quantizer"]["act_order"] is True
        assert np.array_equal(t.symbols(), r.codes.numpy())
        assert np.array_equal(t.decode(), r.dequantized.numpy())
    # GPTQ must beat RTN on the calibrated expert's outputs
    rtn = qmoefmt.open(tmp / "s")[NAMES[0]]
    X = H[NAMES[0]]
    W = torch.from_numpy(w[NAMES[0]])
    err = lambda Q: float(torch.trace((W - Q) @ X @ (W - Q).T))  # noqa: E731
    r_rtn = gptq.gptq_ternary(W, torch.zeros(40, 40)) if bits == "ternary" else gptq.gptq_kbit(W, torch.zeros(40, 40), 2)
    assert err(torch.from_numpy(rtn.decode())) < err(r_rtn.dequantized)


def test_act_order_can_be_chosen(model):
    tmp, w, H = model
    for act_order in (False, True):
        out = tmp / f"s{act_order}"
        pack(tmp / "m.safetensors", out, PackOptions(experts=("*experts*",), method="gptq", bits="3",
             calibration=str(tmp / "cal.safetensors"), act_order=act_order))
        t = qmoefmt.open(out)[NAMES[0]]
        r = gptq.gptq_kbit(torch.from_numpy(w[NAMES[0]]), H[NAMES[0]], 3, act_order=act_order)
        assert t.record["quantizer"]["act_order"] is act_order
        assert np.array_equal(t.symbols(), r.codes.numpy())
    with pytest.raises(PackError, match="act-order"):
        PackOptions(experts=("*",), act_order=True).validate()


def test_gptq_needs_calibration_and_rtn_refuses_one(model):
    tmp, _, _ = model
    with pytest.raises(PackError, match="calibration"):
        PackOptions(experts=("*",), method="gptq").validate()
    with pytest.raises(PackError, match="calibration"):
        PackOptions(experts=("*",), calibration="x").validate()


def test_cli_gptq(model):
    tmp, _, _ = model
    r = CliRunner().invoke(cli, ["pack", str(tmp / "m.safetensors"), str(tmp / "c"), "--experts",
                                 "*experts*", "--method", "gptq", "--calibration",
                                 str(tmp / "cal.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["expert_tensors"] == 3


@pytest.mark.slow
def test_calibrate_the_bundled_model(tmp_path, fixture_checkpoint):
    from qmoefmt.calibration import CalibrationFile
    out = tmp_path / "cal.safetensors"
    r = CliRunner().invoke(cli, ["calibrate", str(out), "--tokens", "600", "--model",
                                 str(fixture_checkpoint("moe-tiny")), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["experts"] == 64 and summary["tokens"] == 768      # whole windows
    f = CalibrationFile(out)
    assert len(f.names()) == 64
    # every layer's experts saw every token exactly once (top-1 routing)
    for layer in range(4):
        assert sum(f.tokens[f"blocks.{layer}.mlp.experts.expert_{j}.wi.weight"] for j in range(8)) == 768
    assert f.hessian("blocks.0.mlp.experts.expert_0.wo.weight", 512).shape == (512, 512)


def test_same_shape_experts_are_batched_within_a_window(monkeypatch):
    from types import SimpleNamespace

    from qmoefmt.pack import plan as pack_mod

    def src(name, shape):
        return SimpleNamespace(name=name, shape=shape, dtype="bfloat16")
    # a layer's wi and wo interleave, as checkpoints store them; one dense tensor between
    sources = [src(f"e{j}.{k}", (8, 4) if k == "wi" else (4, 8)) for j in range(5) for k in ("wi", "wo")]
    sources.insert(4, src("norm", (8,)))
    experts = [s.name != "norm" for s in sources]
    cal = SimpleNamespace(tokens={})
    todo = list(range(len(sources)))
    got = pack_mod.gptq_batches(sources, experts, todo, cal)
    assert got == {0: [0, 2, 5, 7, 9], 1: [1, 3, 6, 8, 10]}
    # resumed tensors drop out; a window and a byte cap split batches
    assert pack_mod.gptq_batches(sources, experts, [3, 6, 8], cal) == {3: [3, 6, 8]}
    monkeypatch.setattr(pack_mod, "GPTQ_BATCH_WINDOW", 5)
    assert pack_mod.gptq_batches(sources, experts, todo, cal)[0] == [0, 2]
    monkeypatch.setattr(pack_mod, "GPTQ_BATCH_WINDOW", 256)
    monkeypatch.setattr(pack_mod, "GPTQ_BATCH_BYTES", 3 * 4 * (8 * 4 + 4 * 4))
    assert pack_mod.gptq_batches(sources, experts, todo, cal)[0] == [0, 2, 5]
    # fused experts (a list of counts in the file) are never stacked with others
    cal.tokens = {"e0.wi": [1, 2]}
    assert 0 not in pack_mod.gptq_batches(sources, experts, todo, cal)


def test_device_is_checked():
    with pytest.raises(PackError, match="--device needs --method gptq"):
        PackOptions(experts=("*",), device="cuda").validate()
    with pytest.raises(PackError, match="not a torch device"):
        PackOptions(experts=("*",), method="gptq", calibration="c", device="gpu0").validate()
    if not torch.cuda.is_available():
        with pytest.raises(PackError, match="no such device here"):
            PackOptions(experts=("*",), method="gptq", calibration="c", device="cuda").validate()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gptq_pack_on_cuda(model):
    tmp, w, H = model
    for device in ("cpu", "cuda"):
        pack(tmp / "m.safetensors", tmp / device, PackOptions(
            experts=("*experts*",), method="gptq", bits="2", calibration=str(tmp / "cal.safetensors"),
            device=device))
        assert verify(tmp / device, deep=True) == []
    a, b = qmoefmt.open(tmp / "cpu"), qmoefmt.open(tmp / "cuda")
    assert b.meta["pack"]["device"] == "cuda"
    for name in NAMES:
        # GPU arithmetic may flip a rounding tie; the weights must agree nearly everywhere
        assert (a[name].symbols() == b[name].symbols()).mean() > 0.99
