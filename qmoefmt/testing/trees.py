"""A directory tree as its files' bytes: what "byte-identical stores" means in the tests
(a resumed pack against an uninterrupted one, a repack against a committed fixture)."""
from __future__ import annotations

from pathlib import Path


def files_of(root: Path) -> dict[str, bytes]:
    """Every file under `root`, by its POSIX path relative to `root`, to its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}
