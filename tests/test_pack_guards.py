"""pack must not succeed silently at the wrong thing (issue 11 §1): no experts selected,
selected tensors kept dense, GPTQ falling back to round to nearest, a resume under other
options."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import save_file

import qmoefmt
from qmoefmt.calibration import write_calibration
from qmoefmt.pack import PackError, PackOptions, pack
from qmoefmt.store.writer import StoreExistsError
from qmoefmt_cli.main import main as cli

NAMES = [f"blocks.0.mlp.experts.expert_{j}.wi.weight" for j in range(3)]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(r, *needles):
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def model(tmp_path):
    """Three 2-D experts and a 1-D norm; the calibration file has a Hessian for expert_0,
    a zero one with no tokens for expert_1, none for expert_2."""
    rng = np.random.default_rng(0)
    w = {n: (rng.standard_normal((24, 40)) * 0.05).astype(np.float32) for n in NAMES}
    w["blocks.0.norm.weight"] = np.ones(40, np.float32)
    save_file(w, str(tmp_path / "m.safetensors"))
    X = rng.standard_normal((500, 40)).astype(np.float32)
    write_calibration(tmp_path / "cal.safetensors",
                      {NAMES[0]: torch.from_numpy(X.T @ X), NAMES[1]: torch.zeros(40, 40)},
                      {NAMES[0]: 500, NAMES[1]: 0})
    return tmp_path


# ------------------------------------------------------------------ no experts selected

@pytest.mark.parametrize("args, needles", [
    (["--preset", "mixtral"], ["--preset mixtral selects no expert tensor",
                               "tensors named like experts: " + NAMES[0]]),
    (["--experts", "nomatch.*"], ["--experts 'nomatch.*' selects no expert tensor"]),
    (["--experts", "*norm*"], ["--experts '*norm*' selects no expert tensor",
                               "blocks.0.norm.weight: 1-D", "2 or more dimensions"]),
])
def test_no_experts_is_an_error_before_writing(model, args, needles):
    out = model / "s.qmoe"
    one_line_error(run("pack", model / "m.safetensors", out, *args), str(model / "m.safetensors"),
                   *needles)
    assert not out.exists()


def test_no_expert_names_at_all(tmp_path):
    save_file({"a.weight": np.ones((4, 4), np.float32)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(PackError, match="no tensor name contains 'expert'"):
        pack(tmp_path / "m.safetensors", tmp_path / "s", PackOptions(preset="switch"))
    assert not (tmp_path / "s").exists()


def test_listing_is_capped(tmp_path):
    save_file({f"x.experts.{i}": np.ones((2, 2), np.float32) for i in range(9)},
              str(tmp_path / "m.safetensors"))
    with pytest.raises(PackError, match=r", \.\.\. \(9 in all\)"):
        pack(tmp_path / "m.safetensors", tmp_path / "s", PackOptions(experts=("nope",)))


def test_skipped_matches_warn_when_others_are_packed(model):
    r = run("pack", model / "m.safetensors", model / "s.qmoe", "--experts", "*experts*",
            "--experts", "*norm*", "--json")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("warning: ") == 1
    assert "1 tensors selected as experts stay dense: blocks.0.norm.weight (1-D)" in r.stderr
    d = json.loads(r.stdout)
    assert d["expert_tensors"] == 3 and d["skipped"] == [["blocks.0.norm.weight", "1-D"]]


def test_int_tensor_reason(tmp_path):
    save_file({"e.a": np.ones((2, 2), np.float32), "e.b": np.ones((2, 2), np.int32)},
              str(tmp_path / "m.safetensors"))
    s = pack(tmp_path / "m.safetensors", tmp_path / "s", PackOptions(experts=("e.*",)))
    assert s.expert_tensors == 1 and s.skipped == [["e.b", "dtype int32"]]
    assert s.warnings()[0].startswith("1 tensors selected as experts stay dense: e.b (dtype int32)")


# ------------------------------------------------------------------ GPTQ fallbacks

def test_fallbacks_counted_and_warned(model):
    args = ("pack", model / "m.safetensors", model / "s.qmoe", "--experts", "*experts*",
            "--method", "gptq", "--calibration", model / "cal.safetensors")
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "  gptq          1 of 3 experts, round to nearest: 1 rtn-no-calibration, " \
           "1 rtn-no-tokens" in r.stdout
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("warning: ")]
    assert warnings == ["warning: GPTQ fell back to round to nearest for 2 of 3 experts "
                        f"(1 rtn-no-calibration, 1 rtn-no-tokens: {NAMES[1]}, {NAMES[2]}); "
                        "--strict makes this an error"]
    r = run(*args[:2], model / "j.qmoe", *args[3:], "--json")
    d = json.loads(r.stdout)
    assert d["gptq_experts"] == 3
    assert d["fallbacks"] == {"rtn-no-calibration": 1, "rtn-no-tokens": 1}
    assert d["fallback_tensors"] == [[NAMES[1], "rtn-no-tokens"], [NAMES[2], "rtn-no-calibration"]]
    # inspect reads the same counts back from the store's records
    r = run("inspect", model / "s.qmoe", "--json")
    statuses = json.loads(r.stdout)["gptq_status"]
    assert {k: v for k, v in statuses.items() if k.startswith("rtn-")} == d["fallbacks"]
    assert sum(statuses.values()) == 3
    r = run("inspect", model / "s.qmoe")
    line = next(ln for ln in r.stdout.splitlines() if "GPTQ status" in ln)
    assert "1 rtn-no-calibration" in line and "1 rtn-no-tokens" in line


def test_rtn_pack_has_no_gptq_line(model):
    r = run("pack", model / "m.safetensors", model / "s.qmoe", "--experts", "*experts*")
    assert r.exit_code == 0 and "gptq" not in r.stdout and "warning" not in r.stderr


def test_strict_refuses_known_fallbacks_before_writing(model):
    out = model / "s.qmoe"
    line = one_line_error(run("pack", model / "m.safetensors", out, "--experts", "*experts*",
                              "--method", "gptq", "--calibration", model / "cal.safetensors",
                              "--strict"),
                          "cal.safetensors: --strict: 2 experts would fall back from GPTQ to "
                          "round to nearest",
                          "1 rtn-no-calibration, 1 rtn-no-tokens", "nothing was written")
    assert NAMES[1] in line and NAMES[2] in line
    assert not out.exists()


def test_strict_late_fallback_leaves_store_incomplete(model):
    """A zero Hessian under a token count shows only when GPTQ runs: the store is written
    but never committed, and the error says so."""
    X = np.random.default_rng(1).standard_normal((50, 40)).astype(np.float32)
    write_calibration(model / "late.safetensors",
                      {NAMES[0]: torch.from_numpy(X.T @ X), NAMES[1]: torch.zeros(40, 40)},
                      {NAMES[0]: 50, NAMES[1]: 7})
    out = model / "s.qmoe"
    opts = PackOptions(experts=("*experts.expert_[01]*",), method="gptq",
                       calibration=str(model / "late.safetensors"))
    with pytest.raises(PackError, match=r"s\.qmoe: --strict: 1 expert fell back .*1 rtn-no-tokens: "
                                        + NAMES[1].replace(".", r"\.") + r"\); the store is left "
                                        r"incomplete \(not committed\)"):
        pack(model / "m.safetensors", out, opts, strict=True)
    assert not qmoefmt.open(out, allow_incomplete=True).complete
    # without --strict the same pack completes, and counts it
    s = pack(model / "m.safetensors", model / "t.qmoe", opts)
    assert s.fallbacks == {"rtn-no-tokens": 1} and s.gptq_experts == 2


def test_strict_passes_when_all_experts_get_gptq(model):
    s = pack(model / "m.safetensors", model / "s.qmoe",
             PackOptions(experts=(NAMES[0],), method="gptq",
                         calibration=str(model / "cal.safetensors")), strict=True)
    assert s.fallbacks == {} and s.gptq_experts == 1 and s.warnings() == []
    assert qmoefmt.open(model / "s.qmoe").complete


# ------------------------------------------------------------------ resume under other options

def _interrupt(out):
    """Marks a finished store incomplete, as an interrupted pack leaves it."""
    from qmoefmt import format as fmt
    meta = json.loads((out / "zarr.json").read_bytes())["attributes"]["qmoefmt"]
    meta = {k: v for k, v in meta.items() if k not in ("tensors", "dictionaries")}
    (out / "zarr.json").write_bytes(fmt.root_doc(dict(meta, complete=False)))


def test_resume_names_the_options_that_differ(model):
    out = model / "s.qmoe"
    pack(model / "m.safetensors", out, PackOptions(experts=("*experts*",)))
    _interrupt(out)
    r = run("pack", model / "m.safetensors", out, "--experts", "*expert_*", "--dictionary",
            "qmoe-2023", "--resume")
    line = one_line_error(r, "cannot resume: the interrupted pack had other settings: ",
                          "--experts ['*expert_*'] (interrupted: ['*experts*'])",
                          "--dictionary 'qmoe-2023' (interrupted: 'auto')")
    assert "{" not in line
    # the same options still resume
    r = run("pack", model / "m.safetensors", out, "--experts", "*experts*", "--resume")
    assert r.exit_code == 0, r.output


def test_resume_from_another_checkpoint(model, tmp_path):
    out = model / "s.qmoe"
    pack(model / "m.safetensors", out, PackOptions(experts=("*experts*",)))
    _interrupt(out)
    other = model / "o.safetensors"
    save_file({NAMES[0]: np.ones((4, 4), np.float32)}, str(other))
    with pytest.raises(StoreExistsError, match="cannot resume: the interrupted pack read "
                                               "another checkpoint"):
        pack(other, out, PackOptions(experts=("*experts*",)), resume=True)


def test_a_root_readers_would_refuse_is_never_committed(tmp_path):
    # names are data: 400 names of 4,000 '{' make a 1.6 MB root denser than §9 allows; the
    # pack fails before the commit marker, so no reader is handed a store it must refuse
    w = {("{" * 4000) + f".{i}": np.zeros(1, np.float32) for i in range(400)}
    w["x.experts.0"] = np.ones((4, 4), np.float32)
    save_file(w, str(tmp_path / "m.safetensors"))
    r = run("pack", tmp_path / "m.safetensors", tmp_path / "o.qmoe", "--experts", "x.experts.*",
            "--dictionary", "qmoe-2023")
    one_line_error(r, "o.qmoe/zarr.json", "the completed root would be", "spec §9")
    doc = json.loads((tmp_path / "o.qmoe" / "zarr.json").read_bytes())
    assert doc["attributes"]["qmoefmt"]["complete"] is False
