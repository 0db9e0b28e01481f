"""Hugging Face transformers' Switch Transformers and Mixtral, built from tiny configs:
HessianCollector -> calibration file -> pack --method gptq -> verify, on the checkpoints
save_pretrained writes (per-expert 2-D weights) and on state_dict checkpoints of
transformers 5's fused [E, out, in] experts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import qmoefmt
from qmoefmt.quantize import gptq
from qmoefmt.calibration import CalibrationFile, HessianCollector, fused_experts
from qmoefmt.pack import PackOptions, pack
from qmoefmt.selection import ExpertSelector
from qmoefmt.store.verify import verify
from qmoefmt_cli.main import main as cli

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

from qmoefmt.testing.tiny_hf import E, H, I, mixtral, switch  # noqa: E402

MIXTRAL_LAYERS = 2                   # mixtral()'s default


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models' ops are microseconds of work; with a thread pool on a busy machine
    each one waits on the other threads (measured 100x slower on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 12), generator=g) for _ in range(n)]


def run(model, batch):
    if isinstance(model, transformers.SwitchTransformersForConditionalGeneration):
        model(input_ids=batch, decoder_input_ids=batch[:, :8])
    else:
        model(batch)


def calibrate(model, preset):
    with HessianCollector(model, ExpertSelector(preset=preset)) as c, torch.no_grad():
        for b in batches():
            run(model, b)
    return c


def expected(W, Hs, bits):
    return (gptq.gptq_ternary(W, Hs, act_order=True) if bits == "ternary"
            else gptq.gptq_kbit(W, Hs, 2, act_order=True))


# --- what transformers 5 writes ----------------------------------------------------------

def test_save_pretrained_writes_per_expert_weights(tmp_path):
    """transformers 5 fuses Mixtral's experts in memory but save_pretrained converts them
    back to the legacy per-expert w1/w2/w3; Switch's experts are nn.Linear throughout."""
    from safetensors import safe_open

    model = mixtral()
    assert tuple(model.model.layers[0].mlp.experts.gate_up_proj.shape) == (E, 2 * I, H)
    assert tuple(model.model.layers[0].mlp.experts.down_proj.shape) == (E, H, I)
    model.save_pretrained(tmp_path / "mixtral", safe_serialization=True)
    with safe_open(str(tmp_path / "mixtral" / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    select = ExpertSelector(preset="mixtral")
    experts = {k for k in shapes if select(k)}
    assert experts == {f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
                       for layer in range(MIXTRAL_LAYERS) for e in range(E)
                       for w in ("w1", "w2", "w3")}
    assert {shapes[k] for k in experts if ".w2." in k} == {(H, I)}
    assert {shapes[k] for k in experts if ".w2." not in k} == {(I, H)}
    assert not any(select(k) for k in model.state_dict() if "experts" not in k)

    model = switch()
    model.save_pretrained(tmp_path / "switch", safe_serialization=True)
    with safe_open(str(tmp_path / "switch" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    select = ExpertSelector(preset="switch")
    assert {k for k in names if select(k)} == {k for k in model.state_dict() if select(k)}
    assert len({k for k in names if select(k)}) == 2 * 2 * E     # wi, wo; 2 sparse blocks


# --- the collector against a reference loop over the router's choices --------------------

def test_mixtral_hessians_are_the_routed_inputs():
    model = mixtral()
    seen: dict[int, dict] = {}
    hooks = []
    for layer, block in enumerate(model.model.layers):
        moe = block.mlp
        hooks.append(moe.register_forward_pre_hook(
            lambda m, a, layer=layer: seen.setdefault(layer, {}).setdefault("x", []).append(
                a[0].reshape(-1, H).clone())))
        hooks.append(moe.gate.register_forward_hook(
            lambda m, a, out, layer=layer: seen[layer].setdefault("idx", []).append(out[2].clone())))
    c = calibrate(model, "mixtral")
    for h in hooks:
        h.remove()
    for layer, block in enumerate(model.model.layers):
        x, idx = torch.cat(seen[layer]["x"]), torch.cat(seen[layer]["idx"])
        experts = block.mlp.experts
        routed = [[] for _ in range(E)]
        for t in range(x.shape[0]):
            for e in idx[t].tolist():
                routed[e].append(x[t])
        up_name = f"model.layers.{layer}.mlp.experts.gate_up_proj"
        down_name = f"model.layers.{layer}.mlp.experts.down_proj"
        assert c.tokens[up_name] == c.tokens[down_name] == [len(r) for r in routed]
        assert sum(c.tokens[up_name]) == x.shape[0] * 2
        for e in range(E):
            xe = torch.stack(routed[e]) if routed[e] else torch.zeros(0, H)
            w1, w3 = experts.gate_up_proj[e, :I], experts.gate_up_proj[e, I:]
            with torch.no_grad():
                act = torch.nn.functional.silu(xe @ w1.T) * (xe @ w3.T)
            torch.testing.assert_close(c.hessians[up_name][e], xe.T @ xe, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(c.hessians[down_name][e], act.T @ act, rtol=1e-5, atol=1e-4)

    # Named as save_pretrained writes the weights: expert e's w1 and w3 share its [H, H].
    saved_h, saved_t = c.saved()
    assert len(saved_h) == MIXTRAL_LAYERS * E * 3
    for layer in range(MIXTRAL_LAYERS):
        for e in range(E):
            prefix = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
            for w, fused in (("w1", "gate_up_proj"), ("w3", "gate_up_proj"), ("w2", "down_proj")):
                src = f"model.layers.{layer}.mlp.experts.{fused}"
                assert torch.equal(saved_h[f"{prefix}.{w}.weight"], c.hessians[src][e])
                assert saved_t[f"{prefix}.{w}.weight"] == c.tokens[src][e]


def test_switch_hessians_are_the_routed_inputs():
    model = switch()
    mlp = model.encoder.block[0].layer[1].mlp
    seen = {}
    hooks = [mlp.register_forward_pre_hook(lambda m, a: seen.setdefault("x", []).append(a[0].clone())),
             mlp.router.register_forward_hook(lambda m, a, out: seen.setdefault("mask", []).append(out[0].clone()))]
    c = calibrate(model, "switch")
    for h in hooks:
        h.remove()
    x = torch.cat([t.reshape(-1, H) for t in seen["x"]])
    mask = torch.cat([m.reshape(-1, E) for m in seen["mask"]])      # one-hot, 0 if overflowed
    assert 0 < mask.sum() < x.shape[0]                                # overflow happened
    prefix = "encoder.block.0.layer.1.mlp.experts"
    for e in range(E):
        xe = x[mask[:, e].bool()]
        expert = mlp.experts[f"expert_{e}"]
        with torch.no_grad():
            hidden = torch.relu(xe @ expert.wi.weight.T)
        assert c.tokens[f"{prefix}.expert_{e}.wi.weight"] == xe.shape[0]
        torch.testing.assert_close(c.hessians[f"{prefix}.expert_{e}.wi.weight"], xe.T @ xe,
                                   rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(c.hessians[f"{prefix}.expert_{e}.wo.weight"],
                                   hidden.T @ hidden, rtol=1e-5, atol=1e-4)
    assert c.tokens[f"{prefix}.expert_3.wi.weight"] == 0


# --- pack --method gptq end to end ---------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{family: (checkpoint, calibration file, preset)}: save_pretrained checkpoints with
    the collector's saved-name files, and Mixtral's state_dict with fused 3-D Hessians."""
    tmp = tmp_path_factory.mktemp("hf")
    out = {}
    for family, build in (("switch", switch), ("mixtral", mixtral)):
        model = build()
        c = calibrate(model, family)
        model.save_pretrained(tmp / family, safe_serialization=True)
        c.save(tmp / f"{family}.cal.safetensors")
        out[family] = (tmp / family / "model.safetensors", tmp / f"{family}.cal.safetensors")
        if family == "mixtral":
            save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                      str(tmp / "fused.safetensors"))
            c.save(tmp / "fused.cal.safetensors", names="modules")
            out["mixtral-fused"] = (tmp / "fused.safetensors", tmp / "fused.cal.safetensors")
    return out


@pytest.mark.parametrize("family", ["switch", "mixtral", "mixtral-fused"])
@pytest.mark.parametrize("bits", ["ternary", "2"])
def test_gptq_pack(checkpoints, tmp_path, family, bits):
    from safetensors.torch import load_file

    ckpt, cal = checkpoints[family]
    preset = family.split("-")[0]
    pack(ckpt, tmp_path / "s", PackOptions(preset=preset, method="gptq", bits=bits,
                                           calibration=str(cal)))
    assert verify(tmp_path / "s", deep=True) == []
    store = qmoefmt.open(tmp_path / "s")
    weights = load_file(str(ckpt))
    f = CalibrationFile(cal)
    select = ExpertSelector(preset=preset)
    experts = [n for n in weights if select(n)]
    assert experts and set(experts) == set(f.names())
    statuses = []
    for name in experts:
        W = weights[name]
        t = store[name]
        q = t.record["quantizer"]
        assert q["method"] == "gptq" and q["tokens"] == f.tokens[name]
        if W.dim() == 3:
            Hs = f.hessian(name, tuple(W.shape))
            assert len(q["status"]) == W.shape[0]
            # each expert of the fused tensor exactly as if quantized alone
            results = [expected(W[e], Hs[e], bits) for e in range(W.shape[0])]
            assert [r.status[0] for r in results] == q["status"]
            assert np.array_equal(t.decode(), np.stack([r.dequantized.numpy() for r in results]))
            assert np.array_equal(t.symbols(), np.stack([r.codes.numpy() for r in results]))
            statuses += list(zip(q["status"], q["tokens"]))
        else:
            r = expected(W, f.hessian(name, tuple(W.shape)), bits)
            assert q["status"] == r.status[0]
            assert np.array_equal(t.decode(), r.dequantized.numpy())
            assert np.array_equal(t.symbols(), r.codes.numpy())
            statuses.append((q["status"], q["tokens"]))
    assert all(s == ("gptq" if n else "rtn-no-tokens") for s, n in statuses)
    assert any(n for _, n in statuses)
    if family == "switch":
        assert ("rtn-no-tokens", 0) in statuses
    if family == "mixtral-fused":
        assert store["model.layers.0.mlp.experts.gate_up_proj"].shape == (E, 2 * I, H)


def test_cli_pack_mixtral_gptq(checkpoints, tmp_path):
    ckpt, cal = checkpoints["mixtral"]
    # the directory save_pretrained wrote, as a user would give it
    r = CliRunner().invoke(cli, ["pack", str(ckpt.parent), str(tmp_path / "s"), "--preset", "mixtral",
                                 "--method", "gptq", "--calibration", str(cal)])
    assert r.exit_code == 0, r.output
    assert verify(tmp_path / "s", deep=True) == []
    store = qmoefmt.open(tmp_path / "s")
    statuses = [store[n].record["quantizer"]["status"] for n in store.names() if "experts" in n]
    assert len(statuses) == MIXTRAL_LAYERS * E * 3
    assert set(statuses) <= {"gptq", "rtn-no-tokens"} and "gptq" in statuses


# --- other transformers MoE models, unknown fused modules -----------------------------------

def test_models_built_like_mixtral_are_recognised():
    """transformers 5's Qwen3-MoE has its own experts class; its layout flags mark it as
    built like MixtralExperts."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=H, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_experts=E,
        num_experts_per_tok=2, head_dim=8, max_position_embeddings=64)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    experts = model.model.layers[0].mlp.experts
    assert type(experts).__name__ != "MixtralExperts" and fused_experts(experts) is not None
    with HessianCollector(model, ExpertSelector(preset="mixtral")) as c, torch.no_grad():
        model(torch.randint(0, 64, (2, 12)))
    assert sum(c.tokens["model.layers.0.mlp.experts.gate_up_proj"]) == 2 * 12 * 2
    assert c.hessians["model.layers.0.mlp.experts.down_proj"].shape == (E, 16, 16)


def test_unknown_fused_module_is_an_error():
    class Fused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(E, 3, 5))

    model = torch.nn.Sequential(Fused())
    with pytest.raises(ValueError, match=r"0\.w: selected 3-D parameter \[4, 3, 5\] of module "
                                         r"type Fused.*FUSED_EXPERTS"):
        HessianCollector(model, ExpertSelector(["*.w"]))
    model = mixtral()
    model.model.layers[0].mlp.experts.register_parameter(
        "extra", torch.nn.Parameter(torch.zeros(E, 2, 2)))
    with pytest.raises(ValueError, match=r"experts\.extra: .*MixtralExperts; its fused expert "
                                         r"weights are \['gate_up_proj', 'down_proj'\]"):
        HessianCollector(model, ExpertSelector(["*.extra"], preset="mixtral"))
