"""A deterministic text corpus that every CPython installation carries.

The corpus is the interpreter's own documentation: the ``pydoc_data.topics``
help pages plus the docstrings of the pure-Python standard library, read from
source with :mod:`ast` (importing would run module code and miss frozen
modules).  Nothing machine-dependent enters the text: no file paths, no
third-party packages, and packages that distributions commonly strip or split
out (tkinter, idlelib, test suites, ...) are skipped.  The text does depend on
the CPython version; :func:`fingerprint` identifies a split.

Tokenization is byte-level (UTF-8 bytes, vocabulary 256), so no vocabulary file
is needed.  Documents are joined with a NUL byte, which never occurs in them.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

VOCAB_SIZE = 256
DOC_SEPARATOR = b"\x00"
# One document in HELDOUT_MODULUS goes to the held-out split, chosen by a hash of
# its name so the split does not shift when documents are added or removed.
HELDOUT_MODULUS = 10

# Packages that distributions ship separately or that are mostly test code; a
# corpus including them would differ between machines with the same CPython.
_EXCLUDED_MODULES = frozenset(
    {
        "antigravity",
        "distutils",
        "ensurepip",
        "idlelib",
        "lib2to3",
        "pydoc_data",  # used through its topics instead
        "test",
        "this",
        "tkinter",
        "turtle",
        "turtledemo",
    }
)


def _help_topic_documents(keep: Callable[[str], bool]) -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    names = ((f"topic:{key}", key) for key in sorted(topics))
    return [(name, topics[key]) for name, key in names if keep(name)]


def _docstrings(source: str) -> list[str]:
    tree = ast.parse(source)
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    # ast.walk is breadth-first; sorting by position restores reading order.
    found = [n for n in ast.walk(tree) if isinstance(n, nodes)]
    found.sort(key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
    return [doc for n in found if (doc := ast.get_docstring(n))]


def _module_files(stdlib: Path, name: str) -> list[tuple[str, Path]]:
    single = stdlib / f"{name}.py"
    if single.is_file():
        return [(name, single)]
    package = stdlib / name
    if not package.is_dir():
        return []
    files = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(stdlib).with_suffix("").parts
        if any(p.startswith("test") for p in parts[1:]):
            continue
        dotted = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files.append((dotted, path))
    return files


def _stdlib_docstring_documents(keep: Callable[[str], bool]) -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(
        n for n in sys.stdlib_module_names if not n.startswith("_") and n not in _EXCLUDED_MODULES
    )
    documents = []
    for name in names:
        for dotted, path in _module_files(stdlib, name):
            # Filter before parsing: parsing is what makes the corpus slow to build.
            if not keep(f"module:{dotted}"):
                continue
            docs = _docstrings(path.read_text(encoding="utf-8"))
            if docs:
                documents.append((f"module:{dotted}", "\n\n".join(docs)))
    return documents


def corpus_documents(keep: Callable[[str], bool] = lambda name: True) -> list[tuple[str, str]]:
    """(name, text) documents in a fixed order: help topics, then module docstrings.

    ``keep`` selects documents by name before their text is built.
    """
    return _help_topic_documents(keep) + _stdlib_docstring_documents(keep)


def is_heldout(name: str) -> bool:
    return zlib.crc32(name.encode("utf-8")) % HELDOUT_MODULUS == 0


def encode(text: str) -> np.ndarray:
    """Byte-level tokens (uint8) of ``text``."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(tokens: np.ndarray) -> str:
    return np.asarray(tokens, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")


def _stream(documents: list[tuple[str, str]]) -> np.ndarray:
    data = b"".join(text.encode("utf-8") + DOC_SEPARATOR for _, text in documents)
    return np.frombuffer(data, dtype=np.uint8).copy()


def train_tokens() -> np.ndarray:
    """Token stream of the training split, each document followed by the separator."""
    return _stream(corpus_documents(lambda name: not is_heldout(name)))


def heldout_tokens() -> np.ndarray:
    """Token stream of the held-out split (cheap: only its documents are parsed)."""
    return _stream(corpus_documents(is_heldout))


def fingerprint(tokens: np.ndarray) -> str:
    """SHA-256 of a token stream; a checkpoint records those of its train and held-out splits."""
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.uint8).tobytes()).hexdigest()
