"""Tiny transformers MoE models for the tests (Mixtral's fused experts, Switch's
per-expert linears), built the same way by every test module that needs one."""
from __future__ import annotations

E, H, I = 4, 32, 48                  # experts, hidden, expert intermediate


def mixtral(layers: int = 2, intermediate: int = I, experts: int = E):
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=H, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
        num_experts_per_tok=2, max_position_embeddings=64)
    return transformers.MixtralForCausalLM(cfg).eval()


def switch():
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.SwitchTransformersConfig(
        vocab_size=64, d_model=H, d_kv=8, d_ff=I, num_layers=1, num_decoder_layers=1,
        num_heads=4, num_experts=E, encoder_sparse_step=1, decoder_sparse_step=1,
        expert_capacity=6)           # small: some routed tokens overflow and reach no expert
    model = transformers.SwitchTransformersForConditionalGeneration(cfg).eval()
    # Expert 3 of the first encoder layer ties expert 0 everywhere; argmax takes the first
    # maximum, so expert 3 receives no tokens.
    router = model.encoder.block[0].layer[1].mlp.router.classifier
    with torch.no_grad():
        router.weight[3] = router.weight[0]
    return model


# The naming schemes the presets cover beyond Switch and Mixtral (`mlp.experts.N.{gate,up,
# down}_proj.weight`): preset -> [(transformers config class, its arguments)]
_COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
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


def family_model(config_class: str, kw: dict):
    """A tiny causal LM of one of FAMILIES, seeded."""
    import torch
    import transformers
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**_COMMON, **kw)
    return transformers.AutoModelForCausalLM.from_config(config).eval()
