"""Sequential mode (qmoefmt.sequential): layers in forward order, each calibrated on the
model with the layers before it quantized, and a file that pack turns into exactly the
weights the pass used."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import qmoefmt
from qmoefmt.calibration import CalibrationFile, write_calibration
from qmoefmt.errors import FormatError
from qmoefmt.demo.model import MoEConfig, SwitchMoELM, save_model
from qmoefmt.pack import PackError, PackOptions, pack
from qmoefmt.selection import ExpertSelector
from qmoefmt.quantize.sequential import default_layer_key, expert_layers, sequential_calibrate, sublayer_key
from qmoefmt_cli.main import main as cli

SWITCH = ExpertSelector(preset="switch")
CONFIG = MoEConfig(context=16, d_model=32, n_layers=3, n_heads=2, d_ff=64, n_experts=4)


def small_model() -> SwitchMoELM:
    torch.manual_seed(0)
    return SwitchMoELM(CONFIG).eval()


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return list(torch.randint(0, 256, (3, 8, CONFIG.context), generator=g))


def layer_names(layer: int) -> list[str]:
    return [f"blocks.{layer}.mlp.experts.expert_{j}.{k}.weight"
            for j in range(CONFIG.n_experts) for k in ("wi", "wo")]


def test_layer_keys():
    assert default_layer_key("blocks.3.mlp.experts.expert_5.wi.weight") == "blocks.3.mlp.experts"
    assert (default_layer_key("model.layers.0.block_sparse_moe.experts.5.w1.weight")
            == "model.layers.0.block_sparse_moe.experts")
    # the last "experts" counts, and without one the expert module's parent is the layer
    assert default_layer_key("experts.1.moe.experts.2.fc.weight") == "experts.1.moe.experts"
    assert default_layer_key("layers.2.ffn.e7.fc1.weight") == "layers.2.ffn"


def test_grouping_of_the_switch_model():
    layers = expert_layers(small_model(), SWITCH)
    assert list(layers) == [f"blocks.{i}.mlp.experts" for i in range(CONFIG.n_layers)]
    for i, names in enumerate(layers.values()):
        assert sorted(names) == sorted(layer_names(i))
    with pytest.raises(ValueError, match="matched no"):
        expert_layers(small_model(), ExpertSelector(["nothing*"]))


class _Moe(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(d, d, bias=False) for _ in range(2))

    def forward(self, x):
        return x + self.experts[0](x[: len(x) // 2]).sum(0) + self.experts[1](x[len(x) // 2:]).sum(0)


class _Reversed(torch.nn.Module):
    """Registered late-then-early, run early-then-late."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.late = _Moe(8)
        self.early = _Moe(8)

    def forward(self, x):
        return self.late(self.early(x))


def test_layers_are_quantized_in_forward_order_not_module_order():
    m = _Reversed()
    assert list(expert_layers(m, ExpertSelector(["*experts*"]))) == ["late.experts", "early.experts"]
    seen = []
    r = sequential_calibrate(m, [torch.randn(6, 8)], ExpertSelector(["*experts*"]),
                             progress=lambda done, n, key: seen.append((done, n, key)))
    assert [key for key, _ in r.layers] == ["early.experts", "late.experts"]
    assert seen == [(1, 2, "early.experts"), (2, 2, "late.experts")]


def test_batches_must_be_reiterable():
    with pytest.raises(TypeError, match="re-iterable"):
        sequential_calibrate(small_model(), iter(batches()), SWITCH)


def _hessians_by_hand(model, names, runs) -> dict[str, torch.Tensor]:
    """sum x x^T over all inputs of each named linear, from its concatenated inputs."""
    xs = {n: [] for n in names}
    hooks = [model.get_submodule(n.removesuffix(".weight")).register_forward_hook(
        lambda _m, i, _o, n=n: xs[n].append(i[0].reshape(-1, i[0].shape[-1]).double()))
        for n in names]
    with torch.no_grad():
        for b in runs:
            model(b)
    for h in hooks:
        h.remove()
    out = {}
    for n in names:
        x = torch.cat(xs[n]) if xs[n] else torch.zeros(0, model.get_submodule(n[:-7]).in_features)
        out[n] = (x.T @ x).float()
    return out


@pytest.mark.parametrize("key", [sublayer_key, default_layer_key])
def test_each_layer_is_calibrated_on_the_earlier_layers_quantized(key):
    dense = small_model()
    model = copy.deepcopy(dense)
    r = sequential_calibrate(model, batches(), SWITCH, bits="2", layer_key=key)
    want = [f"blocks.{i}.mlp.experts" + ("/" + k if key is sublayer_key else "")
            for i in range(CONFIG.n_layers) for k in (("wi", "wo") if key is sublayer_key else ("",))]
    assert [k for k, _ in r.layers] == want
    quantized = model.state_dict()
    earlier = []
    for step, (_, names) in enumerate(r.layers):
        # Independently: the dense model with every earlier step set to the pass's weights.
        ref = copy.deepcopy(dense)
        ref.load_state_dict({**ref.state_dict(), **{n: quantized[n] for n in earlier}})
        expect = _hessians_by_hand(ref, names, batches())
        plain = _hessians_by_hand(dense, names, batches())
        for n in names:
            torch.testing.assert_close(r.hessians[n], expect[n], rtol=1e-5, atol=1e-5)
        if step:   # the check has teeth: the dense model's Hessians differ
            assert any(not torch.allclose(plain[n], expect[n], rtol=1e-3, atol=1e-4) for n in names)
        earlier += names
    total = sum(int(b.numel()) for b in batches())
    for layer in range(CONFIG.n_layers):
        assert sum(r.tokens[n] for n in layer_names(layer) if ".wi." in n) == total
    # every expert of every layer now holds its GPTQ weights
    for n in r.hessians:
        assert not torch.equal(quantized[n], dense.state_dict()[n])


@pytest.mark.parametrize("bits,group_size,act_order", [("ternary", None, None), ("2", None, None),
                                                       ("3", 16, False)])
def test_pack_reproduces_the_sequential_weights(tmp_path, bits, group_size, act_order):
    dense = small_model()
    save_model(dense, tmp_path / "m.safetensors")
    model = copy.deepcopy(dense)
    r = sequential_calibrate(model, batches(), SWITCH, bits=bits, group_size=group_size,
                             act_order=act_order)
    r.save(tmp_path / "cal.safetensors")
    f = CalibrationFile(tmp_path / "cal.safetensors")
    opts = PackOptions(preset="switch", method="gptq", bits=bits, group_size=group_size,
                       calibration=str(tmp_path / "cal.safetensors"), act_order=act_order)
    assert f.sequential == {"bits": bits, "group_size": group_size,
                            "act_order": opts.gptq_act_order, "damp": 0.1}
    assert f.tokens == r.tokens
    pack(tmp_path / "m.safetensors", tmp_path / "s", opts)
    st = qmoefmt.open(tmp_path / "s")
    weights = model.state_dict()
    assert len(r.hessians) == 2 * CONFIG.n_layers * CONFIG.n_experts
    for n in r.hessians:
        assert st[n].record["quantizer"]["status"] == r.status[n]
        assert np.array_equal(st[n].decode(), weights[n].numpy()), n


def test_file_metadata_round_trips_and_is_checked(tmp_path):
    h, t = {"e.w": torch.eye(3)}, {"e.w": 5}
    settings = {"bits": "2", "group_size": 128, "act_order": True, "damp": 0.1}
    write_calibration(tmp_path / "c.safetensors", h, t, sequential=settings)
    f = CalibrationFile(tmp_path / "c.safetensors")
    assert f.sequential == settings and f.tokens == t
    from safetensors import safe_open
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as g:
        assert g.metadata()["version"] == "1.1"
        assert json.loads(g.metadata()["sequential"]) == settings
    write_calibration(tmp_path / "d.safetensors", h, t)
    assert CalibrationFile(tmp_path / "d.safetensors").sequential is None
    with pytest.raises(ValueError, match="group_size"):
        write_calibration(tmp_path / "e.safetensors", h, t,
                          sequential={**settings, "bits": "ternary"})
    for bad, what in [("{", "not JSON"), (json.dumps({**settings, "act_order": 1}), "act_order"),
                      (json.dumps({**settings, "bits": "5"}), "bits"),
                      (json.dumps({"bits": "2"}), "exactly")]:
        p = tmp_path / "bad.safetensors"
        save_file(h, str(p), metadata={"format": "qmoefmt.calibration", "version": "1.1",
                                       "tokens": json.dumps(t), "sequential": bad})
        with pytest.raises(FormatError, match=what) as e:
            CalibrationFile(p)
        assert str(p) in str(e.value) and "sequential" in str(e.value)


def test_pack_refuses_other_settings(tmp_path):
    dense = small_model()
    save_model(dense, tmp_path / "m.safetensors")
    r = sequential_calibrate(copy.deepcopy(dense), batches()[:1], SWITCH, bits="2")
    cal = tmp_path / "cal.safetensors"
    r.save(cal)
    for other in [{"bits": "3"}, {"group_size": 16}, {"act_order": False}]:
        opts = PackOptions(**{"preset": "switch", "method": "gptq", "bits": "2",
                              "calibration": str(cal), **other})
        with pytest.raises(PackError, match="sequential") as e:
            pack(tmp_path / "m.safetensors", tmp_path / "s", opts)
        msg = str(e.value)
        assert str(cal) in msg and "bits 2, group_size None, act_order True" in msg
        key, value = next(iter(other.items()))
        assert f"{key} {value}" in msg.split("this pack")[1]
        assert not (tmp_path / "s").exists()      # refused before the store was started
    # act-order given explicitly equal to the recorded default is the same setting
    pack(tmp_path / "m.safetensors", tmp_path / "s", PackOptions(
        preset="switch", method="gptq", bits="2", calibration=str(cal), act_order=True))


def test_cli_calibrate_sequential(tmp_path, fixture_checkpoint):
    out = tmp_path / "cal.safetensors"
    runner = CliRunner()
    res = runner.invoke(cli, ["calibrate", str(out), "--model", str(fixture_checkpoint("moe-tiny")),
                              "--tokens", "256", "--sequential", "--bits", "2", "--group-size", "64",
                              "--no-act-order", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    settings = {"bits": "2", "group_size": 64, "act_order": False, "damp": 0.1}
    assert summary["sequential"] == settings
    assert summary["layers"] == [f"blocks.{i}.mlp.experts/{k}" for i in range(4) for k in ("wi", "wo")]
    assert summary["tokens"] == 256 and summary["experts"] == 64
    assert CalibrationFile(out).sequential == settings
    res = runner.invoke(cli, ["calibrate", str(tmp_path / "x"), "--bits", "2"])
    assert res.exit_code == 2 and "need --sequential" in res.output
    res = runner.invoke(cli, ["calibrate", str(tmp_path / "x"), "--sequential",
                              "--group-size", "8"])
    assert res.exit_code == 1 and "--group-size" in res.output
    assert not (tmp_path / "x").exists()


def test_sublayer_keys_split_an_expert_into_its_linears():
    assert sublayer_key("blocks.3.mlp.experts.expert_5.wi.weight") == "blocks.3.mlp.experts/wi"
    assert (sublayer_key("model.layers.0.block_sparse_moe.experts.5.w2.weight")
            == "model.layers.0.block_sparse_moe.experts/w2")
    assert sublayer_key("early.experts.0.weight") == "early.experts"      # one linear per expert
    assert sublayer_key("layers.2.ffn.e7.fc1.weight") == "layers.2.ffn/fc1"
    r = sequential_calibrate(small_model(), batches(), SWITCH)
    assert [key for key, _ in r.layers] == [f"blocks.{i}.mlp.experts/{k}"
                                            for i in range(CONFIG.n_layers) for k in ("wi", "wo")]
