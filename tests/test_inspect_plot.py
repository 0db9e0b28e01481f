"""`inspect --plot`: a PNG beside the unchanged text/JSON output, and without matplotlib
(the `plot` extra) a one-line error naming the extra, exit 1."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from qmoefmt.testing import paths
from qmoefmt_cli.main import main as cli

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"
STORE = paths.store("switch-tiny.qmoe")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("extra", [[], ["--json"], ["--filter", "*.expert_*"]])
def test_plot_writes_png_and_keeps_output(tmp_path, extra):
    out = tmp_path / "inspect.png"
    r = run("inspect", STORE, *extra, "--plot", out)
    assert r.exit_code == 0, r.output
    data = out.read_bytes()
    assert data.startswith(PNG) and len(data) > 10_000
    assert r.output == run("inspect", STORE, *extra).output      # the PNG is extra
    if "--json" in extra:
        json.loads(r.output)


def test_plot_leaves_no_pyplot_state(tmp_path):
    run("inspect", STORE, "--plot", tmp_path / "a.png")
    if "matplotlib.pyplot" in sys.modules:
        assert not sys.modules["matplotlib.pyplot"].get_fignums()


def test_plot_without_matplotlib_is_one_line(tmp_path):
    out = tmp_path / "inspect.png"
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from qmoefmt_cli.main import main; main(sys.argv[1:], prog_name='qmoefmt')")
    r = subprocess.run([sys.executable, "-c", code, "inspect", str(STORE), "--plot", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    assert err[0].startswith("error: inspect --plot needs matplotlib"), err[0]
    assert "pip install 'qmoefmt[plot]'" in err[0], err[0]
    assert r.stdout == "" and not out.exists()
