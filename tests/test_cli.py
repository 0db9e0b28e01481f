"""The `qmoefmt` command: help, inspect/verify JSON, pack's summary, exit codes."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from qmoefmt.testing import conformance, paths
from qmoefmt_cli.main import main as cli

QMOEFMT = Path(sys.executable).parent / "qmoefmt"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(r, code=1, contains=None):
    assert r.exit_code == code, (r.exit_code, r.output)
    assert "Traceback" not in r.output
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("error: "), err
    if contains:
        assert contains in err[0], err


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    rng = np.random.default_rng(5)
    t = {
        "layer.experts.0.w": torch.from_numpy(rng.standard_normal((16, 48)).astype(np.float32) * 0.05),
        "layer.experts.1.w": torch.from_numpy(rng.standard_t(3, (16, 48)).astype(np.float32) * 0.02),
        "layer.norm": torch.ones(48),
    }
    p = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in t.items()}, str(p))
    return p


# ------------------------------------------------------------------ help

@pytest.mark.parametrize("command", [[], ["pack"], ["inspect"], ["verify"], ["unpack"], ["convert"],
                                     ["calibrate"], ["run"]])
def test_help(command):
    r = run(*command, "--help")
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.stdout
    r = run(*command, "-h")
    assert r.exit_code == 0


def test_installed_entry_point(broken_dir):
    r = subprocess.run([str(QMOEFMT), "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "qmoefmt" in r.stdout
    r = subprocess.run([str(QMOEFMT), "verify", str(broken_dir / "flipped-codes-byte")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "crc32c mismatch" in r.stdout and "Traceback" not in r.stderr


# ------------------------------------------------------------------ inspect

@pytest.mark.parametrize("store", ["edge.qmoe", "switch-tiny.qmoe"])
def test_inspect_json(store, fixture_store):
    path = fixture_store(store)
    r = run("inspect", "--json", path)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["format_version"] == ("1.0" if store in paths.LEGACY_STORES else "1.5")
    assert s["complete"] is True
    manifest = conformance.manifest("conformance")
    coded = manifest["stores"][store]["tensors"]
    params = 0
    for t in s["tensors"]:
        assert {"name", "shape", "codec", "bytes", "bits_per_param"} <= set(t)
        n = math.prod(t["shape"])
        params += n
        if n:
            assert t["bits_per_param"] == pytest.approx(8 * t["bytes"] / n, rel=1e-12)
        else:
            assert t["bits_per_param"] is None
        assert t["bytes"] > 0
        assert (t["codec"] == "qmoe.ternary-dict16") == (t["name"] in coded)
    on_disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    tot = s["total"]
    assert tot["params"] == params
    assert tot["bytes"] == on_disk
    assert tot["bits_per_param"] == pytest.approx(8 * on_disk / params, rel=1e-12)


def test_inspect_text(fixture_store):
    r = run("inspect", fixture_store("edge.qmoe"))
    assert r.exit_code == 0
    assert "qmoefmt format 1.0, complete" in r.stdout
    for name in ("edge.odd", "edge.wide", "scalar"):
        assert name in r.stdout
    assert "total:" in r.stdout and "bits/param" in r.stdout


def test_inspect_incomplete_store(broken_dir):
    r = run("inspect", "--json", broken_dir / "incomplete")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["complete"] is False
    r = run("inspect", broken_dir / "incomplete")
    assert "INCOMPLETE" in r.stdout


# ------------------------------------------------------------------ verify

def test_verify_json_good(fixture_store):
    r = run("verify", "--json", "--deep", fixture_store("edge.qmoe"))
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc == {"ok": True, "deep": True, "problems": [], "notes": []}


def test_verify_text_good(fixture_store):
    import qmoefmt
    path = fixture_store("switch-tiny-qmoe2023.qmoe")
    r = run("verify", path)
    assert r.exit_code == 0
    assert r.stdout.strip() == f"{path}: ok ({len(qmoefmt.open(path))} tensors)"


def test_verify_broken_exit_1(broken_dir):
    r = run("verify", broken_dir / "missing-chunk")
    assert r.exit_code == 1
    assert "chunk file missing" in r.stdout
    assert "Traceback" not in r.output
    r = run("verify", "--json", broken_dir / "incomplete")
    assert r.exit_code == 1
    assert "incomplete" in json.loads(r.stdout)["problems"][0]["what"]


def test_verify_not_a_store(tmp_path):
    r = run("verify", tmp_path)
    assert r.exit_code == 1
    assert "not a qmoefmt store" in r.stdout


# ------------------------------------------------------------------ pack

def test_pack_summary(tmp_path, small_ckpt):
    out = tmp_path / "s.qmoe"
    r = run("pack", small_ckpt, out, "--experts", "*.experts.*", "--dictionary", "qmoe-2023")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "packed 3 tensors (2 experts)"
    text = r.stdout
    n = 2 * 16 * 48 + 48
    assert f"params        {n:,} ({2 * 16 * 48:,} in experts)" in text
    assert f"source        {2 * n:,} bytes" in text
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert f"store         {size:,} bytes, {8 * size / n:.3f} bits/param" in text
    # the source is bf16 here, so both comparisons are the same; each names its own base
    ratio = f"{size / (2 * n):.2f}x larger" if size > 2 * n else f"{2 * n / size:.2f}x smaller"
    assert f"vs source     {ratio}" in text and f"vs bf16       {ratio}" in text
    assert "dictionaries  1" in text
    r = run("verify", "--deep", out)
    assert r.exit_code == 0, r.output


def test_pack_json_and_resume_message(tmp_path, small_ckpt):
    out = tmp_path / "s.qmoe"
    r = run("pack", small_ckpt, out, "--experts", "*.experts.*", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["tensors"] == 3 and d["expert_tensors"] == 2 and d["resumed_tensors"] == 0
    assert d["bits_per_param"] == pytest.approx(8 * d["store_bytes"] / d["params"])
    assert d["ratio_vs_bf16"] == pytest.approx(16 / d["bits_per_param"])
    assert d["ratio_vs_source"] == pytest.approx(d["source_bytes"] / d["store_bytes"])
    # a complete store cannot be resumed
    r = run("pack", small_ckpt, out, "--experts", "*.experts.*", "--resume")
    assert_one_line_error(r, 1, "already complete")
    # an interrupted one can: fake the interruption by marking the root incomplete and
    # removing one tensor's group document
    from qmoefmt import format as fmt
    meta = json.loads((out / "zarr.json").read_bytes())["attributes"]["qmoefmt"]
    meta = {k: v for k, v in meta.items() if k not in ("tensors", "dictionaries")}
    (out / "zarr.json").write_bytes(fmt.root_doc(dict(meta, complete=False)))
    (out / "tensors" / "layer.norm" / "zarr.json").unlink()
    r = run("pack", small_ckpt, out, "--experts", "*.experts.*", "--resume")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == "packed 3 tensors (2 experts, 2 already done)"
    assert run("verify", "--deep", out).exit_code == 0


def test_pack_errors(tmp_path, small_ckpt):
    # input path that does not exist: click's usage error
    r = run("pack", tmp_path / "nope.safetensors", tmp_path / "o.qmoe", "--preset", "switch")
    assert r.exit_code == 2
    assert "Traceback" not in r.output
    # unreadable checkpoint
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    assert_one_line_error(run("pack", bad, tmp_path / "o1.qmoe", "--preset", "switch"), 1,
                          str(bad))
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(small_ckpt.read_bytes()[:-10])
    assert_one_line_error(run("pack", trunc, tmp_path / "o2.qmoe", "--preset", "switch"), 1)
    unknown = tmp_path / "model.npz"
    unknown.write_bytes(b"PK")
    assert_one_line_error(run("pack", unknown, tmp_path / "o3.qmoe", "--preset", "switch"), 1,
                          "unknown extension")
    notdict = tmp_path / "model.pt"
    torch.save([torch.zeros(2)], notdict)
    assert_one_line_error(run("pack", notdict, tmp_path / "o4.qmoe", "--preset", "switch"), 1)
    # nothing selected
    assert_one_line_error(run("pack", small_ckpt, tmp_path / "o5.qmoe"), 1, "no experts")
    # bad option values: usage errors
    r = run("pack", small_ckpt, tmp_path / "o6.qmoe", "--preset", "switch", "--dictionary", "x")
    assert r.exit_code == 2
    # non-empty output directory
    out = tmp_path / "full"
    out.mkdir()
    (out / "x").write_text("x")
    assert_one_line_error(run("pack", small_ckpt, out, "--experts", "*"), 1, "not empty")
    # non-finite weights
    nan = tmp_path / "nan.safetensors"
    w = torch.zeros((2, 4))
    w[1, 1] = float("nan")
    save_file({"e.w": w}, str(nan))
    assert_one_line_error(run("pack", nan, tmp_path / "o7.qmoe", "--experts", "e.*"), 1,
                          "non-finite")


# ------------------------------------------------------------------ unpack and others

def test_unpack_cli(tmp_path, fixture_store, fixture_checkpoint):
    out = tmp_path / "u.safetensors"
    r = run("unpack", fixture_store("switch-tiny-qmoe2023.qmoe"), out)
    assert r.exit_code == 0, r.output
    n = len(load_file(str(fixture_checkpoint("switch-tiny"))))
    assert f"wrote {n} tensors" in r.stdout
    assert len(load_file(str(out))) == n


def test_store_errors_are_one_line(tmp_path, broken_dir):
    assert_one_line_error(run("unpack", broken_dir / "incomplete", tmp_path / "u.st"), 1,
                          "incomplete")
    assert_one_line_error(run("unpack", broken_dir / "unknown-major", tmp_path / "u.st"), 1,
                          "major 2")
    assert_one_line_error(run("inspect", tmp_path), 1, "not a qmoefmt store")
    assert_one_line_error(run("inspect", broken_dir / "root-checksum"), 1,
                          "checksum mismatch")
    assert not (tmp_path / "u.st").exists()
    r = run("inspect", tmp_path / "missing")
    assert r.exit_code == 2
