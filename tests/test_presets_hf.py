"""The presets for the checkpoint naming schemes the README names select exactly the
routed experts' weights of tiny transformers models saved by save_pretrained: not the
shared experts, the routers or anything dense."""
import re

import pytest
from safetensors import safe_open

from qmoefmt.selection import ExpertSelector

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, num_experts_per_tok=2)
FAMILIES = {
    "qwen-moe": [
        ("Qwen2MoeConfig", dict(intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                                shared_expert_intermediate_size=24, num_key_value_heads=2)),
        ("Qwen3MoeConfig", dict(intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                                num_key_value_heads=2, head_dim=8)),
    ],
    "olmoe": [("OlmoeConfig", dict(intermediate_size=16, num_experts=4, num_key_value_heads=2))],
    "deepseek": [("DeepseekV3Config", dict(
        intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=4, n_routed_experts=4,
        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1))],
}
ROUTED = re.compile(r".*\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")


def saved_names(config_class, kw, tmp_path) -> list[str]:
    import torch
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**COMMON, **kw)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    names = []
    for f in sorted(tmp_path.glob("*.safetensors")):
        with safe_open(str(f), "np") as g:
            names += list(g.keys())
    return names


@pytest.mark.parametrize("preset,config_class,kw",
                         [(p, c, kw) for p, models in FAMILIES.items() for c, kw in models])
def test_preset_selects_the_routed_experts_only(preset, config_class, kw, tmp_path):
    names = saved_names(config_class, kw, tmp_path)
    picked = [n for n in names if ExpertSelector(preset=preset)(n)]
    assert picked and picked == [n for n in names if ROUTED.match(n)]
    assert not any("shared_expert" in n or n.endswith("mlp.gate.weight") for n in picked)
