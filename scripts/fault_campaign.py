"""The fault campaign: mutants of small stores (plain and re-signed, qmoefmt.testing.fuzz),
mutated checkpoints packed (qmoefmt.testing.fuzz_checkpoint), and packs killed at random
writes then resumed (qmoefmt.testing.kill). Prints the table the hardening issue asks for;
findings go to a JSONL file, ready for the seed corpus.

    python scripts/fault_campaign.py --mutants 20000 --checkpoints 2000 --kills 100 [--seed 0] [--json]

Everything but 'refused', 're-signed accepted' (a re-signed edit that is itself a valid
store) and the checkpoints refused or packed (safetensors has no checksum: a changed
byte packs as other weights) must be 0."""
from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmoefmt.testing import fuzz, fuzz_checkpoint, kill  # noqa: E402
from qmoefmt.testing.fuzz_targets import checkpoint, make_targets  # noqa: E402
from qmoefmt.testing.trees import files_of  # noqa: E402

ROWS = ["tried", "refused", "re-signed accepted", "checkpoints tried", "checkpoints refused",
        "checkpoints packed", "crash", "hang", "over the memory bound",
        "silent (a plain change accepted)", "not built (harness error)", "kills",
        "resumes failed", "data lost"]


def mutants(targets: dict, n: int, rng: random.Random, work: Path, findings, progress):
    counts = collections.Counter()
    worker = fuzz.Worker(memory=2**30, deadline=30)
    try:
        for i in range(n):
            name = rng.choice(sorted(targets))
            m = fuzz.random_mutation(targets[name], rng)
            try:
                store = fuzz.mutant(targets[name], m, work / "mutant")
            except Exception as e:  # noqa: BLE001 - the harness's own bug: count it, go on
                counts["not built (harness error)"] += 1
                findings.write(json.dumps({"target": name, "mutation": json.loads(m.as_json()),
                                           "harness": f"{type(e).__name__}: {e}"}) + "\n")
                continue
            result = worker.run(store)
            counts["tried"] += 1
            row = _row(m, result)
            counts[row] += 1
            if row not in ("refused", "re-signed accepted"):
                findings.write(json.dumps({"target": name, "mutation": json.loads(m.as_json()),
                                           "result": result}) + "\n")
                findings.flush()
            progress(i + 1, n, counts)
    finally:
        worker.close()
    return counts


def checkpoint_mutants(n: int, rng: random.Random, work: Path, findings, progress):
    """Mutated checkpoints, each packed (fuzz_checkpoint): refused or packed into a store
    that deep-verifies; a crash, hang or runaway allocation is a finding."""
    counts = collections.Counter()
    (work / "ckpt-src").mkdir()
    base = checkpoint(work / "ckpt-src" / "model.safetensors")
    worker = fuzz.Worker(memory=2**30, deadline=60)
    try:
        for i in range(n):
            m = fuzz_checkpoint.random_mutation(base, rng)
            target = fuzz_checkpoint.target_of(m)
            result = worker.run(fuzz_checkpoint.mutant(base, m, work / "ckpt-mutant"), target)
            counts["checkpoints tried"] += 1
            row = {"refused": "checkpoints refused", "accepted": "checkpoints packed",
                   "memory": "over the memory bound", "hang": "hang"}.get(result, "crash")
            counts[row] += 1
            if row in ("crash", "hang", "over the memory bound"):
                findings.write(json.dumps({"checkpoint": json.loads(m.as_json()),
                                           "target": target, "result": result}) + "\n")
                findings.flush()
            progress(i + 1, n, counts)
    finally:
        worker.close()
    return counts


def _row(m: fuzz.Mutation, result: str) -> str:
    if result == "refused":
        return "refused"
    if result == "accepted":
        return "silent (a plain change accepted)" if m.kind in fuzz.PLAIN else \
            "re-signed accepted"
    if result == "memory":
        return "over the memory bound"
    return "hang" if result == "hang" else "crash"


def kills(n: int, rng: random.Random, work: Path, findings) -> collections.Counter:
    from qmoefmt.pack import PackOptions, pack
    (work / "kill-src").mkdir()
    ckpt = checkpoint(work / "kill-src" / "model.safetensors")
    options = {"experts": ["experts.*"], "dictionary": "qmoe-2023"}
    writes = kill.counted_writes(ckpt, work / "kill-ref", options)
    want = files_of(work / "kill-ref")
    counts = collections.Counter()
    for i in range(n):
        out = work / f"kill-{i}"
        # One kill, or a kill and then a kill of the resume.
        for _ in range(rng.choice([1, 1, 2])):
            kill.kill_at(ckpt, out, rng.randrange(len(writes)), rng.choice(kill.MODES), options)
        counts["kills"] += 1
        try:
            # A kill drawn past the last write of a resume let it finish: nothing to resume.
            if not _complete(out):
                pack(ckpt, out, PackOptions(**options), resume=out.exists())
        except Exception as e:  # noqa: BLE001 - a failed resume is the finding
            counts["resumes failed"] += 1
            findings.write(json.dumps({"kill": i, "error": repr(e)}) + "\n")
            continue
        if files_of(out) != want:
            counts["data lost"] += 1
            findings.write(json.dumps({"kill": i, "error": "resumed store differs"}) + "\n")
    return counts


def _complete(store: Path) -> bool:
    import qmoefmt
    try:
        return qmoefmt.open(store).complete
    except qmoefmt.QmoeError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", type=int, default=20000)
    ap.add_argument("--checkpoints", type=int, default=2000)
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--findings", default="fault_findings.jsonl")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t0 = time.perf_counter()

    def progress(i, n, counts):
        if i % 500 == 0 or i == n:
            print(f"{i}/{n} mutants, {time.perf_counter() - t0:.0f} s: {dict(counts)}",
                  file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp, open(args.findings, "w") as findings:
        work = Path(tmp)
        targets = make_targets(work / "targets")
        counts = mutants(targets, args.mutants, rng, work, findings, progress)
        counts.update(checkpoint_mutants(args.checkpoints, rng, work, findings, progress))
        counts.update(kills(args.kills, rng, work, findings))
    table = {row: counts.get(row, 0) for row in ROWS}
    table["seconds"] = round(time.perf_counter() - t0)
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        for row, n in table.items():
            print(f"{row:<34} {n:>8}")
    bad = sum(v for k, v in table.items()
              if k not in ("tried", "refused", "re-signed accepted", "checkpoints tried",
                           "checkpoints refused", "checkpoints packed", "kills", "seconds"))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
