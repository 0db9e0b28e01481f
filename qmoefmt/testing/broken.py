"""The broken-store fixtures as overlays: each case under fixtures/broken/<case>/ holds only
the files in which it differs from its base store (another committed fixture), and
cases.json names the base, the files the case removes, and a digest of the base's files,
so that a regenerated base is refused instead of silently giving other stores. Whole
copies cost 27 x 250 KB for a few changed bytes each."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from .trees import files_of


def tree_sha256(root: Path) -> str:
    """SHA-256 over the sorted (path, SHA-256 of bytes) of every file under root."""
    h = hashlib.sha256()
    for rel, data in files_of(root).items():
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def write_overlay(full: Path, base: Path, out: Path) -> list[str]:
    """Write into `out` the files of `full` that `base` lacks or holds with other bytes;
    return the base's files that `full` lacks (sorted)."""
    have, orig = files_of(full), files_of(base)
    for rel, data in have.items():
        if orig.get(rel) != data:
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
    return sorted(set(orig) - set(have))


def materialize(fixtures: Path, cases: dict, into: Path) -> Path:
    """Build every case as a whole store under `into`/<case> from fixtures/broken's
    overlays; raises if a base's files are not those the overlays were made against."""
    bases: dict[str, str] = {}
    for name, case in sorted(cases.items()):
        base = fixtures / case["base"]
        if case["base"] not in bases:
            bases[case["base"]] = tree_sha256(base)
        if bases[case["base"]] != case["base_sha256"]:
            raise RuntimeError(f"{base}: not the store fixtures/broken/{name} was made from "
                               "(regenerate the broken fixtures with the base, deliberately)")
        dst = into / name
        shutil.copytree(base, dst)
        for rel in case["removed"]:
            (dst / rel).unlink()
        for d in sorted((p for p in dst.rglob("*") if p.is_dir()), reverse=True):
            if not any(d.iterdir()):      # git keeps no empty directory: neither do we
                d.rmdir()
        overlay = fixtures / "broken" / name
        for rel, data in files_of(overlay).items():
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return into
