"""The committed conformance vectors (fixtures/conformance*/, described in
fixtures/README.md): which stores each manifest covers, what their coded tensors must
hold, and the check that a store decodes to them bit for bit, which the conformance tests
and every decode backend's suite share."""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import numpy as np
from safetensors.numpy import load_file

from .. import open as open_store
from ..format import constants as C
from . import paths

# manifest directory -> (the codec of the tensors it lists, the name its vectors files give
# what symbols() returns: ternary symbols, or the k-bit codecs' levels)
MANIFESTS = {
    "conformance": (C.CODEC_TERNARY, "symbols"),
    "conformance-uint": (C.CODEC_UINT, "levels"),
    "conformance-uint-dict": (C.CODEC_UINT_DICT, "levels"),
}


@lru_cache(maxsize=None)
def manifest(kind: str) -> dict:
    return json.loads((paths.FIXTURES / kind / "manifest.json").read_text())


def stores(kind: str) -> list[str]:
    return sorted(manifest(kind)["stores"])


def cases() -> list[tuple[str, str]]:
    """(manifest, store) for every store of every manifest."""
    return [(kind, s) for kind in MANIFESTS for s in stores(kind)]


def vectors(kind: str, store: str) -> dict[str, np.ndarray]:
    return load_file(str(paths.FIXTURES / kind / manifest(kind)["stores"][store]["vectors"]))


def sha256(a) -> str:
    """What the manifests' *_sha256 fields hash: an array's bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def check_decodes(kind: str, store: str, backend: str | None = None) -> int:
    """Asserts that every tensor manifest `kind` lists for `store` decodes through decode
    backend `backend` (None: the default) to its vectors bit for bit, -0.0 included:
    symbols() (or levels) and decode(), shapes and dtypes too. Returns how many tensors
    it checked."""
    codec, key = MANIFESTS[kind]
    tensors = manifest(kind)["stores"][store]["tensors"]
    vec = vectors(kind, store)
    assert set(vec) == {f"{n}/{k}" for n in tensors for k in (key, "values")}
    st = open_store(paths.store(store))
    for name in tensors:
        t = st[name]
        assert t.codec == codec, name
        want_sym, want_val = vec[f"{name}/{key}"], vec[f"{name}/values"]
        assert want_val.dtype == np.float32, name
        got_sym = t.symbols(backend=backend)
        assert got_sym.shape == want_sym.shape and got_sym.dtype == want_sym.dtype, name
        assert np.array_equal(got_sym, want_sym), name
        got = t.decode(backend=backend)
        assert got.shape == want_val.shape and got.dtype == np.float32, name
        assert got.tobytes() == want_val.tobytes(), name
    return len(tensors)
