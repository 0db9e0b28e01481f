"""Calibration files and the Hessian collector (spec/calibration-v1.md)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qmoefmt.calibration import CalibrationFile, HessianCollector, hessian_from_inputs, write_calibration
from qmoefmt.errors import FormatError
from qmoefmt.demo.model import load_model, token_windows
from qmoefmt.selection import ExpertSelector
from qmoefmt.demo.textdata import train_tokens


@pytest.mark.slow
def test_collector_on_the_bundled_model(tmp_path, fixture_checkpoint):
    torch.manual_seed(0)
    model = load_model(fixture_checkpoint("moe-tiny")).eval()
    windows = token_windows(train_tokens()[:4 * 257 * 4], model.config.context)[:4, :-1]
    seen = {}
    name = "blocks.1.mlp.experts.expert_2.wi.weight"
    mod = model.get_submodule(name.removesuffix(".weight"))
    spy = mod.register_forward_hook(lambda m, i, o: seen.setdefault("x", []).append(i[0].detach()))
    with HessianCollector(model, ExpertSelector(preset="switch")) as c, torch.no_grad():
        model(windows)
    spy.remove()
    cfg = model.config
    assert len(c.hessians) == 2 * cfg.n_layers * cfg.n_experts
    n_tokens = windows.numel()
    for layer in range(cfg.n_layers):
        for kind in ("wi", "wo"):
            counts = [c.tokens[f"blocks.{layer}.mlp.experts.expert_{j}.{kind}.weight"]
                      for j in range(cfg.n_experts)]
            assert sum(counts) == n_tokens             # top-1: every token to one expert
    x = torch.cat(seen["x"]).reshape(-1, cfg.d_model).numpy()
    assert c.tokens[name] == x.shape[0]
    np.testing.assert_allclose(c.hessians[name].numpy(), hessian_from_inputs(x), rtol=1e-4, atol=1e-3)
    c.save(tmp_path / "cal.safetensors")
    f = CalibrationFile(tmp_path / "cal.safetensors")
    assert f.tokens == c.tokens
    assert torch.equal(f.hessian(name, cfg.d_model), c.hessians[name])
    assert not (tmp_path / "cal.safetensors.partial").exists()


def test_expert_without_tokens_is_kept_with_zero(tmp_path):
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList([torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)])

        def forward(self, x):
            return self.experts[0](x)

    m = Two()
    with HessianCollector(m, ExpertSelector(["experts.*.weight"])) as c:
        m(torch.ones(5, 4))
    assert c.tokens == {"experts.0.weight": 5, "experts.1.weight": 0}
    assert torch.equal(c.hessians["experts.1.weight"], torch.zeros(4, 4))
    assert torch.equal(c.hessians["experts.0.weight"], torch.full((4, 4), 5.0))


def test_selector_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="matched no"):
        HessianCollector(torch.nn.Linear(2, 2), ExpertSelector(["nothing*"]))


def _write(path, tensors, meta):
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("case,expect", [
    ("format", "metadata format"),
    ("version", "version"),
    ("tokens-missing", "tokens"),
    ("tokens-negative", "non-negative"),
    ("shape", "expected float32 [4, 4]"),
    ("nan", "NaN"),
    ("asym", "not symmetric"),
    ("negdiag", "negative diagonal"),
])
def test_bad_files_name_file_and_tensor(tmp_path, case, expect):
    h = torch.eye(4) * 2
    meta = {"format": "qmoefmt.calibration", "version": "1.0", "tokens": json.dumps({"e.w": 3})}
    t = {"e.w": h}
    if case == "format":
        meta["format"] = "other"
    elif case == "version":
        meta["version"] = "2.0"
    elif case == "tokens-missing":
        meta["tokens"] = json.dumps({})
    elif case == "tokens-negative":
        meta["tokens"] = json.dumps({"e.w": -1})
    elif case == "shape":
        t["e.w"] = torch.eye(3)
    elif case == "nan":
        t["e.w"] = h.clone()
        t["e.w"][0, 1] = float("nan")
    elif case == "asym":
        t["e.w"] = h.clone()
        t["e.w"][0, 1] = 1.0
    elif case == "negdiag":
        t["e.w"] = -h
    p = tmp_path / "c.safetensors"
    _write(p, t, meta)
    with pytest.raises(FormatError, match=re.escape(expect)) as e:
        CalibrationFile(p).hessian("e.w", 4)
    assert str(p) in str(e.value)


def test_not_safetensors(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"garbage")
    with pytest.raises(FormatError, match="not a readable safetensors"):
        CalibrationFile(p)


def test_write_calibration_requires_matching_names(tmp_path):
    with pytest.raises(ValueError):
        write_calibration(tmp_path / "c.safetensors", {"a": torch.eye(2)}, {"b": 1})


def test_the_same_hessians_give_the_same_file(tmp_path):
    """Calibration files are byte-deterministic (pack records their sha256), whatever the
    order the Hessians come in; and they read back."""
    g = torch.Generator().manual_seed(0)
    h = {n: torch.randn(6, 6, generator=g) for n in ("b.w", "a.w", "c.w")}
    h = {n: m @ m.T for n, m in h.items()}
    tokens = {"b.w": 3, "a.w": 1, "c.w": 0}
    seq = {"bits": "2", "group_size": None, "act_order": True, "damp": 0.1}
    write_calibration(tmp_path / "1.safetensors", h, tokens, sequential=seq)
    write_calibration(tmp_path / "2.safetensors", dict(reversed(list(h.items()))), tokens,
                      sequential=seq)
    one = (tmp_path / "1.safetensors").read_bytes()
    assert one == (tmp_path / "2.safetensors").read_bytes()
    f = CalibrationFile(tmp_path / "1.safetensors")
    assert f.tokens == tokens and f.sequential == seq
    assert torch.equal(f.hessian("a.w", 6), h["a.w"])
