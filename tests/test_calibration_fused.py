"""Calibration 1.1: experts fused into one weight [E, out, in], with an [E, in, in] Hessian
and a list of E token counts; pack quantizes them as a batch, each expert as if alone."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import qmoefmt
from qmoefmt.quantize import gptq
from qmoefmt.calibration import CalibrationFile, HessianCollector, write_calibration
from qmoefmt.errors import FormatError
from qmoefmt.errors import QuantizeError
from qmoefmt.pack import PackOptions, pack
from qmoefmt.quantize.expert_gptq import GPTQSettings, quantize_expert
from qmoefmt.store.verify import verify

E, OUT, IN = 3, 8, 16
NAME = "layers.0.experts.w"


def hessians(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = []
    for e in range(E):
        x = torch.randn(50, IN, generator=g) @ torch.randn(IN, IN, generator=g)
        h.append(x.T @ x if e != 1 else torch.zeros(IN, IN))     # expert 1 saw no tokens
    return torch.stack(h), [50, 0, 50]


def test_round_trip_and_2d_files_unchanged(tmp_path):
    h, tokens = hessians()
    write_calibration(tmp_path / "c.safetensors", {NAME: h, "two.w": h[0].clone()},
                      {NAME: tokens, "two.w": 50})
    f = CalibrationFile(tmp_path / "c.safetensors")
    assert f.tokens == {NAME: tokens, "two.w": 50}
    assert torch.equal(f.hessian(NAME, (E, OUT, IN)), h)
    assert torch.equal(f.hessian("two.w", (OUT, IN)), h[0])
    assert torch.equal(f.hessian("two.w", IN), h[0])


@pytest.mark.parametrize("tokens", [5, [1, 2], (1, 2, 3, 4)])
def test_writer_wants_one_count_per_expert(tmp_path, tokens):
    with pytest.raises(ValueError, match=re.escape(NAME)):
        write_calibration(tmp_path / "c.safetensors", {NAME: hessians()[0]}, {NAME: tokens})


@pytest.mark.parametrize("case,expect", [
    ("count-list-short", "expected a list of 3 counts, one per expert"),
    ("count-int", "expected a list of 3 counts"),
    ("shape", "expected float32 [3, 16, 16]"),
    ("nan", "NaN"),
    ("asym", "not symmetric (expert 2)"),
    ("negdiag", "negative diagonal entry (expert 0)"),
    ("list-for-2d", "expected one count for a 2-D weight"),
])
def test_bad_fused_entries_name_file_and_tensor(tmp_path, case, expect):
    h, tokens = hessians()
    shape = (E, OUT, IN)
    if case == "count-list-short":
        tokens = tokens[:2]
    elif case == "count-int":
        tokens = 100
    elif case == "shape":
        h = h[:, :8, :8].contiguous()
    elif case == "nan":
        h[0, 0, 0] = float("nan")
    elif case == "asym":
        h[2, 0, 1] += 1.0
    elif case == "negdiag":
        h[0] = -h[0]
    elif case == "list-for-2d":
        h, shape = h[0], (OUT, IN)
    p = tmp_path / "c.safetensors"
    save_file({NAME: h}, str(p), metadata={"format": "qmoefmt.calibration", "version": "1.1",
                                          "tokens": json.dumps({NAME: tokens})})
    with pytest.raises(FormatError, match=re.escape(expect)) as e:
        CalibrationFile(p).hessian(NAME, shape)
    assert str(p) in str(e.value) and NAME in str(e.value)


def test_negative_count_in_list_refused_on_open(tmp_path):
    p = tmp_path / "c.safetensors"
    save_file({NAME: hessians()[0]}, str(p), metadata={
        "format": "qmoefmt.calibration", "version": "1.1", "tokens": json.dumps({NAME: [1, -1, 2]})})
    with pytest.raises(FormatError, match="non-negative integer"):
        CalibrationFile(p)


@pytest.mark.parametrize("bits", ["ternary", "2", "3"])
def test_pack_fused_experts_each_as_if_alone(tmp_path, bits):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((E, OUT, IN)) * 0.05).astype(np.float32)
    save_file({NAME: torch.from_numpy(w), "other.experts.w": torch.from_numpy(w.copy()),
               "norm.weight": torch.ones(IN)}, str(tmp_path / "m.safetensors"))
    h, tokens = hessians()
    write_calibration(tmp_path / "c.safetensors", {NAME: h}, {NAME: tokens})
    pack(tmp_path / "m.safetensors", tmp_path / "s",
         PackOptions(experts=("*experts*",), method="gptq", bits=bits,
                     calibration=str(tmp_path / "c.safetensors")))
    assert verify(tmp_path / "s", deep=True) == []
    t = qmoefmt.open(tmp_path / "s")[NAME]
    q = t.record["quantizer"]
    assert q["status"] == ["gptq", "rtn-no-tokens", "gptq"] and q["tokens"] == tokens
    runs = [gptq.gptq_ternary(torch.from_numpy(w[e]), h[e], act_order=True) if bits == "ternary" else
            gptq.gptq_kbit(torch.from_numpy(w[e]), h[e], int(bits), act_order=True)
            for e in range(E)]
    assert np.array_equal(t.decode(), np.stack([r.dequantized.numpy() for r in runs]))
    assert np.array_equal(t.symbols(), np.stack([r.codes.numpy() for r in runs]))
    # not in the file: round to nearest, one status for the tensor
    other = qmoefmt.open(tmp_path / "s")["other.experts.w"].record["quantizer"]
    assert other["status"] == "rtn-no-calibration" and other["tokens"] == 0


def test_gptq_checks_rows_against_the_experts(tmp_path):
    h, tokens = hessians()
    write_calibration(tmp_path / "c.safetensors", {NAME: h}, {NAME: tokens})
    f = CalibrationFile(tmp_path / "c.safetensors")
    opts = GPTQSettings()
    with pytest.raises(QuantizeError, match=r"rows \[10, 16\] are not of shape \[3, 4, 16\]"):
        quantize_expert(NAME, np.zeros((10, IN), np.float32), opts, f, shape=(3, 4, IN))
    with pytest.raises(FormatError, match=r"expected a list of 4 counts"):
        quantize_expert(NAME, np.zeros((12, IN), np.float32), opts, f, shape=(4, 3, IN))
    with pytest.raises(FormatError, match=r"expected one count for a 2-D weight"):
        quantize_expert(NAME, np.zeros((9, IN), np.float32), opts, f, shape=(9, IN))


def test_collector_registry_routes_a_custom_module():
    """FUSED_EXPERTS is open: a module type routed by its own rule."""
    from qmoefmt import calibration

    class TopOne(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(E, OUT, IN))

        def forward(self, x, expert):
            return torch.stack([self.w[e] @ xi for xi, e in zip(x, expert.tolist())])

    def inputs(module, args, kwargs, wanted):
        x, expert = args
        for e in range(E):
            yield e, {"w": x[expert == e]}

    calibration.FUSED_EXPERTS["TopOne"] = calibration.FusedExperts(("w",), inputs)
    try:
        m = TopOne()
        x = torch.randn(20, IN)
        expert = torch.arange(20) % 2          # expert 2 gets nothing
        with HessianCollector(m, lambda n: n == ".w") as c:
            m(x, expert)
    finally:
        del calibration.FUSED_EXPERTS["TopOne"]
    assert c.tokens[".w"] == [10, 10, 0]
    torch.testing.assert_close(c.hessians[".w"][1], x[1::2].T @ x[1::2])
    assert torch.equal(c.hessians[".w"][2], torch.zeros(IN, IN))
