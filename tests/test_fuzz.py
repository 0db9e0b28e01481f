"""The fault suite's fuzzer, bounded in time for CI (issue 10): the committed seed corpus
(mutations that once got through, or near enough), then random mutants of small stores of
every codec for the rest of the budget, and mutated checkpoints packed for a third of it
(~60 s in all). No mutant may crash, hang or exceed the memory bound, and no plain byte
change of a store may be accepted; re-signed edits may be accepted (a re-signed store can
be a valid store), and a checkpoint mutant may pack (safetensors has no checksum) into a
store that deep-verifies. scripts/fault_campaign.py runs the same at scale."""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from qmoefmt.testing import fuzz, fuzz_checkpoint
from qmoefmt.testing.fuzz_targets import checkpoint, make_targets

CORPUS = Path(__file__).parent / "fuzz_corpus.jsonl"
BUDGET = float(os.environ.get("QMOEFMT_FUZZ_SECONDS", "45"))


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    return make_targets(tmp_path_factory.mktemp("fuzz-targets"))


@pytest.fixture(scope="module")
def worker():
    w = fuzz.Worker(memory=2**30, deadline=60)
    yield w
    w.close()


def outcome_ok(m: fuzz.Mutation, result: str) -> bool:
    return result == "refused" or (result == "accepted" and m.kind not in fuzz.PLAIN)


def corpus() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("entry", corpus(), ids=lambda e: e.get("why", "")[:40])
def test_seed_corpus(entry, targets, worker, tmp_path):
    m = fuzz.Mutation(**entry["mutation"])
    result = worker.run(fuzz.mutant(targets[entry["target"]], m, tmp_path / "m"))
    assert outcome_ok(m, result), (entry, result)
    if "expect" in entry:
        assert result == entry["expect"], (entry, result)


def test_random_mutants(targets, worker, tmp_path):
    rng = random.Random(20261202)
    bad, tried, t0 = [], 0, time.perf_counter()
    while time.perf_counter() - t0 < BUDGET:
        name = rng.choice(sorted(targets))
        m = fuzz.random_mutation(targets[name], rng)
        result = worker.run(fuzz.mutant(targets[name], m, tmp_path / "m"))
        tried += 1
        if not outcome_ok(m, result):
            bad.append((name, m.as_json(), result))
    assert tried >= 20 and bad == [], f"{len(bad)} of {tried}: {bad[:5]}"


def test_random_checkpoint_mutants(worker, tmp_path):
    # a third of the store budget: each checkpoint mutant is packed, ~0.25 s
    (tmp_path / "src").mkdir()
    base = checkpoint(tmp_path / "src" / "model.safetensors")
    rng = random.Random(20261203)
    bad, tried, t0 = [], 0, time.perf_counter()
    while time.perf_counter() - t0 < BUDGET / 3:
        m = fuzz_checkpoint.random_mutation(base, rng)
        result = worker.run(fuzz_checkpoint.mutant(base, m, tmp_path / "m"),
                            fuzz_checkpoint.target_of(m))
        tried += 1
        if result not in ("refused", "accepted"):
            bad.append((m.as_json(), result))
    assert tried >= 3 and bad == [], f"{len(bad)} of {tried}: {bad[:5]}"


def test_the_targets_are_sound(targets):
    for store in targets.values():
        assert fuzz.examine(store) == "accepted"
