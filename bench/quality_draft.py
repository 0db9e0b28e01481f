"""First quality measurement: held-out loss of the tiny MoE fixture after quantizing
all experts with RTN and GPTQ (ternary, 2/3/4-bit), and layer-wise output errors.

Hessians come from forward hooks on the expert linears over calibration windows of
the TRAIN split (float32 accumulation, tokens counted per expert).  GPTQ runs
sequentially layer by layer as in QMoE: layer l's Hessians are collected from the
model whose layers < l are already quantized (``--parallel`` uses the dense model's
Hessians for every layer instead).

Layer-wise error ||(W-Q)X|| / ||WX|| is measured with the dense model's inputs X,
on the calibration tokens and on the held-out split, for experts with >= 64 tokens.

    python bench/quality_draft.py [--calib-windows 256] [--damp 0.1] [--act-order]
        [--parallel] [--seed 0] [--methods ternary int2 ...] [--threads 2]

Takes about 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from qmoefmt import gptq, textdata
from qmoefmt import quantizers as qz
from qmoefmt.moe_model import SwitchMoELM, heldout_loss, load_model, read_metadata, token_windows

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "fixtures" / "moe-tiny" / "model.safetensors"
KINDS = ("wi", "wo")
MIN_TOKENS = 64

# name -> (grid, group_size); grid is "ternary" or a bit width.
METHODS = {
    "ternary": ("ternary", None),
    "int2": (2, None),
    "int2-g128": (2, 128),
    "int3": (3, None),
    "int4": (4, None),
}


def experts_of(model: SwitchMoELM, layer: int):
    return list(model.blocks[layer].mlp.experts.values())


def expert_weights(model: SwitchMoELM, layer: int, kind: str) -> torch.Tensor:
    return torch.stack([getattr(e, kind).weight.detach() for e in experts_of(model, layer)])


def set_expert_weights(model: SwitchMoELM, layer: int, kind: str, W: torch.Tensor) -> None:
    for e, w in zip(experts_of(model, layer), W):
        getattr(e, kind).weight.data.copy_(w)


@torch.no_grad()
def collect_hessians(model: SwitchMoELM, windows: torch.Tensor, layers: list[int]):
    """{(layer, kind): (H [E, cols, cols] float32, tokens [E])} over ``windows``."""
    stats = {}
    hooks = []
    for layer in layers:
        for kind in KINDS:
            E = model.config.n_experts
            cols = model.config.d_model if kind == "wi" else model.config.d_ff
            H = torch.zeros(E, cols, cols)
            count = torch.zeros(E, dtype=torch.long)
            stats[layer, kind] = (H, count)
            for j, expert in enumerate(experts_of(model, layer)):

                def hook(_module, inputs, _output, H=H, count=count, j=j):
                    x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                    H[j] += x.T @ x
                    count[j] += x.shape[0]

                hooks.append(getattr(expert, kind).register_forward_hook(hook))
    for start in range(0, len(windows), 32):
        model(windows[start : start + 32, :-1])
    for h in hooks:
        h.remove()
    return stats


def rtn(W: torch.Tensor, grid, group_size) -> torch.Tensor:
    if grid == "ternary":
        return qz.ternary_dequant(*qz.ternary_rtn(W))
    return qz.kbit_dequant(*qz.kbit_rtn(W, grid, group_size), group_size)


def run_gptq(W: torch.Tensor, H: torch.Tensor, grid, group_size, options: dict) -> gptq.GPTQResult:
    if grid == "ternary":
        return gptq.gptq_ternary(W, H, **options)
    return gptq.gptq_kbit(W, H, grid, group_size, **options)


def quantize_rtn(dense: SwitchMoELM, grid, group_size) -> SwitchMoELM:
    model = copy.deepcopy(dense)
    for layer in range(model.config.n_layers):
        for kind in KINDS:
            set_expert_weights(model, layer, kind, rtn(expert_weights(model, layer, kind), grid, group_size))
    return model


def quantize_gptq(dense, calib, grid, group_size, options, sequential, dense_stats):
    model = copy.deepcopy(dense)
    statuses = []
    for layer in range(model.config.n_layers):
        stats = collect_hessians(model, calib, [layer]) if sequential else dense_stats
        for kind in KINDS:
            result = run_gptq(expert_weights(model, layer, kind), stats[layer, kind][0], grid, group_size, options)
            set_expert_weights(model, layer, kind, result.dequantized)
            statuses += result.status
    return model, statuses


def layer_errors(dense: SwitchMoELM, quant: SwitchMoELM, stats) -> np.ndarray:
    """||(W-Q)X|| / ||WX|| per (layer, kind, expert) with >= MIN_TOKENS tokens, via
    ||AX||^2 = tr(A H A^T) with the dense model's H = X^T X; NaN for rarer experts."""
    errors = np.full((dense.config.n_layers, len(KINDS), dense.config.n_experts), np.nan)
    for layer in range(dense.config.n_layers):
        for k, kind in enumerate(KINDS):
            H, count = stats[layer, kind]
            W = expert_weights(dense, layer, kind).double()
            D = W - expert_weights(quant, layer, kind).double()
            H = H.double()
            num = torch.einsum("erc,ecd,erd->e", D, H, D)
            den = torch.einsum("erc,ecd,erd->e", W, H, W)
            ok = (count >= MIN_TOKENS).numpy()
            errors[layer, k, ok] = torch.sqrt(num / den).numpy()[ok]
    return errors


def ternary_zero_fraction(dense: SwitchMoELM, quant: SwitchMoELM) -> float:
    zeros = total = 0
    for layer in range(dense.config.n_layers):
        for kind in KINDS:
            Q = expert_weights(quant, layer, kind)
            zeros += int((Q == 0).sum())
            total += Q.numel()
    return zeros / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--calib-windows", type=int, default=256)
    parser.add_argument("--damp", type=float, default=0.1)
    parser.add_argument("--parallel", action="store_true", help="dense-model Hessians for every layer")
    parser.add_argument("--act-order", action="store_true", help="GPTQ columns by decreasing diag(H)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense = load_model(args.checkpoint)
    meta = read_metadata(args.checkpoint)
    context = dense.config.context
    train = textdata.train_tokens()
    heldout = textdata.heldout_tokens()
    # Random (seeded) windows of the train split: calibration never sees held-out text.
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(train) - context - 1, (args.calib_windows,), generator=g)
    calib = torch.from_numpy(train.astype(np.int64))[starts[:, None] + torch.arange(context + 1)]
    held_windows = token_windows(heldout, context)

    t0 = time.perf_counter()
    layers = list(range(dense.config.n_layers))
    calib_stats = collect_hessians(dense, calib, layers)
    held_stats = collect_hessians(dense, held_windows, layers)
    tokens = torch.stack([torch.stack([calib_stats[l, k][1] for k in KINDS]) for l in layers])[:, 0]
    print(f"checkpoint: {args.checkpoint.name}, recorded held-out loss {meta.get('heldout_loss')}")
    print(f"calibration: {args.calib_windows} train windows x {context} = {args.calib_windows * context} tokens")
    print(f"calibration tokens per expert (layer x expert):\n{tokens.numpy()}")
    print(
        f"GPTQ: damp {args.damp}, {'parallel (dense Hessians)' if args.parallel else 'sequential layer by layer'}"
        f"{', act-order' if args.act_order else ''}"
    )
    options = {"damp": args.damp, "act_order": args.act_order}

    dense_loss = heldout_loss(dense, heldout)
    print(f"\ndense held-out loss {dense_loss:.4f}\n")
    header = f"{'method':<12}{'RTN loss':>10}{'GPTQ loss':>10}{'ratio':>8}  {'err RTN/GPTQ calib':>20}  {'err RTN/GPTQ held':>19}  {'GPTQ<RTN':>9}"
    print(header)
    rows = []
    for name in args.methods:
        grid, group_size = METHODS[name]
        rtn_model = quantize_rtn(dense, grid, group_size)
        gptq_model, statuses = quantize_gptq(dense, calib, grid, group_size, options, not args.parallel, calib_stats)
        rtn_loss = heldout_loss(rtn_model, heldout)
        gptq_loss = heldout_loss(gptq_model, heldout)
        ratio = (gptq_loss - dense_loss) / (rtn_loss - dense_loss)
        err = {}
        for split, stats in (("calib", calib_stats), ("held", held_stats)):
            err[split] = (layer_errors(dense, rtn_model, stats), layer_errors(dense, gptq_model, stats))
        valid = ~np.isnan(err["calib"][0])
        wins_calib = int((err["calib"][1] < err["calib"][0])[valid].sum())
        valid_h = ~np.isnan(err["held"][0])
        wins_held = int((err["held"][1] < err["held"][0])[valid_h].sum())
        rows.append((name, ratio, wins_calib == valid.sum() and wins_held == valid_h.sum()))
        print(
            f"{name:<12}{rtn_loss:>10.4f}{gptq_loss:>10.4f}{ratio:>8.3f}"
            f"  {np.nanmean(err['calib'][0]):>9.3f}/{np.nanmean(err['calib'][1]):<9.3f}"
            f"  {np.nanmean(err['held'][0]):>8.3f}/{np.nanmean(err['held'][1]):<9.3f}"
            f"  {wins_calib}/{valid.sum()} calib, {wins_held}/{valid_h.sum()} held",
            flush=True,
        )
        if set(statuses) != {gptq.STATUS_GPTQ}:
            print(f"    statuses: { {s: statuses.count(s) for s in set(statuses)} }")
        if grid == "ternary":
            print(
                f"    zero weights: RTN {ternary_zero_fraction(dense, rtn_model):.1%},"
                f" GPTQ {ternary_zero_fraction(dense, gptq_model):.1%}"
            )
    print("\ntargets (ratio = GPTQ loss increase / RTN loss increase):")
    for name, ratio, all_better in rows:
        if name in ("ternary", "int2"):
            print(f"  {name}: ratio {ratio:.3f} <= 0.25 -> {'met' if ratio <= 0.25 else 'NOT met'}")
        verdict = "met" if all_better else "NOT met"
        print(f"  {name}: layer-wise error GPTQ < RTN on every expert with >= {MIN_TOKENS} tokens -> {verdict}")
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
