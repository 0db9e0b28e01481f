"""The presets for the checkpoint naming schemes the README names select exactly the
routed experts' weights of tiny transformers models saved by save_pretrained: not the
shared experts, the routers or anything dense."""
import re

import pytest
from safetensors import safe_open

from qmoefmt.selection import ExpertSelector
from qmoefmt.testing.tiny_hf import FAMILIES, family_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

ROUTED = re.compile(r".*\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")


def saved_names(config_class, kw, tmp_path) -> list[str]:
    family_model(config_class, kw).save_pretrained(tmp_path)
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
