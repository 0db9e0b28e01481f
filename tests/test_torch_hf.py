"""Hugging Face transformers' Switch Transformers, Mixtral and Qwen3-MoE run from stores
packed from their save_pretrained checkpoints: load_model against the same model loaded
dense, by transformers' own from_pretrained, from the store's unpacked (dequantized)
weights."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

import qmoefmt
from qmoefmt.io.unpack import unpack
from qmoefmt.pack import PackOptions, pack
from qmoefmt.store.reader import Tensor
from qmoefmt.torch import CompressedExperts, CompressedLinear, StoreMismatchError, load_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

from qmoefmt.testing.tiny_hf import E, H, I, mixtral, switch  # noqa: E402
QWEN_GLOBS = ("*mlp.experts.*_proj.weight",)   # Qwen3-MoE saves experts.{e}.gate_proj etc.


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Microseconds of work per op: on a busy machine a thread pool only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def qwen3_moe():
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=H, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_experts=E,
        num_experts_per_tok=2, head_dim=8, max_position_embeddings=64)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


BUILD = {"switch": switch, "mixtral": mixtral, "qwen3_moe": qwen3_moe}
SELECT = {"switch": {"preset": "switch"}, "mixtral": {"preset": "mixtral"},
          "qwen3_moe": {"experts": QWEN_GLOBS}}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """(family, bits) -> (store path, directory of its dequantized checkpoint with the
    model's config.json), packed from save_pretrained checkpoints; ("mixtral-fused",
    "ternary") from the model's own state_dict (3-D fused experts)."""
    tmp = tmp_path_factory.mktemp("hfrun")

    def made(family, bits, checkpoint, config_dir):
        store = tmp / f"{family}-{bits}.qmoe"
        opts = SELECT[family.split("-")[0]]
        pack(checkpoint, store, PackOptions(bits=bits, experts=opts.get("experts", ()),
                                            preset=opts.get("preset")))
        ref = tmp / f"{family}-{bits}.dense"
        ref.mkdir()
        shutil.copy(config_dir / "config.json", ref)
        unpack(qmoefmt.open(store), ref / "model.safetensors")
        return store, ref

    out = {}
    for family, build in BUILD.items():
        model = build()
        model.save_pretrained(tmp / family)
        for bits in (("ternary", "2") if family != "qwen3_moe" else ("ternary",)):
            out[family, bits] = made(family, bits, tmp / family / "model.safetensors", tmp / family)
        if family == "mixtral":
            fused = tmp / "mixtral-fused.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused))
            out["mixtral-fused", "ternary"] = made("mixtral-fused", "ternary", fused, tmp / family)
    return out


def logits(model, family):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        if family == "switch":
            return model(input_ids=ids, decoder_input_ids=ids[:, :8]).logits
        return model(ids).logits


def dense_reference(family, ref_dir):
    """transformers' own loading of the dequantized checkpoint: its conversion, not ours,
    puts the per-expert weights into the fused parameters."""
    cls = {"switch": transformers.SwitchTransformersForConditionalGeneration,
           "mixtral": transformers.MixtralForCausalLM,
           "qwen3_moe": transformers.Qwen3MoeForCausalLM}[family]
    return cls.from_pretrained(ref_dir).eval()


def assert_same_logits(got, want):
    """The fused kernels and torch's dense matmul sum the same fp32 products in other
    orders: each output is off by at most ~n 2^-24 sum|x w| (n <= 96 terms here), a few
    1e-6 relative after the layers; 1e-4 of the logits' scale leaves a wide margin and
    still fails on any wrong weight, scale or routing."""
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def forbid_decoding(monkeypatch, store):
    """Any dense decode of a store tensor from here on fails the test."""
    def refuse(*_a, **_k):
        raise AssertionError("an expert weight was decoded")
    for method in ("decode", "torch", "symbols", "numpy"):
        monkeypatch.setattr(Tensor, method, refuse)
    for unit in {type(store[n].unit) for n in store if store[n].unit.expert}:
        monkeypatch.setattr(unit, "decode", refuse)
        monkeypatch.setattr(unit, "symbols", refuse)


@pytest.mark.parametrize("family, bits", [("switch", "ternary"), ("switch", "2"),
                                          ("mixtral", "ternary"), ("mixtral", "2"),
                                          ("qwen3_moe", "ternary")])
def test_runs_from_its_store(stores, monkeypatch, family, bits):
    path, ref_dir = stores[family, bits]
    store = qmoefmt.open(path)
    want = logits(dense_reference(family, ref_dir), family)
    model = BUILD[family]()
    dense_params = sum(p.numel() for n, p in model.named_parameters() if "experts" not in n)
    done = load_model(store, model, **SELECT[family])

    coded = sorted(n for n in store if store[n].unit.expert)
    assert sorted(done["compressed"]) == coded and done["dequantized"] == []
    assert done["unused"] == []
    # Only the dense tensors remain as parameters: no expert weight of any size.
    assert sum(p.numel() for p in model.parameters()) == dense_params
    assert not any("experts" in n for n, _ in model.named_parameters())
    fused = [m for m in model.modules() if isinstance(m, CompressedExperts)]
    if family == "switch":      # one nn.Linear per expert weight in transformers 5 too
        assert not fused and sum(isinstance(m, CompressedLinear) for m in model.modules()) == len(coded)
        assert "lm_head.weight" not in done["dense"]      # tied to shared.weight, loaded once
        assert model.lm_head.weight is model.shared.weight
    else:
        assert len(fused) == len(model.model.layers)
        assert not hasattr(fused[0], "gate_up_proj") and not hasattr(fused[0], "down_proj")
    forbid_decoding(monkeypatch, store)
    assert_same_logits(logits(model, family), want)


def test_mixtral_gate_up_is_w1_then_w3(stores):
    """Expert e's fused projection stacks the stored w1 (gate) above w3 (up), as
    transformers' conversion concatenates them, and down is w2."""
    store = qmoefmt.open(stores["mixtral", "ternary"][0])
    model = mixtral()
    load_model(store, model, preset="mixtral")
    experts = model.model.layers[1].mlp.experts
    prefix = "model.layers.1.block_sparse_moe.experts.2"
    assert [t.name for t in experts.gate_up[2].tensors] == [f"{prefix}.w1.weight",
                                                              f"{prefix}.w3.weight"]
    assert [t.name for t in experts.down[2].tensors] == [f"{prefix}.w2.weight"]
    assert (experts.gate_up[2].out_features, experts.gate_up[2].in_features) == (2 * I, H)


def test_a_store_of_the_fused_state_dict_loads_its_experts_dense(stores):
    """Its experts are 3-D [E, out, in] tensors, which Tensor.matmul cannot take one expert
    of: they are dequantized into the model's parameters, and the report says so."""
    path, ref_dir = stores["mixtral-fused", "ternary"]
    store = qmoefmt.open(path)
    model = mixtral()
    done = load_model(store, model, preset="mixtral")
    assert done["compressed"] == []
    assert done["dequantized"] == sorted(f"model.layers.{layer}.mlp.experts.{p}"
                                         for layer in range(2) for p in ("down_proj", "gate_up_proj"))
    assert_same_logits(logits(model, "mixtral"), logits(dense_reference("mixtral", ref_dir), "mixtral"))


def test_compressed_experts_is_the_fused_module(stores):
    """Against MixtralExperts' eager forward (the one its source spells out; transformers'
    default grouped_mm kernel reads garbage for an unused slot) holding the decoded
    weights, on routes with an expert no token picks and slots marked unused (index E,
    expert parallelism)."""
    store = qmoefmt.open(stores["mixtral", "2"][0])
    prefix = "model.layers.0.block_sparse_moe.experts"
    w = {(e, k): store[f"{prefix}.{e}.{k}.weight"] for e in range(E) for k in ("w1", "w2", "w3")}
    ours = CompressedExperts([[w[e, "w1"], w[e, "w3"]] for e in range(E)],
                             [[w[e, "w2"]] for e in range(E)], torch.nn.SiLU())
    model = mixtral(layers=1)
    model.set_experts_implementation("eager")
    ref = model.model.layers[0].mlp.experts
    with torch.no_grad():
        ref.gate_up_proj.copy_(torch.stack([torch.cat([w[e, "w1"].torch(), w[e, "w3"].torch()])
                                            for e in range(E)]))
        ref.down_proj.copy_(torch.stack([w[e, "w2"].torch() for e in range(E)]))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, H, generator=g)
    index = torch.tensor([[0, 1], [1, 0], [2, E], [0, 2], [E, E], [1, 2], [2, 0]])
    weights = torch.rand(7, 2, generator=g)
    with torch.no_grad():
        got, want = ours(x, index, weights), ref(x, index, weights)
    assert torch.equal(got[4], torch.zeros(H))
    assert_same_logits(got, want)


def test_a_store_lacking_model_tensors_is_named(stores):
    store = qmoefmt.open(stores["mixtral", "ternary"][0])
    model = mixtral(experts=E + 1)      # expert E is in no checkpoint
    with pytest.raises(StoreMismatchError) as e:
        load_model(store, model, preset="mixtral")
    prefix = "model.layers.0.block_sparse_moe.experts"
    assert str(e.value) == (
        f"{store.path}: the store lacks 4 tensors of the model, e.g. "
        f"['model.layers.0.mlp.experts.gate_up_proj (saved as {prefix}.{E}.w1.weight)', "
        f"'model.layers.0.mlp.experts.down_proj (saved as {prefix}.{E}.w2.weight)', "
        f"'model.layers.1.mlp.experts.gate_up_proj (saved as model.layers.1.block_sparse_moe."
        f"experts.{E}.w1.weight)']")
    assert hasattr(model.model.layers[0].mlp.experts, "gate_up_proj")   # left unchanged


def test_a_shape_the_model_disagrees_with_is_named(stores):
    store = qmoefmt.open(stores["mixtral", "ternary"][0])
    model = mixtral(intermediate=I + 16)
    with pytest.raises(StoreMismatchError) as e:
        load_model(store, model, preset="mixtral")
    assert str(e.value) == (f"{store.path}: model.layers.0.block_sparse_moe.experts.0.w1.weight "
                            f"is [{I}, {H}] in the store, the model's "
                            f"model.layers.0.mlp.experts.gate_up_proj needs [{I + 16}, {H}]")


def test_unselected_experts_are_assembled_dense(stores):
    """With no experts selected, each fused parameter is assembled from its stored
    pieces, dequantized: the same logits, and the parameters transformers would load."""
    path, ref_dir = stores["mixtral", "ternary"]
    store = qmoefmt.open(path)
    model = mixtral()
    done = load_model(store, model)
    assert done["compressed"] == [] and done["dequantized"] == sorted(
        n for n in store if store[n].unit.expert)
    ref = dense_reference("mixtral", ref_dir)
    assert torch.equal(model.model.layers[1].mlp.experts.gate_up_proj,
                       ref.model.layers[1].mlp.experts.gate_up_proj)
    assert_same_logits(logits(model, "mixtral"), logits(ref, "mixtral"))
