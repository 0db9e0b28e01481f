"""Checkpoints qmoefmt must refuse in one line naming the file, running nothing: a pickle
that calls os.system, inputs that are not regular files, a header nested too deeply."""
from __future__ import annotations

import os
import pickle
import struct
import zipfile

import pytest
from click.testing import CliRunner

from qmoefmt.io.checkpoint import CheckpointError, open_checkpoint
from qmoefmt_cli.main import main as cli

torch = pytest.importorskip("torch")


class _Evil:
    """Pickles as a REDUCE of os.system: whatever unpickles it runs the command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def one_line_failure(*args) -> str:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "a bug in qmoefmt" not in r.output and "Traceback" not in r.output
    return lines[0]


@pytest.mark.parametrize("kind", ["zip", "legacy"])
def test_a_malicious_pickle_never_runs_and_is_refused_in_one_line(tmp_path, kind):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    payload = {"w": torch.zeros(2), "x": _Evil(marker)}
    if kind == "zip":
        torch.save(payload, path)
        assert zipfile.is_zipfile(path)
        assert b"system" in zipfile.ZipFile(path).read("evil/data.pkl")
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    text = str(e.value)
    assert text.startswith(f"{path}: cannot load as a PyTorch state dict: refused by "
                           "weights_only unpickling, nothing was executed: "), text
    assert "\n" not in text and "False" not in text and "Re-running" not in text, text
    line = one_line_failure("pack", path, tmp_path / "out", "--experts", "*")
    assert str(path) in line and "nothing was executed" in line and "False" not in line
    assert not marker.exists()


def test_a_corrupt_archive_is_one_line(tmp_path):
    path = tmp_path / "broken.pt"
    torch.save({"w": torch.zeros(2)}, path)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match=f"^{path}: cannot load as a PyTorch state dict: ") as e:
        open_checkpoint(path)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_a_device_is_not_a_regular_file(tmp_path):
    with pytest.raises(CheckpointError, match="^/dev/zero: a character device, not a regular file"):
        open_checkpoint("/dev/zero")
    line = one_line_failure("pack", "/dev/zero", tmp_path / "out", "--experts", "*")
    assert "a character device, not a regular file" in line


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_a_named_pipe_is_refused_before_it_is_opened(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: refused unopened."""
    (tmp_path / "ckpt").mkdir()
    os.mkfifo(tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: a named pipe, not a regular"):
        open_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="a named pipe, not a regular file"):
        open_checkpoint(tmp_path / "ckpt" / "model.safetensors")


def test_a_missing_file_is_no_such_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        open_checkpoint(tmp_path / "absent.safetensors")


def test_a_safetensors_header_nested_200000_deep_names_the_file(tmp_path):
    path = tmp_path / "deep.safetensors"
    header = b'{"__metadata__":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match=f"^{path}: corrupt safetensors header: nested too deeply"):
        open_checkpoint(path)
    line = one_line_failure("pack", path, tmp_path / "out", "--experts", "*")
    assert str(path) in line and "nested too deeply" in line


def test_a_shard_index_nested_too_deeply_names_the_index(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: invalid index"):
        open_checkpoint(tmp_path)
