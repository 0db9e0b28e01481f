"""Does dictionary-coding 2/3/4-bit experts pay?  `qmoe.uint-packed` against
`qmoe.uint-dict16` (spec §12, §13) on the bundled model's experts (RTN and GPTQ) and on
Switch-shaped synthetic experts.

Per case: the share of levels on their zero point, the escape rate (levels >= 2 steps out),
the levels' order-0 entropy, and bits per weight of each codec's level arrays (scales and
zero points are the same in both and left out; so are dictionaries, which a store shares:
their size, and the weights it takes to repay one, are printed separately).

    python bench/kbit_codec.py [--threads 2] [--tokens 16384]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from qmoefmt.quantize import gptq
from qmoefmt.codecs import uint_dict16 as uintdict
from qmoefmt.codecs import uint_packed as uintpack
from qmoefmt.quantize import grids as qz
from qmoefmt.calibration import HessianCollector
from qmoefmt.dictionaries.stream import decode_symbols, encode
from qmoefmt.dictionaries.golomb import build_golomb, ladder_point
from qmoefmt.demo.model import load_model, token_windows
from qmoefmt.selection import ExpertSelector
from qmoefmt.demo.textdata import train_tokens

MODEL = "fixtures/moe-tiny/model.safetensors"


def entropy(levels: np.ndarray, zeros: np.ndarray, group: int) -> float:
    d = levels.astype(np.int16) - zeros[:, np.arange(levels.shape[1]) // group].astype(np.int16)
    _, n = np.unique(d, return_counts=True)
    p = n / n.sum()
    return float(-(p * np.log2(p)).sum())


def measure(cases, bits, group):
    """Sums over a list of (q, zeros) level matrices."""
    n = on_zero = esc = packed = coded = 0
    ent = 0.0
    for q, zeros in cases:
        size = group or q.shape[1]
        t, re, ec, el = uintdict.split(q, zeros, size)
        counts = np.bincount(t.reshape(-1), minlength=3)
        d = build_golomb(ladder_point(counts[0] / counts.sum()))
        codes, rc = encode(t, d)
        assert np.array_equal(decode_symbols(codes, rc, q.shape[1], d), t)
        n += q.size
        on_zero += int(counts[0])
        esc += len(ec)
        packed += q.shape[0] * uintpack.row_bytes(q.shape[1], bits)
        coded += uintdict.coded_bytes(len(codes), q.shape[0], q.shape[1], len(ec))
        ent += entropy(q, zeros, size) * q.size
    return {"on_zero": on_zero / n, "escapes": esc / n, "entropy": ent / n,
            "packed": 8 * packed / n, "dict16": 8 * coded / n}


def model_cases(bits, group, method, model, hessians):
    out = []
    for name, p in model.named_parameters():
        if name not in hessians:
            continue
        W = p.detach()
        if method == "rtn":
            q, _, zeros = qz.kbit_rtn(W, bits, group)
        else:
            r = gptq.gptq_kbit(W, hessians[name], bits, group, act_order=True)
            q, zeros = r.codes, r.zeros
        out.append((q.numpy().astype(np.uint8), zeros.numpy().astype(np.uint8)))
    return out


def synthetic_cases(bits, group, kind):
    rng = np.random.default_rng(0)
    out = []
    for shape in [(768, 3072), (3072, 768)]:
        x = rng.standard_normal(shape) if kind == "gaussian" else rng.standard_t(4, shape)
        q, _, zeros = qz.kbit_rtn(torch.from_numpy((x * 0.02).astype(np.float32)), bits, group)
        out.append((q.numpy(), zeros.numpy()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_model(MODEL).eval()
    ctx = model.config.context
    windows = token_windows(train_tokens(), ctx)[:, :-1][: max(1, args.tokens // ctx)]
    with HessianCollector(model, ExpertSelector(preset="switch")) as c, torch.no_grad():
        for b in torch.split(windows, 16):
            model(b)
    hessians = c.hessians

    print(f"{'experts':<26}{'bits':>5}{'group':>6}{'on zero':>9}{'escapes':>9}{'entropy':>9}"
          f"{'packed':>8}{'dict16':>8}{'dict16/packed':>15}{'dict16/entropy':>16}")
    rows = []
    for bits in (2, 3, 4):
        for group in (None, 128):
            sources = [("moe-tiny RTN", lambda: model_cases(bits, group, "rtn", model, hessians)),
                       ("moe-tiny GPTQ act-order", lambda: model_cases(bits, group, "gptq", model, hessians)),
                       ("Switch-shaped gaussian", lambda: synthetic_cases(bits, group, "gaussian")),
                       ("Switch-shaped student-t4", lambda: synthetic_cases(bits, group, "t"))]
            for label, make in sources:
                m = measure(make(), bits, group)
                rows.append((label, bits, group, m))
                print(f"{label:<26}{bits:>5}{group or 'row':>6}{m['on_zero']:>9.3f}{m['escapes']:>9.4f}"
                      f"{m['entropy']:>9.3f}{m['packed']:>8.3f}{m['dict16']:>8.3f}"
                      f"{m['dict16'] / m['packed']:>15.3f}{m['dict16'] / m['entropy']:>16.3f}", flush=True)
    sizes = [build_golomb(p).stored_nbytes for p in (0.6514, 0.7311, 0.7982)]
    print(f"\ndictionary size at P(0) 0.65 / 0.73 / 0.80: "
          f"{' / '.join(f'{s / 2**10:.0f}' for s in sizes)} KiB")
    gain = [1 - r[3]["dict16"] / r[3]["packed"] for r in rows if r[1] == 2 and r[2] is None]
    worst = min(gain)
    print(f"2-bit per-row grids: dict16 saves {min(gain):.1%} .. {max(gain):.1%} of the level bits; "
          f"one {max(sizes) / 2**10:.0f} KiB dictionary is repaid after "
          f"{max(sizes) * 8 / (2 * worst) / 1e6:.0f} M weights at the smallest saving")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
