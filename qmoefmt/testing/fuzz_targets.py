"""The small valid stores the fuzzer mutates: together they hold every codec and
dictionary kind, edge shapes (one column, odd widths, all-zero rows, empty tensors, a 3-D
expert) and every dense dtype, while staying small enough to copy, decode and verify in
milliseconds."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# target -> pack options (as PackOptions keywords)
TARGETS = {
    "ternary-qmoe2023": dict(experts=("experts.*",), dictionary="qmoe-2023"),
    "ternary-golomb": dict(experts=("experts.*",)),
    "uint-packed": dict(experts=("experts.*",), bits="2", group_size=8, kbit_codec="packed"),
    "uint-dict16": dict(experts=("experts.*",), bits="2", group_size=8, kbit_codec="dict16",
                        dictionary="qmoe-2023"),
}


def checkpoint(path: Path) -> Path:
    from safetensors.numpy import save_file
    rng = np.random.default_rng(7)

    def w(*shape, p0=0.9):
        x = rng.standard_normal(shape).astype(np.float32)
        return np.where(rng.random(shape) < p0, x * 0.01, x)
    zero_rows = w(6, 20)
    zero_rows[[1, 4]] = 0
    tensors = {
        "experts.0.w": w(12, 40), "experts.1.w": w(5, 1), "experts.2.w": w(7, 33),
        "experts.3.w": zero_rows, "experts.4.w": w(0, 16), "experts.5.w": w(3, 0),
        "experts.6.w": w(2, 4, 24),
        "dense.f32": w(4, 8), "dense.f16": w(3).astype(np.float16),
        "dense.i64": rng.integers(-2**40, 2**40, 5), "dense.bool": rng.random(6) < 0.5,
        "dense.scalar": np.array(2.5, np.float32),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    (path.parent / "config.json").write_text('{"model_type": "fuzz"}\n')
    return path


def make_targets(directory: Path) -> dict[str, Path]:
    """Packs the checkpoint once per target into `directory`; returns target -> store."""
    from ..pack import PackOptions, pack
    directory.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(directory / "model.safetensors")
    out = {}
    for name, options in TARGETS.items():
        store = directory / f"{name}.qmoe"
        if not (store / "zarr.json").exists():
            pack(ckpt, store, PackOptions(**options))
        out[name] = store
    return out
