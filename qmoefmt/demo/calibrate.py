"""Calibration of the bundled model on its training text (`qmoefmt calibrate`)."""
from __future__ import annotations

from collections.abc import Callable

from .._torch import require_torch
from . import bundled_model_path


def calibrate_bundled(output, *, model_path=None, tokens: int = 65536, sequential: bool = False,
                      bits: str = "ternary", group_size: int | None = None,
                      act_order: bool | None = None,
                      progress: Callable[[int], Callable[[int], None]] | None = None) -> dict:
    """Write the expert-input Hessians of the bundled model over `tokens` training tokens
    to `output`; `sequential` quantizes it layer by layer with GPTQ on the way (QMoE's
    sequential mode). `progress(total)` is called once with the number of forward batches
    and returns the callable advanced after each. Returns the summary the CLI prints."""
    torch = require_torch("qmoefmt calibrate")
    from ..pack import PackOptions
    from ..quantize.collector import HessianCollector
    from ..selection import ExpertSelector
    from .model import load_model, token_windows
    from .textdata import train_tokens

    if sequential:
        # Fail on bad settings before minutes of calibration, with pack's own messages.
        PackOptions(preset="switch", method="gptq", bits=bits, group_size=group_size,
                    calibration=str(output), act_order=act_order).validate()
    model = load_model(model_path or bundled_model_path()).eval()
    ctx = model.config.context
    windows = token_windows(train_tokens(), ctx)[:, :-1]
    windows = windows[: max(1, -(-tokens // ctx))]
    batches = torch.split(windows, 16)
    selector = ExpertSelector(preset="switch")
    if sequential:
        from ..quantize.sequential import expert_layers, sequential_calibrate, sublayer_key
        passes = len(expert_layers(model, selector, sublayer_key))
        step = (progress or _silent)(passes * len(batches))

        def run(m):
            for b in batches:
                m(b)
                step(1)
        c = sequential_calibrate(model, run, selector, bits=bits, group_size=group_size,
                                 act_order=act_order)
        c.save(output)
    else:
        step = (progress or _silent)(len(batches))
        with HessianCollector(model, selector) as c, torch.no_grad():
            for b in batches:
                model(b)
                step(1)
            c.save(output)
    summary = {"output": str(output), "experts": len(c.tokens), "tokens": int(windows.numel()),
               "experts_without_tokens": sorted(n for n, k in c.tokens.items() if k == 0)}
    if sequential:
        st = list(c.status.values())
        summary.update(sequential=c.settings, layers=[key for key, _ in c.layers],
                       status={s: st.count(s) for s in sorted(set(st))},
                       calibration_seconds=c.calibration_seconds,
                       quantization_seconds=c.quantization_seconds)
    return summary


def _silent(total: int) -> Callable[[int], None]:
    return lambda n: None
