"""A mutation fuzzer over stores, for the fault suite (tests/test_fuzz.py) and the
campaign (scripts/fault_campaign.py).

A mutant is a copy of a small valid store with one change, described by a `Mutation`
(JSON-able, so a finding is replayable and joins the committed seed corpus):

- plain: bytes of one file flipped, truncated, extended, or the file deleted. Every such
  change must be refused, by open, decode or verify (spec §10);
- re-signed: what an attacker who knows the format does: a chunk byte or a metadata value
  changed, then every CRC, content id and the root's checksum recomputed, so only the
  validators stand between the change and a decoder. These may be refused, or accepted
  when the result is itself a valid store (a legitimate content edit).

`examine` opens, decodes every tensor and deep-verifies a mutant in this process; a worker
process (see `Worker`) runs it under a memory limit and a deadline, so hangs and runaway
allocations are seen as such, not as a stuck test.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import selectors
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..format import metadata as M

PLAIN = ("flip", "truncate", "extend", "delete")
RESIGNED = ("chunk", "value", "drop", "add", "duplicate")
# Written by hand for the seed corpus, never drawn: "set" assigns values at JSON paths of the
# root's attributes (a string step into a list picks the record of that name) and
# re-signs; "root-text" replaces text in the root's bytes and re-signs its checksum alone,
# for what a JSON round trip cannot express (duplicate keys, escapes, spellings).
CRAFTED = ("set", "root-text")
# Values an attacker tries in place of a metadata value.
ODD_VALUES = [0, -1, 1, 2**31, 2**63, 2**64 + 1, 3.0, 0.5, 1e308, -0.0, "", "x", "1.0", "9.9",
              None, True, [], {}, [0], "\u0661.\u0660", "a" * 5000]


@dataclass(frozen=True)
class Mutation:
    kind: str         # one of PLAIN + RESIGNED + CRAFTED
    file: str         # the file, relative to the store ("" for metadata mutations: the root)
    at: int           # byte offset, or index of the metadata value (in walk order)
    value: object = None    # the byte XOR mask, the new length, or the metadata value

    def as_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def file_names(store: Path) -> list[str]:
    return sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file())


def random_mutation(store: Path, rng: random.Random) -> Mutation:
    kind = rng.choice(PLAIN + RESIGNED)
    files = file_names(store)
    if kind in PLAIN:
        f = rng.choice(files)
        size = (store / f).stat().st_size
        if kind == "flip":
            return Mutation(kind, f, rng.randrange(max(size, 1)), rng.randrange(1, 256))
        if kind == "truncate":
            return Mutation(kind, f, 0, rng.randrange(max(size, 1)))
        return Mutation(kind, f, 0, rng.randrange(1, 64) if kind == "extend" else None)
    if kind == "chunk":
        chunks = [f for f in files if f.endswith("/c") or "/c/" in f]
        f = rng.choice(chunks)
        size = (store / f).stat().st_size
        return Mutation(kind, f, rng.randrange(max(size, 1)), rng.randrange(1, 256))
    slots = _slots(_root(store))
    if kind == "duplicate":     # an entry of an array twice (an object cannot hold twins)
        return Mutation(kind, "", rng.choice([i for i, (c, _) in enumerate(slots)
                                              if isinstance(c, list)]))
    value = rng.choice(ODD_VALUES) if kind in ("value", "add") else None
    if kind == "value" and rng.random() < 0.5:
        value = "nudge"     # a nearby number: the likeliest to slip past a check
    return Mutation(kind, "", rng.randrange(len(slots)), value)


def apply(store: Path, m: Mutation) -> None:
    """Mutate the store in place."""
    path = store / m.file
    if m.kind in PLAIN:
        if m.kind == "delete":
            path.unlink()
            return
        data = bytearray(path.read_bytes())
        if m.kind == "flip" and data:
            data[m.at % len(data)] ^= m.value
        elif m.kind == "truncate":
            data = data[:m.value]
        elif m.kind == "extend":
            data += bytes(m.value)
        path.write_bytes(bytes(data))
        return
    if m.kind == "root-text":
        raw = (store / "zarr.json").read_bytes()
        old, new = (x.encode() for x in m.value)
        assert old in raw, f"{m}: {old!r} is not in the root"
        (store / "zarr.json").write_bytes(raw.replace(old, new, 1))
        _resign_checksum(store)
        return
    if m.kind == "chunk":
        data = bytearray(path.read_bytes())
        if data:
            data[m.at % len(data)] ^= m.value
        path.write_bytes(bytes(data))
    elif m.kind == "set":
        doc = json.loads((store / "zarr.json").read_bytes())
        for steps, value in m.value:
            _set(doc["attributes"]["qmoefmt"], steps, value)
        (store / "zarr.json").write_bytes(_dumps(doc))
    else:
        doc = json.loads((store / "zarr.json").read_bytes())
        _edit(doc["attributes"]["qmoefmt"], m)
        (store / "zarr.json").write_bytes(_dumps(doc))
    resign(store)


def _root(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_bytes())["attributes"]["qmoefmt"]


def _slots(obj, out=None) -> list[tuple[object, object]]:
    """Every (container, key) of a metadata tree, in walk order, the checksum's excepted."""
    out = [] if out is None else out
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for k, v in items:
        if k == "checksum":
            continue
        out.append((obj, k))
        if isinstance(v, (dict, list)):
            _slots(v, out)
    return out


def _edit(meta: dict, m: Mutation) -> None:
    container, key = _slots(meta)[m.at]
    if m.kind == "value":
        old = container[key]
        if m.value == "nudge":
            container[key] = (old + random.Random(m.at).choice([-1, 1])
                              if isinstance(old, (int, float)) and not isinstance(old, bool)
                              else ODD_VALUES[m.at % len(ODD_VALUES)])
        else:
            container[key] = m.value
    elif m.kind == "drop":
        del container[key]
    elif m.kind == "add":
        if isinstance(container, dict):
            container[f"{key}_x"] = m.value
        else:
            container.append(m.value)
    elif m.kind == "duplicate":
        container.insert(key, container[key])


def _set(obj, steps: list, value) -> None:
    for i, step in enumerate(steps):
        if isinstance(obj, list) and isinstance(step, str):
            step = next(j for j, r in enumerate(obj) if r.get("name") == step)
        if i == len(steps) - 1:
            obj[step] = value
        else:
            obj = obj[step]


def _dumps(doc) -> bytes:
    return (json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n"
            ).encode()


def _entries(meta: dict, key: str) -> list:
    """The root's list `key` as a mutation left it: anything but a list has no entries."""
    value = meta.get(key)
    return value if isinstance(value, list) else []


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):      # a mutated path: too long, or holding a NUL
        return False


def resign(store: Path) -> None:
    """Recompute what an attacker can: array CRCs, dictionary content ids, the tensor
    groups' copies of their records, and the root's checksum."""
    doc = json.loads((store / "zarr.json").read_bytes())
    meta = doc["attributes"]["qmoefmt"]
    for e in _entries(meta, "dictionaries"):
        if isinstance(e, dict):
            _resign_arrays(store, e)
            old = e.get("id")
            arrays = e.get("arrays") if isinstance(e.get("arrays"), dict) else {}
            new = "sha256:" + hashlib.sha256(b"".join(
                _chunk(store, e, name) for name in sorted(arrays))).hexdigest()
            e["id"] = new
            for r in _entries(meta, "tensors"):
                if isinstance(r, dict) and r.get("dictionary") == old:
                    r["dictionary"] = new
    for r in _entries(meta, "tensors"):
        if isinstance(r, dict):
            _resign_arrays(store, r)
            group = store / str(r.get("path")) / "zarr.json"
            if isinstance(r.get("path"), str) and _is_file(group):
                group.write_bytes(M.node_doc(r))
    for e in _entries(meta, "dictionaries"):
        group = store / str(e.get("path")) / "zarr.json" if isinstance(e, dict) else None
        if group is not None and _is_file(group):
            group.write_bytes(M.node_doc(e))
    (store / "zarr.json").write_bytes(_dumps(doc))
    _resign_checksum(store)


def _resign_checksum(store: Path) -> None:
    """The root's self-checksum over its bytes as they are (spec §4.4)."""
    raw = (store / "zarr.json").read_bytes()
    raw = re.sub(rb'"checksum":"[0-9a-fA-F]{8}"', b'"checksum":"00000000"', raw, count=1)
    crc = f"{M.crc32c(raw):08x}"
    (store / "zarr.json").write_bytes(raw.replace(b'"checksum":"00000000"',
                                                  f'"checksum":"{crc}"'.encode(), 1))


def _chunk(store: Path, entry: dict, name: str) -> bytes:
    base = store / str(entry.get("path")) / name
    chunk = base / "c"
    for _ in range(8):                   # c/0/0... for an n-d array
        if _is_file(chunk):
            return chunk.read_bytes()
        chunk = chunk / "0"
    return b""


def _resign_arrays(store: Path, entry: dict) -> None:
    arrays = entry.get("arrays")
    if not isinstance(arrays, dict):
        return
    for name, desc in arrays.items():
        if isinstance(desc, dict):
            desc["crc32c"] = M.crc32c(_chunk(store, entry, name))


def examine(store: Path) -> str:
    """'refused' (a QmoeError from open or decode, or problems from verify) or 'accepted';
    any other exception propagates: it is a crash."""
    import qmoefmt
    from ..errors import QmoeError
    from ..store.verify import verify
    try:
        st = qmoefmt.open(store)
        for t in st.tensors():
            t.decode()
    except QmoeError:
        return "refused"
    return "refused" if verify(store, deep=True) else "accepted"


class Worker:
    """A child process that examines mutants one at a time, under an address-space limit
    (`memory` bytes above what it uses once warmed up) and a per-mutant deadline."""

    def __init__(self, memory: int, deadline: float):
        self.memory, self.deadline = memory, deadline
        self.proc = None

    def _start(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qmoefmt.testing.fuzz_worker", str(self.memory)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self, store: Path, pack_target: str | None = None) -> str:
        """'refused', 'accepted', 'crash: ...', 'memory', or 'hang'. With `pack_target`,
        `store` is a checkpoint to pack with that target's options (fuzz_checkpoint)."""
        if self.proc is None:
            self._start()
        self.proc.stdin.write(f"{store}\n" if pack_target is None else
                              f"{pack_target}\t{store}\n")
        self.proc.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        ready = sel.select(self.deadline)
        sel.close()
        if not ready:
            self.close()
            return "hang"
        line = self.proc.stdout.readline().strip()
        if not line:                 # died: a signal (a segfault) or the memory limit
            code = self.proc.wait()
            self.proc = None
            return f"crash: worker exited {code}"
        return line

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def mutant(base: Path, m: Mutation, into: Path) -> Path:
    """A fresh copy of `base` with `m` applied, at `into`."""
    shutil.rmtree(into, ignore_errors=True)
    shutil.copytree(base, into)
    apply(into, m)
    return into
