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
from ..errors import QmoeError
from ..format.records import check_shape
from ..format.source import check_metadata, lowest_version
from ..io.attachments import source_attachments
from ..io.checkpoint import safetensors_metadata
from ..selection import ExpertSelector
from .options import PackError, PackOptions

# GPTQ batches of same-shape experts (QMoE quantizes a layer's experts as one 3-D batch).
# The cap bounds the batch's float32 weights and Hessians.
GPTQ_BATCH_BYTES = 256 << 20
GPTQ_BATCH_MAX = 64
GPTQ_BATCH_WINDOW = 256


def is_expert(selector: ExpertSelector, name: str, shape, dtype: str) -> bool:
    return selector(name) and skip_reason(shape, dtype) is None


QUANTIZABLE = "float tensors of 2 or more dimensions are quantized"


def skip_reason(shape, dtype: str) -> str | None:
    """Why a tensor whose name is selected still stays dense, or None if it is quantized."""
    if len(shape) < 2:
        return f"{len(shape)}-D"
    if dtype not in C.FLOAT_DTYPES:
        return f"dtype {dtype}"
    return None


def describe_selection(options: PackOptions) -> str:
    """The options that select experts, as the user typed them."""
    parts = [f"--preset {options.preset}"] if options.preset else []
    return " ".join(parts + [f"--experts {g!r}" for g in options.experts])


def _listed(items: list[str], at_most: int = 5) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > at_most else ""
    return ", ".join(items[:at_most]) + more


def select_experts(sources, input_path, options: PackOptions) -> tuple[list[bool], list]:
    """Which sources are quantized as experts, and the (name, reason) of those selected by
    name but kept dense. Selecting none is an error, raised before the store exists: a
    store of dense tensors alone is never what `pack` was asked for (a preset for another
    architecture, a mistyped glob)."""
    selector = ExpertSelector(options.experts, options.preset)
    experts, skipped = [], []
    for s in sources:
        why = skip_reason(s.shape, s.dtype) if selector(s.name) else None
        experts.append(selector(s.name) and why is None)
        if why is not None:
            skipped.append((s.name, why))
    if any(experts):
        return experts, skipped
    where = f"{input_path}: {describe_selection(options)} selects no expert tensor"
    if skipped:
        raise PackError(f"{where}: the {len(skipped)} tensors it matches stay dense ("
                        + _listed([f"{n}: {why}" for n, why in skipped]) + "); only "
                        + QUANTIZABLE)
    # Tensors a user would call experts, to show what the globs should have matched.
    alike = [s.name for s in sources if "expert" in s.name.lower()]
    raise PackError(f"{where}; " + (f"tensors named like experts: {_listed(alike)}" if alike
                                    else "no tensor name contains 'expert'")
                    + "; give --experts GLOB or another --preset")


def check_limits(sources, input_path) -> None:
    """The reader's limits (spec §9), enforced before anything is written: else the pack
    would complete a store that every reader, qmoefmt's own included, refuses."""
    if len(sources) > C.MAX_TENSORS:
        raise PackError(f"{input_path}: {len(sources)} tensors, a store holds at most "
                        f"{C.MAX_TENSORS}")
    for s in sources:
        size = len(s.name.encode("utf-8", "surrogatepass"))
        if size > C.MAX_NAME_BYTES:
            raise PackError(f"{input_path}: tensor {s.name[:60]!r}...: a name of {size} bytes; "
                            f"a store allows {C.MAX_NAME_BYTES} (spec §9)")
        try:
            check_shape(list(s.shape), f"{input_path}: tensor {s.name!r}", "shape")
        except QmoeError as e:
            raise PackError(str(e)) from None


@dataclass
class Plan:
    sources: list             # the checkpoint's TensorSources, in order
    paths: list[str]          # their node paths
    experts: list[bool]       # quantized as experts
    params_left: list[int]    # expert weights from each tensor to the end (what a new
                              # dictionary would serve)
    meta: dict                # the root's metadata
    skipped: list             # (name, reason) of tensors selected by name but kept dense

    @classmethod
    def make(cls, ckpt, input_path, options: PackOptions) -> "Plan":
        sources = list(ckpt.tensors())
        check_limits(sources, input_path)
        experts, skipped = select_experts(sources, input_path, options)
        left = np.cumsum([math.prod(s.shape) if e else 0
                          for s, e in zip(sources, experts)][::-1])[::-1]
        digest = hashlib.sha256(M.dumps(
            [[s.name, list(s.shape), s.dtype] for s in sources])).hexdigest()
        attachments = source_attachments(input_path)
        meta = {
            "writer": {"name": "qmoefmt", "version": __version__},
            "pack": recorded_options(options),
            "plan": {"tensors": len(sources), "sha256": digest},
            "source": source_member(ckpt, input_path),
        }
        if attachments:     # absent, not empty: a store without any keeps its pre-1.3 bytes
            meta["attachments"] = attachments
        # what the incomplete root declares: the newest version the pack may need, 1.5
        # where it may write bfloat16 bits (coded tensors' scales, bf16 dense data, §4.5)
        may_need = options.format_version
        if any(experts) or any(s.dtype == "bfloat16" for s in sources):
            may_need = max(may_need, C.LOGICAL_DTYPE_SINCE, key=C.version_tuple)
        meta["format_version"] = lowest_version(may_need, meta)
        return cls(sources, M.tensor_paths([s.name for s in sources]), experts,
                   [int(n) for n in left], meta, skipped)


def source_member(ckpt, input_path) -> dict:
    """The root's `source`: its format, file name and, where it has one, the safetensors
    `__metadata__` that `unpack` writes back (absent, not empty, where there is none)."""
    source = {"format": ckpt.format, "name": os.path.basename(os.path.normpath(input_path))}
    metadata = safetensors_metadata(input_path) if ckpt.format == "safetensors" else None
    if metadata is not None:
        source["metadata"] = check_metadata(metadata, os.fspath(input_path))
    return source


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


# The reason GPTQ records for an expert the calibration file does not name.
NO_CALIBRATION = "rtn-no-calibration"


def known_fallbacks(plan: Plan, calibration) -> list[tuple[str, str]]:
    """The (expert, reason) that GPTQ will round to nearest, as far as the calibration file
    tells before any work: experts it lacks, and experts it counts no tokens for (a fused
    tensor's expert e as NAME[e]). A Cholesky failure shows only when GPTQ runs."""
    from ..quantize.gptq import STATUS_NO_TOKENS
    out = []
    for src, expert in zip(plan.sources, plan.experts):
        if not expert:
            continue
        if src.name not in calibration:
            out.append((src.name, NO_CALIBRATION))
            continue
        count = calibration.tokens[src.name]
        if isinstance(count, list):
            out += [(f"{src.name}[{e}]", STATUS_NO_TOKENS) for e, c in enumerate(count) if c == 0]
        elif count == 0:
            out.append((src.name, STATUS_NO_TOKENS))
    return out
