"""pack: checkpoint reader -> quantizer -> codec -> store writer, one tensor at a time.

Memory is bounded by the largest tensor (plus its symbols and codes), never the model.
The output is a function of the input and the options alone: no timestamps, no
machine-dependent choices, so a resumed pack equals an uninterrupted one byte for byte.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import layout
from ._version import __version__
from .checkpoint import open_checkpoint
from .codec import encode
from . import dict_golomb as golomb
from .dict_golomb import build_golomb
from .dict_qmoe import build_qmoe2023
from .errors import QmoeError
from .selection import ExpertSelector
from .store_writer import StoreWriter, write_arrays
from .ternary import NonFiniteError, quantize_rtn

FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")


class PackError(QmoeError):
    pass


@dataclass(frozen=True)
class PackOptions:
    experts: tuple[str, ...] = ()
    preset: str | None = None
    dictionary: str = "auto"          # "auto" (golomb-v2f, fitted per tensor) | "qmoe-2023"
    method: str = "rtn"
    bits: str = "ternary"

    def validate(self) -> None:
        if self.dictionary not in ("auto", "qmoe-2023"):
            raise PackError(f"--dictionary must be auto or qmoe-2023, not {self.dictionary!r}")
        if (self.method, self.bits) != ("rtn", "ternary"):
            raise PackError(f"--method {self.method} --bits {self.bits} is not supported yet "
                            "(format 1.0 stores RTN ternary experts)")
        if not self.experts and not self.preset:
            raise PackError("no experts selected: give --experts GLOB or --preset NAME")


@dataclass
class PackSummary:
    tensors: int = 0
    expert_tensors: int = 0
    resumed_tensors: int = 0
    params: int = 0
    expert_params: int = 0
    source_bytes: int = 0
    store_bytes: int = 0
    seconds: float = 0.0
    dictionaries: list = field(default_factory=list)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.store_bytes / self.params if self.params else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(bits_per_param=self.bits_per_param,
                 ratio_vs_bf16=(16 / self.bits_per_param) if self.store_bytes else None,
                 params_per_second=self.params / self.seconds if self.seconds else None)
        return d


def is_expert(selector: ExpertSelector, name: str, shape, dtype: str) -> bool:
    return selector(name) and len(shape) >= 2 and dtype in FLOAT_DTYPES


def choose_dictionary(options: PackOptions, counts: np.ndarray, held: list[dict]):
    if options.dictionary == "qmoe-2023":
        return build_qmoe2023()
    total = int(counts.sum())
    p0 = counts[0] / total if total else 0.885
    held_p0 = [e["params"]["p_zero"] for e in held if e["kind"] == "golomb-v2f"]
    return build_golomb(golomb.choose(float(p0), held_p0))


def _as_rows(a: np.ndarray) -> np.ndarray:
    cols = a.shape[-1]
    return np.asarray(a, dtype=np.float32).reshape(-1, cols)


def _source_sha256(a: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))).hexdigest()


def pack_tensor(root: Path, path: str, name: str, a: np.ndarray, dtype: str, expert: bool,
                options: PackOptions, writer: StoreWriter) -> dict:
    """Quantize, code and write one tensor's arrays; returns its index record."""
    record = {"name": name, "path": path, "shape": list(a.shape), "dtype": dtype,
              "source_sha256": _source_sha256(a)}
    if not expert:
        data = a.view(np.uint16) if dtype == "bfloat16" else a
        record["codec"] = layout.CODEC_DENSE
        record["arrays"] = write_arrays(root, path, {
            "data": (data, layout.logical_dtype(layout.CODEC_DENSE, dtype, "data"))})
        return record
    try:
        sym, scales, counts = quantize_rtn(_as_rows(a))
    except NonFiniteError as e:
        raise PackError(f"tensor {name!r}: {e}; refusing to quantize non-finite weights") from None
    d = choose_dictionary(options, counts, list(writer.dictionaries.values()))
    codes, row_codes = encode(sym, d)
    record.update(codec=layout.CODEC_TERNARY, dictionary=writer.add_dictionary(d),
                  quantizer={"method": "rtn", "grid": "qmoe-ternary"},
                  symbol_counts=[int(c) for c in counts])
    record["arrays"] = write_arrays(root, path, {
        "codes": (codes, None),
        "row_codes": (row_codes, None),
        "scales": (scales, layout.logical_dtype(layout.CODEC_TERNARY, dtype, "scales")),
    })
    return record


def store_size(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def pack(input_path, output_path, options: PackOptions, resume: bool = False,
         progress=None) -> PackSummary:
    """Pack a checkpoint into a store. `progress(nbytes)` is called after each tensor."""
    options.validate()
    t0 = time.perf_counter()
    selector = ExpertSelector(options.experts, options.preset)
    summary = PackSummary()
    with open_checkpoint(input_path) as ckpt:
        sources = list(ckpt.tensors())
        names = [s.name for s in sources]
        paths = layout.tensor_paths(names)
        plan = hashlib.sha256(layout.dumps(
            [[s.name, list(s.shape), s.dtype] for s in sources])).hexdigest()
        meta = {
            "writer": {"name": "qmoefmt", "version": __version__},
            "pack": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()},
            "plan": {"tensors": len(sources), "sha256": plan},
            "source": {"format": ckpt.format, "name": os.path.basename(os.path.normpath(input_path))},
        }
        writer = StoreWriter(output_path, meta, resume=resume)
        records = []
        for src, path in zip(sources, paths):
            expert = is_expert(selector, src.name, src.shape, src.dtype)
            record = writer.finished_record(path) if resume else None
            if record is not None and record.get("name") == src.name:
                if "dictionary" in record:
                    writer.adopt_dictionary(record["dictionary"])
                summary.resumed_tensors += 1
            else:
                a = src.read()
                record = pack_tensor(writer.root, path, src.name, a, src.dtype, expert,
                                     options, writer)
                writer.finish_tensor(record)
                del a
            records.append(record)
            n = int(np.prod(src.shape))
            summary.tensors += 1
            summary.params += n
            summary.source_bytes += src.nbytes
            if record["codec"] == layout.CODEC_TERNARY:
                summary.expert_tensors += 1
                summary.expert_params += n
            if progress:
                progress(src.nbytes)
        writer.commit(records)
    summary.dictionaries = sorted(writer.dictionaries)
    summary.store_bytes = store_size(output_path)
    summary.seconds = time.perf_counter() - t0
    return summary
