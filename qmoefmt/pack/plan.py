"""A pack's plan: what every tensor of the checkpoint becomes, fixed before any work, so
that the output is a function of the input and the options alone (resume reproduces it)."""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from .._version import __version__
from ..format import constants as C
from ..format import metadata as M
from ..format.attachments import lowest_version
from ..io.attachments import source_attachments
from ..selection import ExpertSelector
from .options import PackOptions

# GPTQ batches of same-shape experts (QMoE quantizes a layer's experts as one 3-D batch).
# The cap bounds the batch's float32 weights and Hessians.
GPTQ_BATCH_BYTES = 256 << 20
GPTQ_BATCH_MAX = 64
GPTQ_BATCH_WINDOW = 256


def is_expert(selector: ExpertSelector, name: str, shape, dtype: str) -> bool:
    return selector(name) and len(shape) >= 2 and dtype in C.FLOAT_DTYPES


@dataclass
class Plan:
    sources: list             # the checkpoint's TensorSources, in order
    paths: list[str]          # their node paths
    experts: list[bool]       # quantized as experts
    params_left: list[int]    # expert weights from each tensor to the end (what a new
                              # dictionary would serve)
    meta: dict                # the root's metadata

    @classmethod
    def make(cls, ckpt, input_path, options: PackOptions) -> "Plan":
        sources = list(ckpt.tensors())
        selector = ExpertSelector(options.experts, options.preset)
        experts = [is_expert(selector, s.name, s.shape, s.dtype) for s in sources]
        left = np.cumsum([math.prod(s.shape) if e else 0
                          for s, e in zip(sources, experts)][::-1])[::-1]
        digest = hashlib.sha256(M.dumps(
            [[s.name, list(s.shape), s.dtype] for s in sources])).hexdigest()
        attachments = source_attachments(input_path)
        meta = {
            "format_version": lowest_version(options.format_version, attachments),
            "writer": {"name": "qmoefmt", "version": __version__},
            "pack": recorded_options(options),
            "plan": {"tensors": len(sources), "sha256": digest},
            "source": {"format": ckpt.format, "name": os.path.basename(os.path.normpath(input_path))},
        }
        if attachments:     # absent, not empty: a store without any keeps its pre-1.3 bytes
            meta["attachments"] = attachments
        return cls(sources, M.tensor_paths([s.name for s in sources]), experts,
                   [int(n) for n in left], meta)


def recorded_options(options: PackOptions) -> dict:
    """The options as the root records them; a calibration file by name and content, so
    the same inputs give the same store wherever the file lies."""
    meta = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()}
    if options.calibration is not None:
        h = hashlib.sha256()
        with open(options.calibration, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        meta["calibration"] = {"name": os.path.basename(options.calibration), "sha256": h.hexdigest()}
    return meta


def gptq_batches(sources, experts, todo, calibration) -> dict[int, list[int]]:
    """First index of each batch -> its indices: 2-D experts of one shape still to do,
    within a window of tensors (a checkpoint interleaves a layer's wi and wo); fused 3-D
    experts are a batch by themselves. Members are held from the first one's turn to
    their own, so the window and the byte cap bound memory."""
    batches, open_ = {}, {}
    for i in todo:
        src = sources[i]
        if not (experts[i] and len(src.shape) == 2
                and not isinstance(calibration.tokens.get(src.name), list)):
            continue
        rows, cols = src.shape
        key = (tuple(src.shape), src.dtype)
        run = open_.get(key)
        if run and ((len(run) + 1) * 4 * (rows * cols + cols * cols) > GPTQ_BATCH_BYTES
                    or len(run) >= GPTQ_BATCH_MAX or i - run[0] >= GPTQ_BATCH_WINDOW):
            run = None
        if run is None:
            run = open_[key] = []
            batches[i] = run
        run.append(i)
    return {i: run for i, run in batches.items() if len(run) > 1}
