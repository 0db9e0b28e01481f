"""Issue 11: unpack's output path, the missing-store message, a closed stdout pipe."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

import qmoefmt
from qmoefmt.errors import FormatError
from qmoefmt.io.safetensors_writer import SafetensorsWriter
from qmoefmt.io.unpack import OutputExistsError, unpack
from qmoefmt_cli.main import main as cli

QMOEFMT = Path(sys.executable).parent / "qmoefmt"
STORE = "switch-tiny-qmoe2023.qmoe"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(r) -> str:
    assert r.exit_code == 1, (r.exit_code, r.output)
    assert "Traceback" not in r.output
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ------------------------------------------------------------------ unpack's output

def test_unpack_refuses_a_directory(tmp_path, fixture_store):
    out = tmp_path / "out"
    out.mkdir()
    for force in ([], ["--force"]):
        err = one_line_error(run("unpack", fixture_store(STORE), out, *force))
        assert str(out) in err and "is a directory" in err
    assert list(tmp_path.iterdir()) == [out] and not any(out.iterdir())


def test_unpack_refuses_an_existing_file_unless_forced(tmp_path, fixture_store):
    out = tmp_path / "u.safetensors"
    out.write_bytes(b"keep me")
    err = one_line_error(run("unpack", fixture_store(STORE), out))
    assert str(out) in err and "already exists" in err and "--force" in err
    assert out.read_bytes() == b"keep me"
    assert list(tmp_path.iterdir()) == [out]

    r = run("unpack", fixture_store(STORE), out, "--force")
    assert r.exit_code == 0, r.output
    assert len(load_file(str(out))) == len(qmoefmt.open(fixture_store(STORE)))
    assert list(tmp_path.iterdir()) == [out]


def test_unpack_api_refuses_a_dangling_symlink(tmp_path, fixture_store):
    out = tmp_path / "u.safetensors"
    out.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputExistsError, match="already exists"):
        unpack(qmoefmt.open(fixture_store(STORE)), out)
    assert out.is_symlink() and not (tmp_path / "u.safetensors.partial").exists()


def test_unpack_failure_midway_leaves_nothing(tmp_path, fixture_store):
    def progress(_):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        unpack(qmoefmt.open(fixture_store(STORE)), tmp_path / "u.safetensors", progress)
    assert list(tmp_path.iterdir()) == []


def test_writer_failed_close_removes_partial(tmp_path):
    out = tmp_path / "x.safetensors"
    with pytest.raises(OSError):
        with SafetensorsWriter(out, [("a", "float32", [2])]) as w:
            w.write("a", np.zeros(2, np.float32))
            out.mkdir()  # taken after the writer started: only the rename finds it
    assert list(tmp_path.iterdir()) == [out] and not any(out.iterdir())


# ------------------------------------------------------------------ open()

def test_open_names_a_missing_path(tmp_path):
    with pytest.raises(FormatError, match="missing: does not exist$"):
        qmoefmt.open(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FormatError, match="not a directory"):
        qmoefmt.open(tmp_path / "file")


# ------------------------------------------------------------------ closed stdout

@pytest.mark.parametrize("args", [["inspect"], ["inspect", "--json"], ["verify"], ["unpack"]])
def test_closed_stdout_ends_quietly(tmp_path, fixture_store, args):
    extra = [str(tmp_path / "u.safetensors")] if args == ["unpack"] else []
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write, as after `| head -0`
    try:
        r = subprocess.run([str(QMOEFMT), *args, str(fixture_store(STORE)), *extra],
                           stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert (r.returncode, r.stderr) == (141, "")
