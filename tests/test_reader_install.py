"""The install without the `torch` extra (`pip install qmoefmt`): stores open, inspect,
verify, decode and unpack, safetensors checkpoints pack to ternary RTN, and every feature
that needs PyTorch fails with one line naming the extra.

Every subprocess here blocks `import torch`, so the torch-free paths are proven on every
run: in the main venv, which has torch, as in the README's reader venv, which has none.
They run in a scratch directory, so they also prove the install works outside the checkout.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qmoefmt.demo import CHECKOUT_MODEL, MODEL_ENV, bundled_model_path
from qmoefmt.errors import QmoeError
from qmoefmt.testing import paths

CHECKPOINT = paths.checkpoint("switch-tiny")
# Each store with the conformance manifest that lists its coded tensors.
STORES = {
    "switch-tiny.qmoe": "conformance",
    "switch-tiny-2bit.qmoe": "conformance-uint",
    "switch-tiny-2bit-dict16.qmoe": "conformance-uint-dict",
}
# The modules that import torch when imported; the rest of the package must not.
TORCH_MODULES = {
    "qmoefmt.calibration", "qmoefmt.demo.generate", "qmoefmt.demo.model", "qmoefmt.quantize.calibration",
    "qmoefmt.quantize.collector", "qmoefmt.quantize.gptq", "qmoefmt.quantize.grids",
    "qmoefmt.quantize.sequential", "qmoefmt.torch",
}
# None in sys.modules makes `import torch` (and torch.anything) raise ModuleNotFoundError,
# exactly as when the extra is not installed.
NO_TORCH = "import sys; sys.modules['torch'] = None\n"


def python(code: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH + code, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def qmoefmt(*args, cwd: Path) -> subprocess.CompletedProcess:
    return python("from qmoefmt_cli.main import main; main(sys.argv[1:], prog_name='qmoefmt')",
                  *args, cwd=cwd)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


def assert_needs_torch(r: subprocess.CompletedProcess, feature: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    assert err[0].startswith(f"error: {feature}") and "needs PyTorch" in err[0], err[0]
    assert "pip install 'qmoefmt[torch]'" in err[0], err[0]


def test_the_package_imports_without_torch(tmp_path):
    # qmoefmt.testing is left out: suites for other implementations, which may need test-only
    # packages the reader venv lacks.
    out = ok(python(
        "import importlib, json, pkgutil, qmoefmt, qmoefmt_cli.main\n"
        "mods = [m.name for m in pkgutil.walk_packages(qmoefmt.__path__, 'qmoefmt.')\n"
        "        if not m.name.startswith('qmoefmt.testing')]\n"
        "for name in sorted(set(mods) - set(sys.argv[1:])):\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(mods))\n", *sorted(TORCH_MODULES), cwd=tmp_path))
    assert TORCH_MODULES < set(json.loads(out))     # the list names modules that exist


@pytest.mark.parametrize("store", STORES)
def test_inspect_verify_unpack_without_torch(store, tmp_path):
    path = paths.store(store)
    summary = json.loads(ok(qmoefmt("inspect", path, "--json", cwd=tmp_path)))
    assert summary["complete"] and summary["experts"]["tensors"] == 16
    ok(qmoefmt("verify", "--deep", path, cwd=tmp_path))
    out = tmp_path / "dense.safetensors"
    unpacked = json.loads(ok(qmoefmt("unpack", path, out, "--json", cwd=tmp_path)))
    assert unpacked["tensors"] == len(summary["tensors"]) and out.is_file()


@pytest.mark.parametrize("store", STORES)
def test_decode_without_torch(store, tmp_path):
    """Every expert tensor decodes through the API to its conformance vectors, bit for bit."""
    out = ok(python("from qmoefmt.testing.conformance import check_decodes\n"
                    "print(check_decodes(sys.argv[1], sys.argv[2]))\n",
                    STORES[store], store, cwd=tmp_path))
    assert int(out) == 16


def test_ternary_rtn_pack_without_torch(tmp_path):
    """Equals the committed store in every tensor and dictionary (its root differs only in
    the pack options recorded, which have grown since)."""
    out = tmp_path / "switch.qmoe"
    s = json.loads(ok(qmoefmt("pack", CHECKPOINT, out, "--preset", "switch", "--json",
                              cwd=tmp_path)))
    assert s["expert_tensors"] == 16
    ok(qmoefmt("verify", "--deep", out, cwd=tmp_path))
    committed = paths.store("switch-tiny.qmoe")
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file())
    for f in files:
        if f != Path("zarr.json"):
            assert (out / f).read_bytes() == (committed / f).read_bytes(), f
    root, want = (json.loads((p / "zarr.json").read_text())["attributes"]["qmoefmt"]
                  for p in (out, committed))
    assert root["tensors"] == want["tensors"] and root["dictionaries"] == want["dictionaries"]


@pytest.mark.parametrize("args, feature", [
    (["calibrate", "out.cal.safetensors"], "qmoefmt calibrate"),
    (["calibrate", "--sequential", "out.cal.safetensors"], "qmoefmt calibrate"),
    (["pack", CHECKPOINT, "out.qmoe", "--preset", "switch", "--bits", "2"], "pack --bits 2"),
    (["pack", CHECKPOINT, "out.qmoe", "--preset", "switch", "--method", "gptq",
      "--calibration", CHECKPOINT], "pack --method gptq"),
])
def test_torch_features_say_which_extra(args, feature, tmp_path):
    """One line naming the feature and the extra, and nothing left behind."""
    assert_needs_torch(qmoefmt(*args, cwd=tmp_path), feature)
    assert list(tmp_path.iterdir()) == []


def test_pytorch_checkpoint_says_which_extra(tmp_path):
    # The extension alone sends a file to torch, so an empty one shows the refusal.
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(b"")
    r = qmoefmt("pack", ckpt, tmp_path / "out.qmoe", "--preset", "switch", cwd=tmp_path)
    assert_needs_torch(r, f"{ckpt}: reading a PyTorch checkpoint")
    assert not (tmp_path / "out.qmoe").exists()


def test_bundled_model_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(MODEL_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert bundled_model_path() == paths.REPO / CHECKOUT_MODEL
    elsewhere = tmp_path / "model.safetensors"
    elsewhere.write_bytes(b"")
    monkeypatch.setenv(MODEL_ENV, str(elsewhere))
    assert bundled_model_path() == elsewhere
    monkeypatch.setenv(MODEL_ENV, str(tmp_path / "missing.safetensors"))
    with pytest.raises(QmoeError, match=f"{MODEL_ENV}=.*missing.safetensors: no such file"):
        bundled_model_path()
