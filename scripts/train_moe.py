"""Train the tiny Switch MoE LM fixture (fixtures/moe-tiny/model.safetensors).

Deterministic for a given CPython (the corpus is its documentation), torch
version and thread count: fixed seeds, deterministic algorithms, a fixed number
of threads.  Took 2980 s (50 minutes) on 2 CPU cores (the file's `train_seconds`).

Trains in float32 and writes the weights in bfloat16, as real MoE checkpoints ship
(each float32 weight rounded to nearest even; loading upcasts them exactly, so the
model still computes in float32). The header records both: `train_loss` and
`heldout_loss` are those of the bfloat16 weights as written, `fp32_train_loss` and
`fp32_heldout_loss` those of the float32 weights training ended with.

    python scripts/train_moe.py [--steps 3000] [--threads 2]
    python scripts/train_moe.py --rounded-from FP32.safetensors [--out OUT]

`--rounded-from` skips training: it writes a float32 checkpoint this script wrote
before (the committed file until 2026-12-02, git show
f8284c9:fixtures/moe-tiny/model.safetensors) as the bfloat16 one training would write,
its metadata kept and the losses measured as above. That is how the committed file was
made; by the determinism above, training with the defaults gives the same weights (not
re-checked by training again).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qmoefmt.demo import textdata
from qmoefmt.demo.model import (MoEConfig, SwitchMoELM, heldout_loss, load_model, read_metadata,
                                round_weights, save_model, token_windows)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "fixtures" / "moe-tiny" / "model.safetensors"
SAVED_DTYPE = torch.bfloat16


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def expert_token_counts(model: SwitchMoELM, windows: torch.Tensor) -> np.ndarray:
    """Tokens routed to each expert [layers, experts] over ``windows``."""
    counts = np.zeros((model.config.n_layers, model.config.n_experts), dtype=np.int64)
    hooks = []
    for i, block in enumerate(model.blocks):
        for j, expert in enumerate(block.mlp.experts.values()):

            def count(_module, inputs, _output, i=i, j=j):
                counts[i, j] += inputs[0].shape[0]

            hooks.append(expert.register_forward_hook(count))
    with torch.no_grad():
        for start in range(0, len(windows), 32):
            model(windows[start : start + 32, :-1])
    for h in hooks:
        h.remove()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rounded-from", type=Path, metavar="FP32",
                        help="no training: write this float32 checkpoint of this script in bfloat16")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    train = textdata.train_tokens()
    heldout = textdata.heldout_tokens()
    print(f"corpus: {len(train)} train bytes, {len(heldout)} held-out bytes", flush=True)
    # A fixed slice of the train split, for a train loss comparable with the held-out one.
    train_eval = train[: len(heldout)]
    if args.rounded_from:
        metadata = read_metadata(args.rounded_from)
        if metadata.get("dtype", "float32") != "float32" or metadata["threads"] != str(args.threads):
            sys.exit(f"{args.rounded_from}: not a float32 checkpoint trained with --threads {args.threads}")
        model = load_model(args.rounded_from)
        fp32 = (float(metadata["train_loss"]), float(metadata["heldout_loss"]))
        write(model, args.out, metadata, fp32, train_eval, heldout)
        return

    config = MoEConfig()
    model = SwitchMoELM(config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    train_t = torch.from_numpy(train.astype(np.int64))
    offsets = torch.arange(config.context + 1)
    generator = torch.Generator().manual_seed(args.seed)

    start = time.perf_counter()
    running = []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, len(train_t) - config.context - 1, (args.batch,), generator=generator)
        batch = train_t[starts[:, None] + offsets]
        model.train()
        ce, aux = model.loss(batch)
        (ce + config.aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(ce.item())
        if (step + 1) % 100 == 0:
            elapsed = time.perf_counter() - start
            print(
                f"step {step + 1:5d}  train ce {np.mean(running[-100:]):.4f}  aux {aux.item():.3f}"
                f"  {elapsed:.0f}s",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            model.eval()
            print(f"  held-out loss {heldout_loss(model, heldout):.4f}", flush=True)

    seconds = time.perf_counter() - start
    model.eval()
    train_loss = heldout_loss(model, train_eval)
    held_loss = heldout_loss(model, heldout)
    print(f"trained {args.steps} steps in {seconds:.0f}s")
    metadata = {
        "train_loss": f"{train_loss:.6f}",
        "heldout_loss": f"{held_loss:.6f}",
        "steps": str(args.steps),
        "train_seconds": f"{seconds:.0f}",
        "threads": str(args.threads),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "train_fingerprint": textdata.fingerprint(train),
        "heldout_fingerprint": textdata.fingerprint(heldout),
        "command": " ".join(["scripts/train_moe.py", *sys.argv[1:]]),
    }
    write(model, args.out, metadata, (train_loss, held_loss), train_eval, heldout)


def write(model: SwitchMoELM, out: Path, metadata: dict[str, str], fp32: tuple[float, float],
          train_eval: np.ndarray, heldout: np.ndarray) -> None:
    """`model` (float32, eval mode) rounded to SAVED_DTYPE and written to `out`, with
    `metadata` whose losses (`fp32`: train, held-out, of the float32 weights) become the
    fp32_* members and are measured again on the rounded weights."""
    model.eval()
    round_weights(model, SAVED_DTYPE)
    train_loss = heldout_loss(model, train_eval)
    held_loss = heldout_loss(model, heldout)
    counts = expert_token_counts(model, token_windows(heldout, model.config.context))
    print(f"float32: train loss {fp32[0]:.4f}  held-out loss {fp32[1]:.4f}")
    print(f"{SAVED_DTYPE}: train loss {train_loss:.4f} (first {len(train_eval)} train bytes)  "
          f"held-out loss {held_loss:.4f}")
    print("held-out tokens per expert (layer x expert):")
    print(counts)
    metadata = {**metadata, "train_loss": f"{train_loss:.6f}", "heldout_loss": f"{held_loss:.6f}",
                "fp32_train_loss": f"{fp32[0]:.6f}", "fp32_heldout_loss": f"{fp32[1]:.6f}"}
    metadata.pop("dtype", None)          # save_model writes it
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out, metadata, dtype=SAVED_DTYPE)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {SAVED_DTYPE})")


if __name__ == "__main__":
    main()
