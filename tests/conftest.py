"""Markers, and the committed fixtures' paths as pytest fixtures. The paths are spelled
once, in qmoefmt.testing.paths; module-level code that needs one before any fixture
exists (a parametrize list, a skipif) imports it from there. Tests never import each
other or this file: what they share lives in qmoefmt.testing."""
from __future__ import annotations

import json

import pytest

from qmoefmt.testing import paths
from qmoefmt.testing.broken import materialize

# Labels only: nothing is skipped or deselected by default. `-m "not slow"` etc. select.
MARKERS = {
    "gpu": "needs a CUDA device (skips itself without one)",
    "slow": "takes more than about 5 s on a CI core",
    "hf": "needs Hugging Face transformers",
}


def pytest_configure(config):
    for name, what in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")


@pytest.fixture(scope="session")
def broken_dir(tmp_path_factory):
    """The broken stores, built from fixtures/broken's overlays: copies of edge-trie.qmoe
    (one of the 1.0 edge.qmoe) with one defect each (cases.json)."""
    cases = json.loads((paths.BROKEN / "cases.json").read_text())
    return materialize(paths.FIXTURES, cases, tmp_path_factory.mktemp("broken"))


@pytest.fixture(scope="session")
def fixture_store():
    """name -> the committed store's directory (paths.STORES lists them)."""
    return paths.store


@pytest.fixture(scope="session")
def fixture_checkpoint():
    """name ("switch-tiny", "edge", "moe-tiny") -> the committed source checkpoint."""
    return paths.checkpoint


@pytest.fixture(scope="session")
def bundled_store(tmp_path_factory):
    """The bundled model (moe-tiny) packed RTN ternary with the small qmoe-2023
    dictionary, opened: the store the runtime tests run models from."""
    import qmoefmt
    from qmoefmt.pack import PackOptions, pack
    out = tmp_path_factory.mktemp("bundled") / "moe-tiny.qmoe"
    pack(paths.checkpoint("moe-tiny"), out, PackOptions(preset="switch", dictionary="qmoe-2023"))
    return qmoefmt.open(out)
