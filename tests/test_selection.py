import pytest

from qmoefmt.selection import PRESETS, ExpertSelector

SWITCH_EXPERTS = [
    "encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight",
    "encoder.block.1.layer.1.mlp.experts.expert_3.wo.weight",
    "encoder.block.11.layer.1.mlp.experts.expert_127.wi.weight",
    "decoder.block.1.layer.2.mlp.experts.expert_0.wo.weight",
    "model.decoder.block.3.layer.2.mlp.experts.expert_63.wi.weight",
    "blocks.0.mlp.experts.expert_2.wo.weight",  # qmoefmt.moe_model's naming
]
SWITCH_OTHERS = [
    "encoder.block.1.layer.1.mlp.router.classifier.weight",
    "encoder.block.1.layer.1.layer_norm.weight",
    "encoder.block.0.layer.1.DenseReluDense.wi.weight",  # dense FFN of a non-MoE block
    "encoder.block.0.layer.0.SelfAttention.q.weight",
    "decoder.block.1.layer.1.EncDecAttention.o.weight",
    "decoder.final_layer_norm.weight",
    "shared.weight",
    "lm_head.weight",
    "encoder.block.1.layer.1.mlp.experts.expert_3.wi.bias",
]
MIXTRAL_EXPERTS = [
    "model.layers.0.block_sparse_moe.experts.5.w1.weight",
    "model.layers.0.block_sparse_moe.experts.5.w2.weight",
    "model.layers.31.block_sparse_moe.experts.7.w3.weight",
    "layers.2.block_sparse_moe.experts.0.w1.weight",
    # transformers 5's fused experts, as modules name them (and state_dict checkpoints)
    "model.layers.0.mlp.experts.gate_up_proj",
    "model.layers.3.mlp.experts.down_proj",
]
MIXTRAL_OTHERS = [
    "model.layers.0.block_sparse_moe.gate.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.norm.weight",
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.layers.0.mlp.gate.weight",          # transformers 5's router, in memory
    "model.layers.0.mlp.experts.gate_up_proj_bias",
    "model.layers.0.mlp.shared_expert.gate_proj.weight",
]


@pytest.mark.parametrize(
    "preset, experts, others",
    [
        ("switch", SWITCH_EXPERTS, SWITCH_OTHERS + MIXTRAL_EXPERTS),
        ("mixtral", MIXTRAL_EXPERTS, MIXTRAL_OTHERS + SWITCH_EXPERTS),
    ],
)
def test_presets_select_experts_only(preset, experts, others):
    select = ExpertSelector(preset=preset)
    assert [n for n in experts if not select(n)] == []
    assert [n for n in others if select(n)] == []


def test_globs_and_preset_combine():
    select = ExpertSelector(globs=["*.shared_expert.*.weight"], preset="mixtral")
    assert select("model.layers.1.mlp.shared_expert.up_proj.weight")
    assert select(MIXTRAL_EXPERTS[0])
    assert not select(MIXTRAL_OTHERS[0])
    assert select.patterns[0] == "*.shared_expert.*.weight"


def test_nothing_selected_by_default():
    select = ExpertSelector()
    assert not any(select(n) for n in SWITCH_EXPERTS + MIXTRAL_EXPERTS + [""])


def test_globs_are_case_sensitive_and_whole_name():
    select = ExpertSelector(globs=["*.experts.*"])
    assert select("a.experts.b")
    assert not select("a.EXPERTS.b")
    assert not ExpertSelector(globs=["experts"])("a.experts.b")


def test_single_string_is_one_glob():
    select = ExpertSelector(globs="*.wi.weight")
    assert select("x.wi.weight")
    assert not select("x.wo.weight")


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError) as info:
        ExpertSelector(preset="gpt-oss")
    for name in PRESETS:
        assert name in str(info.value)
