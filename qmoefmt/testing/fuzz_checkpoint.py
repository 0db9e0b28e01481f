"""The fuzzer's checkpoint half: mutants of a small safetensors checkpoint, each packed.

A safetensors file is an 8-byte little-endian header length, a JSON header and the data.
Mutations:

- plain: a byte flipped, the file truncated or extended;
- header: a value of the JSON header changed, a member dropped or added (the `_slots`
  walk and `ODD_VALUES` of the store fuzzer), the header rewritten with its length
  prefix fixed up, as a hostile writer would;
- length: the prefix set to a value around or far from the header's size.

safetensors carries no checksum, so a changed data byte packs as different weights: any
outcome but a crash, a hang, a runaway allocation, or a refused pack that leaves a store
saying complete, is sound. A pack that completes must give a store `verify --deep`
accepts: else the packer wrote what its own reader refuses.
"""
from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

from .fuzz import ODD_VALUES, Mutation, _edit, _slots
from .fuzz_targets import TARGETS

PLAIN = ("flip", "truncate", "extend")
HEADER = ("value", "drop", "add")
KINDS = PLAIN + HEADER + ("length",)


def _header(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def random_mutation(ckpt: Path, rng: random.Random) -> Mutation:
    kind = rng.choice(KINDS)
    raw = ckpt.read_bytes()
    if kind == "flip":
        return Mutation(kind, ckpt.name, rng.randrange(len(raw)), rng.randrange(1, 256))
    if kind == "truncate":
        return Mutation(kind, ckpt.name, 0, rng.randrange(len(raw)))
    if kind == "extend":
        return Mutation(kind, ckpt.name, 0, rng.randrange(1, 64))
    if kind == "length":
        n = struct.unpack("<Q", raw[:8])[0]
        return Mutation(kind, ckpt.name, 0, rng.choice(
            [0, 1, n - 1, n + 1, n + 7, len(raw), 2**31, 2**63 + 5, rng.randrange(2**64)]))
    header, _ = _header(raw)
    slots = _slots(header)
    value = rng.choice(ODD_VALUES) if kind in ("value", "add") else None
    if kind == "value" and rng.random() < 0.5:
        value = "nudge"
    return Mutation(kind, ckpt.name, rng.randrange(len(slots)), value)


def apply(ckpt: Path, m: Mutation) -> None:
    raw = bytearray(ckpt.read_bytes())
    if m.kind == "flip":
        raw[m.at % len(raw)] ^= m.value
    elif m.kind == "truncate":
        raw = raw[:m.value]
    elif m.kind == "extend":
        raw += bytes(m.value)
    elif m.kind == "length":
        raw[:8] = struct.pack("<Q", m.value % 2**64)
    else:
        header, data = _header(bytes(raw))
        _edit(header, m)
        text = json.dumps(header).encode()
        raw = bytearray(struct.pack("<Q", len(text)) + text + data)
    ckpt.write_bytes(bytes(raw))


def mutant(base: Path, m: Mutation, into: Path) -> Path:
    """A fresh directory `into` holding the mutated copy of checkpoint `base` (and its
    config.json); returns the checkpoint's path."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    for f in base.parent.iterdir():
        if f.is_file():
            shutil.copy(f, into / f.name)
    apply(into / base.name, m)
    return into / base.name


def target_of(m: Mutation) -> str:
    """The pack options a mutant is packed with, drawn from the mutation so that a finding
    replays under the same ones."""
    return sorted(TARGETS)[m.at % len(TARGETS)]


def examine(ckpt: Path, target: str) -> str:
    """'refused' (a QmoeError, nothing left saying complete) or 'accepted' (a store that
    deep-verifies); anything else propagates or is returned as 'crash: ...'."""
    from ..errors import QmoeError
    from ..pack import PackOptions, pack
    from ..store.verify import verify
    out = ckpt.parent / "packed.qmoe"
    shutil.rmtree(out, ignore_errors=True)
    try:
        pack(ckpt, out, PackOptions(**TARGETS[target]))
    except QmoeError:
        root = out / "zarr.json"
        if root.is_file() and b'"complete":true' in root.read_bytes():
            return "crash: a refused pack left a store that says complete"
        return "refused"
    problems = verify(out, deep=True)
    if problems:
        return f"crash: pack completed a store verify refuses: {problems[0]}"[:300]
    return "accepted"
