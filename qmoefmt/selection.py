"""Which checkpoint tensors are expert weights, by fnmatch-style globs on their names.

Globs start with ``*`` so they match under any prefix (``model.``, ``transformer.``);
callers should still treat only tensors with ndim >= 2 as experts.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

PRESETS: dict[str, list[str]] = {
    # encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight (decoder blocks alike);
    # the router is mlp.router.classifier.weight and stays out. transformers 5 keeps Switch's
    # experts as one nn.Linear each, so checkpoint and module names agree.
    "switch": [
        "*mlp.experts.expert_*.wi.weight",
        "*mlp.experts.expert_*.wo.weight",
    ],
    # Checkpoints (what transformers' save_pretrained writes, 4.x and 5.x alike):
    # model.layers.0.block_sparse_moe.experts.5.w1.weight [I, H] (w1 gate, w3 up, w2 down);
    # the router is ...block_sparse_moe.gate.weight. In memory, transformers 5 fuses each
    # layer's experts into model.layers.0.mlp.experts.gate_up_proj [E, 2I, H] and
    # ...down_proj [E, H, I] (router ...mlp.gate.weight): HessianCollector sees those names,
    # and so does pack for a checkpoint saved from the module's state_dict. The same fused
    # names serve every transformers MoE built like Mixtral's (Qwen2/3-MoE, OLMoE, ...).
    "mixtral": [
        "*block_sparse_moe.experts.*.w1.weight",
        "*block_sparse_moe.experts.*.w2.weight",
        "*block_sparse_moe.experts.*.w3.weight",
        "*mlp.experts.gate_up_proj",
        "*mlp.experts.down_proj",
    ],
}
# Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V2/V3 checkpoints (save_pretrained, transformers
# 5): model.layers.1.mlp.experts.3.{gate,up,down}_proj.weight; their shared experts
# (mlp.shared_expert(s).*) and routers (mlp.gate.weight) stay out. In memory they fuse
# like Mixtral's.
_GATED_PROJ = [
    "*mlp.experts.*.gate_proj.weight",
    "*mlp.experts.*.up_proj.weight",
    "*mlp.experts.*.down_proj.weight",
    "*mlp.experts.gate_up_proj",
    "*mlp.experts.down_proj",
]
PRESETS.update({"qwen-moe": _GATED_PROJ, "olmoe": _GATED_PROJ, "deepseek": _GATED_PROJ})


class ExpertSelector:
    """``selector(name)`` is True when the name matches any glob or preset glob.

    With neither globs nor a preset nothing is selected.
    """

    def __init__(self, globs: Iterable[str] = (), preset: str | None = None) -> None:
        # A lone string would otherwise be taken as one glob per character.
        patterns = [globs] if isinstance(globs, str) else list(globs)
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; known presets: {sorted(PRESETS)}")
            patterns += PRESETS[preset]
        self.patterns: tuple[str, ...] = tuple(patterns)
        # Case-sensitive on every platform, unlike fnmatch.fnmatch; one regex for all globs.
        self._regex = (
            re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
            if patterns
            else None
        )

    def __call__(self, name: str) -> bool:
        return self._regex is not None and self._regex.match(name) is not None

    def __repr__(self) -> str:
        return f"ExpertSelector({list(self.patterns)!r})"
