"""The README's Python example runs as written after its main command (the store that
command writes at /tmp/moe-tiny.qmoe stands in for a store of the same model here)."""
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example() -> str:
    text = README.read_text()
    marker = text.index("<!-- python-example:")
    return re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)


def test_the_python_example_runs(bundled_store, monkeypatch):
    code = python_example()
    assert '"/tmp/moe-tiny.qmoe"' in code
    monkeypatch.chdir(README.parent)          # the example names fixtures/ from the checkout
    scope: dict = {}
    exec(code.replace('"/tmp/moe-tiny.qmoe"', repr(str(bundled_store.path))), scope)
    assert scope["y"].shape == (4, scope["t"].shape[0])
    assert scope["report"]["cache"].stats()["budget"] == 2**20
