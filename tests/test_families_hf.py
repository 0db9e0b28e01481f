"""Each checkpoint family the presets name packs end to end from its save_pretrained
directory: pack with the preset, deep-verify, unpack to shards, and transformers'
from_pretrained loads the unpacked directory (its config.json from the store) to the same
model as the source checkpoint with the experts replaced by their decoded values."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import qmoefmt
from qmoefmt.io.unpack import unpack
from qmoefmt.pack import PackOptions, pack
from qmoefmt.store.verify import verify
from qmoefmt.testing.tiny_hf import FAMILIES, family_model

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.hf

ROUTED = re.compile(r".*\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
CASES = [(p, c, kw) for p, models in FAMILIES.items() for c, kw in models]


def logits(directory):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(torch.arange(12).reshape(2, 6) % 64).logits


@pytest.mark.parametrize("preset,config_class,kw", CASES, ids=[c for _, c, _ in CASES])
def test_pack_verify_unpack_load(preset, config_class, kw, tmp_path):
    src = tmp_path / "src"
    family_model(config_class, kw).save_pretrained(src)
    store = tmp_path / "s.qmoe"
    summary = pack(src, store, PackOptions(preset=preset))
    st = qmoefmt.open(store)
    names = [t.name for t in st.tensors()]
    routed = [n for n in names if ROUTED.match(n)]
    assert routed and summary.expert_tensors == len(routed)
    assert verify(store, deep=True) == []
    assert st.source_metadata == {"format": "pt"}      # what save_pretrained writes

    out = tmp_path / "unpacked"
    unpack(st, out, max_shard_size=20_000)
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    with safe_open(str(shards[0]), "np") as f:
        assert f.metadata() == {"format": "pt"}

    # The reference: the source checkpoint itself, its experts swapped for their decoded
    # values, loaded the same way.
    ref = tmp_path / "ref"
    shutil.copytree(src, ref)
    for f in ref.glob("*.safetensors"):
        tensors = load_file(str(f))
        tensors.update({n: st[n].decode().astype(tensors[n].dtype)
                        for n in tensors if ROUTED.match(n)})
        save_file(tensors, str(f), metadata={"format": "pt"})
    got, want = logits(out), logits(ref)
    assert torch.equal(got, want)
    assert not np.allclose(want.numpy(), logits(src).numpy())   # the experts did change
