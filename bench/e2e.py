"""End to end: tokens/s of the bundled model run from its store (expert linears multiplied
from their codes: a ternary store, a 2-bit store as `--kbit-codec auto` packs it (since
format 1.4's compact dictionaries: uint-dict16) and a 2-bit uint-packed one) against the same model
dense (every weight dequantized from that store into plain fp32 nn.Linear), in the same
process at the same thread count. Greedy generation with a key/value cache
(qmoefmt.demo.generate): the prefill is one forward pass over the prompt, the decode one
cached step a token, i.e. the batch-1 expert matmul.

The stores are packed into a temporary directory by the README's command, round to
nearest (`qmoefmt pack fixtures/moe-tiny/model.safetensors S --preset switch [--bits 2]`;
GPTQ gives other weights but the same shapes and codecs, so the same speed), unless
--ternary / --two-bit name stores. Rates are medians over --reps generations, the
compressed and dense models taking turns; ratio = compressed / dense (> 1: ours is
faster). Run on an otherwise idle machine.

    python bench/e2e.py [--quick] [--threads 1 2] [--reps 5] [--prompt-bytes 128]
        [--tokens 64] [--ternary STORE] [--two-bit STORE]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numba
import torch

import qmoefmt
from qmoefmt.demo import bundled_model_path
from qmoefmt.demo.generate import (compressed_model, dequantized_model, greedy, set_threads,
                                   warm_up)
from qmoefmt.demo.textdata import decode, heldout_tokens

QMOEFMT = Path(sys.executable).parent / "qmoefmt"
KINDS = {"ternary": [], "2-bit": ["--bits", "2"],
         "2-bit packed": ["--bits", "2", "--kbit-codec", "packed"]}   # auto picks dict16 here


def pack_store(tmp: Path, kind: str) -> Path:
    """The README's pack command, RTN."""
    out = tmp / f"moe-tiny-{kind}.qmoe"
    subprocess.run([str(QMOEFMT), "pack", str(bundled_model_path()), str(out),
                    "--preset", "switch", *KINDS[kind]], check=True, stdout=subprocess.DEVNULL)
    return out


def rates(models: dict, prompt: str, tokens: int, reps: int) -> tuple[dict, bool]:
    """name -> (median prefill tok/s, median decode tok/s), the models taking turns so a
    busy spell of the machine falls on all of them; and whether they generated the same
    bytes (greedy on logits equal within fp32 rounding: they should)."""
    runs = {name: [] for name in models}
    for _ in range(reps):
        for name, model in models.items():
            runs[name].append(greedy(model, prompt, tokens))
    same = len({tuple(g.tokens) for gs in runs.values() for g in gs}) == 1
    return {name: (statistics.median(g.prefill_tokens_per_s for g in gs),
                   statistics.median(g.decode_tokens_per_s for g in gs))
            for name, gs in runs.items()}, same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 reps of 32 tokens")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompt-bytes", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--ternary", type=Path, help="a ternary store of the bundled model")
    ap.add_argument("--two-bit", type=Path, help="a 2-bit store of the bundled model")
    args = ap.parse_args()
    reps, tokens = (3, 32) if args.quick else (args.reps, args.tokens)
    # The held-out split's first bytes (plain ASCII): text the model did not train on.
    prompt = decode(heldout_tokens()[:args.prompt_bytes])
    given = {"ternary": args.ternary, "2-bit": args.two_bit, "2-bit packed": None}
    print(f"numba {numba.__version__}, torch {torch.__version__}; prompt {args.prompt_bytes} "
          f"bytes (+1 separator), {tokens} tokens generated, median of {reps}")
    print(f"{'store':>12} {'thr':>3} | {'prefill tok/s: store':>20} {'dense':>7} {'ratio':>6} | "
          f"{'decode tok/s: store':>19} {'dense':>7} {'ratio':>6} | same text")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            store = qmoefmt.open(given[kind] or pack_store(Path(tmp), kind))
            models = {"store": compressed_model(store), "dense": dequantized_model(store)}
            for threads in args.threads:
                set_threads(threads)
                for model in models.values():
                    warm_up(model)
                r, same = rates(models, prompt, tokens, reps)
                (ps, ds), (pd, dd) = r["store"], r["dense"]
                print(f"{kind:>12} {threads:>3} | {ps:>20.0f} {pd:>7.0f} {ps / pd:>6.2f} | "
                      f"{ds:>19.0f} {dd:>7.0f} {ds / dd:>6.2f} | {'yes' if same else 'NO'}",
                      flush=True)


if __name__ == "__main__":
    main()
