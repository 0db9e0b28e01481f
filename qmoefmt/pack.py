"""pack: checkpoint reader -> quantizer -> codec -> store writer, one tensor at a time.

Memory is bounded by the largest tensor (plus its symbols and codes), never the model.
The output is a function of the input and the options alone: no timestamps, no
machine-dependent choices, so a resumed pack equals an uninterrupted one byte for byte.
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import layout, uintdict, uintpack
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
# GPTQ column order by default: act-order (decreasing diag H), not QMoE's plain order. On
# the bundled model (bench/quality.py, sequential, two seeds) it lowered the loss ratio at
# every grid: ternary 0.171-0.178 -> 0.149-0.150, 2-bit 0.294-0.303 -> 0.245-0.253, 3-bit
# 0.321-0.336 -> 0.233-0.283, 4-bit 0.324 -> 0.245; ternary stores grow ~3% (fewer zeros).
GPTQ_ACT_ORDER = True


class PackError(QmoeError):
    pass


@dataclass(frozen=True)
class PackOptions:
    experts: tuple[str, ...] = ()
    preset: str | None = None
    dictionary: str = "auto"          # "auto" (golomb-v2f, fitted per tensor) | "qmoe-2023"
    method: str = "rtn"
    bits: str = "ternary"             # "ternary" | "2" | "3" | "4"
    group_size: int | None = None     # k-bit only: scale/zero per this many columns
    calibration: str | None = None    # gptq only: a calibration file (spec/calibration-v1.md)
    act_order: bool | None = None     # gptq only: None = GPTQ_ACT_ORDER
    kbit_codec: str = "auto"          # 2/3/4 bits: "auto" | "packed" | "dict16" (spec §12, §13)
    device: str = "cpu"               # gptq only: "cpu" | "cuda" (a torch device string)

    def validate(self) -> None:
        if self.dictionary not in ("auto", "qmoe-2023"):
            raise PackError(f"--dictionary must be auto or qmoe-2023, not {self.dictionary!r}")
        if self.bits not in ("ternary", "2", "3", "4"):
            raise PackError(f"--bits must be ternary, 2, 3 or 4, not {self.bits!r}")
        if self.method not in ("rtn", "gptq"):
            raise PackError(f"--method must be rtn or gptq, not {self.method!r}")
        if (self.method == "gptq") != (self.calibration is not None):
            raise PackError("--method gptq needs --calibration FILE, and only it takes one")
        if self.kbit_codec not in ("auto", "packed", "dict16"):
            raise PackError(f"--kbit-codec must be auto, packed or dict16, not {self.kbit_codec!r}")
        if self.kbit_codec != "auto" and self.bits == "ternary":
            raise PackError("--kbit-codec needs --bits 2, 3 or 4")
        if self.device != "cpu":
            if self.method != "gptq":
                raise PackError("--device needs --method gptq (it is where GPTQ runs)")
            import torch
            try:
                dev = torch.device(self.device)
            except RuntimeError:
                raise PackError(f"--device {self.device!r} is not a torch device") from None
            if dev.type != "cuda" or not torch.cuda.is_available():
                raise PackError(f"--device {self.device}: no such device here "
                                "(torch sees no CUDA GPU)")
        if self.act_order is not None and self.method != "gptq":
            raise PackError("--act-order/--no-act-order need --method gptq")
        if self.group_size is not None and (self.bits == "ternary" or self.group_size < 1):
            raise PackError("--group-size needs --bits 2, 3 or 4 and a positive size")
        if not self.experts and not self.preset:
            raise PackError("no experts selected: give --experts GLOB or --preset NAME")

    @property
    def gptq_act_order(self) -> bool:
        return GPTQ_ACT_ORDER if self.act_order is None else self.act_order

    @property
    def format_version(self) -> str:
        """The version the pack may need; the finished store declares what it used."""
        if self.bits == "ternary":
            return layout.CODEC_SINCE[layout.CODEC_TERNARY]
        codec = layout.CODEC_UINT if self.kbit_codec == "packed" else layout.CODEC_UINT_DICT
        return layout.CODEC_SINCE[codec]


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


def _as_rows(a: np.ndarray, dtype: str) -> np.ndarray:
    """The tensor as float32 rows; bf16 widened by a shift (exact, and numpy releases the
    GIL for it, unlike ml_dtypes' cast)."""
    cols = a.shape[-1] if a.ndim else 1
    rows = math.prod(a.shape[:-1]) if a.ndim else 1
    if dtype == "bfloat16":
        f = (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        f = np.asarray(a, dtype=np.float32)
    return f.reshape(rows, cols)


def _source_sha256(a: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))).hexdigest()


def load_source(src, expert: bool, options: PackOptions):
    """Read one tensor and hash it, and ready an expert's rows for its quantizer: the
    prefetch thread's work. Ternary quantization reads bf16 bits directly (no float32
    copy); k-bit quantization (torch) takes float32."""
    a = src.read()
    rows = None
    if expert:
        if src.dtype == "bfloat16" and options.bits == "ternary" and options.method == "rtn":
            cols = a.shape[-1]
            rows = a.view(np.uint16).reshape(math.prod(a.shape[:-1]), cols)
        else:
            rows = _as_rows(a, src.dtype)
    return a, _source_sha256(a), rows


def prepare_tensor(path: str, name: str, loaded, dtype: str, expert: bool,
                   options: PackOptions, writer: StoreWriter, calibration=None,
                   params_left: int = 0, quantized=None) -> tuple[dict, dict]:
    """Quantize and code one tensor: its index record (arrays still to be written) and
    the arrays to write, {name: (ndarray, logical dtype)}. `params_left` counts the expert
    weights from this tensor to the end of the plan (what a new dictionary would serve);
    `quantized` is its (GPTQ result, quantizer record) if a batch already computed it."""
    a, sha, rows = loaded
    record = {"name": name, "path": path, "shape": list(a.shape), "dtype": dtype,
              "source_sha256": sha}
    if not expert:
        data = a.view(np.uint16) if dtype == "bfloat16" else a
        record["codec"] = layout.CODEC_DENSE
        return record, {"data": (data, layout.logical_dtype(layout.CODEC_DENSE, dtype, "data"))}
    if options.method == "gptq":
        if not np.isfinite(rows).all():
            raise PackError(f"tensor {name!r}: non-finite weights; refusing to quantize it")
        result, quantizer = quantized or _gptq(name, rows, options, calibration, shape=a.shape)
        if options.bits != "ternary":
            return _kbit_arrays(record, result.codes, result.scales, result.zeros, quantizer,
                                options, writer, params_left)
        sym = result.codes.numpy()
        scales = np.stack([_bf16_bits(result.lo), _bf16_bits(result.hi)], axis=1)
        counts = np.bincount(sym.reshape(-1), minlength=3)[:3].astype(np.int64)
    elif options.bits != "ternary":
        import torch

        from .quantizers import kbit_rtn
        q, scales, zeros = kbit_rtn(torch.from_numpy(rows), int(options.bits), options.group_size)
        return _kbit_arrays(record, q, scales, zeros, {"method": "rtn", "grid": "minmax-asymmetric"},
                            options, writer, params_left)
    else:
        try:
            sym, scales, counts = quantize_rtn(rows, bf16_bits_input=rows.dtype == np.uint16)
        except NonFiniteError as e:
            raise PackError(f"tensor {name!r}: {e}; refusing to quantize it") from None
        quantizer = {"method": "rtn", "grid": "qmoe-ternary"}
    d = choose_dictionary(options, counts, list(writer.dictionaries.values()))
    codes, row_codes = encode(sym, d)
    record.update(codec=layout.CODEC_TERNARY, dictionary=writer.add_dictionary(d),
                  quantizer=quantizer, symbol_counts=[int(c) for c in counts])
    return record, {
        "codes": (codes, None),
        "row_codes": (row_codes, None),
        "scales": (scales, layout.logical_dtype(layout.CODEC_TERNARY, dtype, "scales")),
    }


def write_tensor(writer: StoreWriter, record: dict, arrays: dict) -> None:
    """The writer thread's work: a tensor's arrays, then its group (marking it done)."""
    record["arrays"] = write_arrays(writer.root, record["path"], arrays)
    writer.finish_tensor(record)


def _write_behind(failed: threading.Event, writer: StoreWriter, record: dict, arrays: dict) -> None:
    """After one write fails, later ones do nothing: the store then holds exactly the
    tensors before the failure, as after a crash, and resume takes it from there."""
    if failed.is_set():
        return
    try:
        write_tensor(writer, record, arrays)
    except BaseException:
        failed.set()
        raise


def _bf16_bits(values) -> np.ndarray:
    """Float32 values that are exact in bf16 (the grids make them so) -> their bits."""
    return (np.asarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _gptq(name: str, rows: np.ndarray, options: PackOptions, calibration, shape):
    """GPTQ on one expert tensor with its Hessian. `rows` is the tensor as [prod(shape[:-1]),
    cols]: a 2-D weight, or experts fused into one weight [E, out, in], which the file gives
    an [E, in, in] Hessian and E token counts (calibration 1.1). Fused experts go through
    GPTQ as one batch, each exactly as if alone; results come back as rows either way. An
    expert the file lacks, or that saw no tokens, falls back to round to nearest, recorded
    in the quantizer: `status` and `tokens` per tensor, or lists of E of them for fused
    experts. `shape` is the tensor's, checked against the Hessian."""
    import torch

    cols = rows.shape[1]
    W = torch.from_numpy(rows)
    present = name in calibration
    count = calibration.tokens.get(name, 0)
    if present and len(shape) == 3:
        shape = tuple(shape)
        if math.prod(shape[:-1]) != rows.shape[0] or shape[-1] != cols:
            raise PackError(f"tensor {name!r}: rows {list(rows.shape)} are not of shape "
                            f"{list(shape)}")
        H = calibration.hessian(name, shape)
        W = W.reshape(shape)
    else:
        # a 2-D weight: one [in, in] Hessian
        H = calibration.hessian(name, cols) if present else torch.zeros(cols, cols)
    result, quantizer = _run_gptq(W, H, options)
    if W.dim() == 3:
        from dataclasses import replace

        def as_rows(t):     # [E, out, ...] -> [E * out, ...], as the codecs take them
            return None if t is None else t.reshape(rows.shape[0], *t.shape[2:])
        status = result.status
        result = replace(result, **{f: as_rows(getattr(result, f)) for f in
                                    ("codes", "dequantized", "lo", "hi", "scales", "zeros")})
    else:
        status = result.status[0] if present else "rtn-no-calibration"
    return result, dict(quantizer, status=status, tokens=count)


# GPTQ batches of same-shape experts (QMoE quantizes a layer's experts as one 3-D batch:
# per-column work is a few small torch calls, which a batch shares). The cap bounds the
# batch's float32 weights and Hessians.
GPTQ_BATCH_BYTES = 256 << 20
GPTQ_BATCH_MAX = 64
GPTQ_BATCH_WINDOW = 256


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


def _gptq_stacked(names: list[str], rows: list[np.ndarray], options: PackOptions, calibration):
    """GPTQ on same-shape 2-D experts as one [E, rows, cols] batch: per expert, the
    (result, quantizer record) that `_gptq` gives it alone, bit for bit."""
    import torch
    from dataclasses import replace

    for name, r in zip(names, rows):
        if not np.isfinite(r).all():
            raise PackError(f"tensor {name!r}: non-finite weights; refusing to quantize it")
    cols = rows[0].shape[1]
    W = torch.from_numpy(np.stack(rows))
    H = torch.stack([calibration.hessian(n, cols) if n in calibration else torch.zeros(cols, cols)
                     for n in names])
    result, quantizer = _run_gptq(W, H, options)
    out = []
    for e, name in enumerate(names):
        one = replace(result, status=[result.status[e]], **{
            f: None if getattr(result, f) is None else getattr(result, f)[e]
            for f in ("codes", "dequantized", "lo", "hi", "scales", "zeros")})
        status = result.status[e] if name in calibration else "rtn-no-calibration"
        out.append((one, dict(quantizer, status=status, tokens=calibration.tokens.get(name, 0))))
    return out


def _run_gptq(W, H, options: PackOptions):
    """GPTQ of W [E, rows, cols] with H [E, cols, cols] on the options' grid: the result
    and the quantizer record's common part."""
    from dataclasses import fields, replace

    from . import gptq
    act_order = options.gptq_act_order
    # The device is a pack option, recorded in the root: a GPU's float arithmetic differs
    # from the CPU's, so each device gives its own (deterministic) store.
    W, H = W.to(options.device), H.to(options.device)
    if options.bits == "ternary":
        result = gptq.gptq_ternary(W, H, act_order=act_order)
        grid = "qmoe-ternary"
    else:
        result = gptq.gptq_kbit(W, H, int(options.bits), options.group_size, act_order=act_order)
        grid = "minmax-asymmetric"
    if options.device != "cpu":
        result = replace(result, **{f.name: getattr(result, f.name).cpu() for f in fields(result)
                                    if hasattr(getattr(result, f.name), "cpu")})
    return result, {"method": "gptq", "grid": grid, "damp": 0.1, "act_order": act_order}


def _kbit_arrays(record: dict, q, scales, zeros, quantizer: dict, options: PackOptions,
                 writer: StoreWriter, params_left: int):
    """A k-bit tensor's record and arrays: bit-packed (§12), or its signs dictionary-coded
    with escapes (§13). `auto` takes §13 when it is smaller, and adds a dictionary the
    store does not hold yet only if the saving, extrapolated over the expert weights left
    in the plan, exceeds the dictionary's own bytes: so a small model stays bit-packed,
    and the choice depends on the plan alone (resume reproduces it)."""
    bits, group_size = int(options.bits), options.group_size
    q = np.ascontiguousarray(np.asarray(q, np.uint8))
    rows, cols = q.shape
    size = group_size or max(cols, 1)
    groups = -(-cols // size)   # spec §12: 0 groups for 0 columns
    zeros = np.ascontiguousarray(np.asarray(zeros, np.uint8)[:, :groups])
    record.update(bits=bits, group_size=size, quantizer=quantizer)
    common = {
        "scales": (_bf16_bits(np.asarray(scales)[:, :groups]),
                   layout.logical_dtype(layout.CODEC_UINT, record["dtype"], "scales")),
        "zeros": (zeros, None),
    }
    packed_bytes = rows * uintpack.row_bytes(cols, bits)
    d = uintdict.steps(q, zeros, size) if options.kbit_codec != "packed" else None
    # The escapes and per-row counts alone can rule §13 out (3/4-bit grids: 15-60% of
    # levels are escapes); then `auto` skips choosing a dictionary and coding the signs.
    if options.kbit_codec == "dict16" or (
            options.kbit_codec == "auto" and uintdict.coded_bytes(
                0, rows, cols, int(np.count_nonzero(np.abs(d) >= 2))) < packed_bytes):
        ternary, row_escapes, escape_cols, escape_levels = uintdict.split(q, zeros, size, d)
        counts = np.bincount(ternary.reshape(-1), minlength=3)[:3].astype(np.int64)
        d = choose_dictionary(options, counts, list(writer.dictionaries.values()))
        codes, row_codes = encode(ternary, d)
        coded = uintdict.coded_bytes(len(codes), rows, cols, len(escape_cols))
        saving = packed_bytes - coded
        if d.content_id not in writer.dictionaries and q.size:
            saving = saving * params_left / q.size - sum(t.nbytes for t in d.tables().values())
        if options.kbit_codec == "dict16" or saving > 0:
            record.update(codec=layout.CODEC_UINT_DICT, dictionary=writer.add_dictionary(d),
                          symbol_counts=[int(c) for c in counts])
            return record, {"codes": (codes, None), "row_codes": (row_codes, None),
                            "row_escapes": (row_escapes, None), "escape_cols": (escape_cols, None),
                            "escape_levels": (escape_levels, None), **common}
    record.update(codec=layout.CODEC_UINT)
    return record, {"q": (uintpack.pack_levels(q, bits), None), **common}


def _pack_meta(options: PackOptions) -> dict:
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
            "format_version": options.format_version,
            "writer": {"name": "qmoefmt", "version": __version__},
            "pack": _pack_meta(options),
            "plan": {"tensors": len(sources), "sha256": plan},
            "source": {"format": ckpt.format, "name": os.path.basename(os.path.normpath(input_path))},
        }
        # The calibration file is checked before the store exists: a refused pack leaves
        # nothing behind.
        calibration = None
        if options.method == "gptq":
            from .calibration import CalibrationFile
            calibration = CalibrationFile(options.calibration)
            recorded = calibration.sequential
            # A sequential file's later layers were calibrated on the earlier layers' GPTQ
            # weights under its settings; other settings give other weights.
            used = {"bits": options.bits, "group_size": options.group_size,
                    "act_order": options.gptq_act_order, "damp": 0.1}
            if recorded is not None and recorded != used:
                def fmt(d):
                    return ", ".join(f"{k} {v}" for k, v in d.items())
                raise PackError(f"{options.calibration}: sequential calibration collected under "
                                f"GPTQ {fmt(recorded)}, but this pack quantizes with "
                                f"{fmt(used)}; pack with the file's settings or calibrate "
                                "again with these")
        writer = StoreWriter(output_path, meta, resume=resume)
        experts = [is_expert(selector, src.name, src.shape, src.dtype) for src in sources]
        params_left = np.cumsum([math.prod(s.shape) if e else 0
                                 for s, e in zip(sources, experts)][::-1])[::-1]
        done = [writer.finished_record(p) if resume else None for p in paths]
        done = [r if r is not None and r.get("name") == src.name else None
                for r, src in zip(done, sources)]
        todo = [i for i, r in enumerate(done) if r is None]
        batches = gptq_batches(sources, experts, todo, calibration) if calibration else {}
        quantized = {}
        records = []
        # Three stages overlap: the next tensor is read and hashed ahead (prefetch), the
        # current one is quantized and coded here, and the previous one's files are
        # written behind (file creation costs ~0.5 ms a call here, 15 a tensor).
        # Memory stays at a few tensors.
        with ThreadPoolExecutor(max_workers=1) as prefetch, \
                ThreadPoolExecutor(max_workers=1) as write_behind:
            pending, writes, failed = {}, deque(), threading.Event()
            cursor = 0

            def fetch(j: int) -> None:
                if j not in pending:
                    pending[j] = prefetch.submit(load_source, sources[j], experts[j], options)

            if todo:
                fetch(todo[0])
            for i, (src, path) in enumerate(zip(sources, paths)):
                record = done[i]
                if record is not None:
                    if "dictionary" in record:
                        writer.adopt_dictionary(record["dictionary"])
                    summary.resumed_tensors += 1
                else:
                    if i in batches:
                        for j in batches[i]:
                            fetch(j)
                        quantized.update(zip(batches[i], _gptq_stacked(
                            [sources[j].name for j in batches[i]],
                            [pending[j].result()[2] for j in batches[i]], options, calibration)))
                    loaded = pending.pop(i).result()
                    cursor += 1
                    if cursor < len(todo):
                        fetch(todo[cursor])
                    record, arrays = prepare_tensor(path, src.name, loaded, src.dtype,
                                                    experts[i], options, writer, calibration,
                                                    int(params_left[i]), quantized.pop(i, None))
                    del loaded
                    writes.append(write_behind.submit(_write_behind, failed, writer, record, arrays))
                    while len(writes) > 2:
                        writes.popleft().result()
                records.append(record)
                n = int(np.prod(src.shape))
                summary.tensors += 1
                summary.params += n
                summary.source_bytes += src.nbytes
                if record["codec"] != layout.CODEC_DENSE:
                    summary.expert_tensors += 1
                    summary.expert_params += n
                if progress:
                    progress(src.nbytes)
            for w in writes:
                w.result()
        writer.commit(records)
    summary.dictionaries = sorted(writer.dictionaries)
    summary.store_bytes = store_size(output_path)
    summary.seconds = time.perf_counter() - t0
    return summary
