"""The pure stages of packing one tensor: read -> quantize -> choose a dictionary ->
encode into arrays. Each takes data and returns data: no stage writes a file or holds a
writer, so a stage can run in any worker; the coordinator (`executor`) adds dictionaries
and writes.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from .. import codecs
from ..dictionaries import choice
from ..dictionaries.golomb import build_golomb
from ..dictionaries.qmoe2023 import build_qmoe2023
from ..dictionaries.tables import Dictionary
from ..errors import NonFiniteError
from ..format import bf16
from ..format import constants as C
from ..codecs import uint_dict16
from ..codecs.coded_stream import symbol_counts
from ..codecs.kbit_grid import n_groups
from ..codecs.uint_packed import row_bytes
from .options import PackError, PackOptions

TERNARY = codecs.get(C.CODEC_TERNARY)
DENSE = codecs.get(C.CODEC_DENSE)
UINT = codecs.get(C.CODEC_UINT)
UINT_DICT = codecs.get(C.CODEC_UINT_DICT)


@dataclass
class Loaded:
    """A source tensor read and hashed; `rows` readied for its quantizer if an expert."""
    array: np.ndarray
    sha256: str
    rows: np.ndarray | None


@dataclass
class Quantized:
    """A quantizer's output: ternary (symbols, bf16 bits of (lo, hi) per row, counts) or
    k-bit (levels, float32 scales, zero points), and the quantizer record."""
    quantizer: dict
    symbols: np.ndarray | None = None
    scales: np.ndarray | None = None
    counts: np.ndarray | None = None
    levels: np.ndarray | None = None
    zeros: np.ndarray | None = None


@dataclass
class Prepared:
    """A tensor ready to write: its record (arrays still to be written), the arrays
    {name: (ndarray, logical dtype)}, and the dictionary it needs, if any."""
    record: dict
    arrays: dict
    dictionary: Dictionary | None = None


def load(src, expert: bool, options: PackOptions) -> Loaded:
    """Read one tensor and hash it, and ready an expert's rows for its quantizer: the
    prefetch thread's work. Ternary RTN reads bf16 bits directly (no float32 copy); the
    torch quantizers take float32."""
    a = src.read()
    rows = None
    if expert:
        cols = a.shape[-1]
        if src.dtype == "bfloat16" and options.bits == C.TERNARY and options.method == "rtn":
            rows = a.view(np.uint16).reshape(math.prod(a.shape[:-1]), cols)
        elif src.dtype == "bfloat16":
            rows = bf16.widen(a).reshape(math.prod(a.shape[:-1]), cols)
        else:
            rows = np.asarray(a, dtype=np.float32).reshape(math.prod(a.shape[:-1]), cols)
    sha = hashlib.sha256(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))).hexdigest()
    return Loaded(a, sha, rows)


def quantize(name: str, loaded: Loaded, options: PackOptions, calibration=None,
             gptq_result=None) -> Quantized:
    """The options' quantizer on an expert's rows. `gptq_result` is its (GPTQ result, quantizer
    record) if a batch already computed it."""
    rows = loaded.rows
    if options.method == "gptq":
        from ..quantize.expert_gptq import quantize_expert
        result, quantizer = gptq_result or quantize_expert(name, rows, options.gptq_settings,
                                                    calibration, loaded.array.shape)
        if options.bits != C.TERNARY:
            return Quantized(quantizer, levels=result.codes, scales=result.scales,
                             zeros=result.zeros)
        sym = result.codes.numpy()
        return Quantized(quantizer, symbols=sym,
                         scales=np.stack([bf16.exact_bits(result.lo), bf16.exact_bits(result.hi)], axis=1),
                         counts=np.array(symbol_counts(sym), np.int64))
    if options.bits != C.TERNARY:
        from .._torch import require_torch
        torch = require_torch(f"pack --bits {options.bits}")
        from ..quantize.grids import kbit_rtn
        q, scales, zeros = kbit_rtn(torch.from_numpy(rows), int(options.bits), options.group_size)
        return Quantized({"method": "rtn", "grid": "minmax-asymmetric"}, levels=q, scales=scales,
                         zeros=zeros)
    from ..quantize.rtn import quantize_rtn
    try:
        sym, scales, counts = quantize_rtn(rows, bf16_bits_input=rows.dtype == np.uint16)
    except NonFiniteError as e:
        raise PackError(f"tensor {name!r}: {e}; refusing to quantize it") from None
    return Quantized({"method": "rtn", "grid": "qmoe-ternary"}, symbols=sym, scales=scales,
                     counts=counts)


def choose_dictionary(options: PackOptions, counts: np.ndarray, held: dict,
                      weights_left: int) -> Dictionary:
    """The dictionary for symbols with these counts: qmoe-2023 if asked, else the one
    that codes the `weights_left` expert weights still to pack in the fewest bytes,
    counting the bytes of a dictionary the store does not hold yet (`held`: content id ->
    index entry, in the order the store took them)."""
    if options.dictionary == C.KIND_QMOE2023:
        return build_qmoe2023()
    held_kinds = [(e["kind"], e["params"]["p_zero"] if e["kind"] == C.KIND_GOLOMB else None)
                  for e in held.values()]
    kind, p_zero = choice.choose(counts, held_kinds, weights_left)
    return build_qmoe2023() if kind == C.KIND_QMOE2023 else build_golomb(p_zero)


def prepare(path: str, name: str, loaded: Loaded, dtype: str, expert: bool,
            options: PackOptions, held: dict, calibration=None, params_left: int = 0,
            gptq_result=None) -> Prepared:
    """One tensor from its source to its arrays. `params_left` counts the expert weights
    from this tensor to the end of the plan (what a new dictionary would serve)."""
    record = {"name": name, "path": path, "shape": list(loaded.array.shape), "dtype": dtype,
              "source_sha256": loaded.sha256}
    if not expert:
        members, arrays = DENSE.encode(loaded.array, dtype)
        return Prepared({**record, **members}, arrays)
    q = quantize(name, loaded, options, calibration, gptq_result)
    if q.levels is not None:
        return encode_kbit(record, q, options, held, params_left)
    d = choose_dictionary(options, q.counts, held, params_left)
    members, arrays = TERNARY.encode(q.symbols, q.scales, q.counts, d)
    return Prepared({**record, **members, "dictionary": d.content_id, "quantizer": q.quantizer},
                    arrays, d)


def encode_kbit(record: dict, q: Quantized, options: PackOptions, held: dict,
                params_left: int) -> Prepared:
    """A k-bit tensor bit-packed (§12), or its signs dictionary-coded with escapes (§13).
    `auto` takes §13 when it is smaller, and adds a dictionary the store does not hold yet
    only if the saving, extrapolated over the expert weights left in the plan, exceeds the
    dictionary's own bytes: so a small model stays bit-packed, and the choice depends on
    the plan alone (resume reproduces it)."""
    bits, group_size = int(options.bits), options.group_size
    levels = np.ascontiguousarray(np.asarray(q.levels, np.uint8))
    rows, cols = levels.shape
    size = group_size or max(cols, 1)
    groups = n_groups(cols, size)
    zeros = np.ascontiguousarray(np.asarray(q.zeros, np.uint8)[:, :groups])
    scales = bf16.exact_bits(np.asarray(q.scales)[:, :groups])
    record = {**record, "bits": bits, "group_size": size, "quantizer": q.quantizer}
    packed_bytes = rows * row_bytes(cols, bits)
    steps = uint_dict16.steps(levels, zeros, size) if options.kbit_codec != "packed" else None
    # The escapes and per-row counts alone can rule §13 out (3/4-bit grids: 15-60% of
    # levels are escapes); then `auto` skips choosing a dictionary and coding the signs.
    if options.kbit_codec == "dict16" or (
            options.kbit_codec == "auto" and uint_dict16.coded_bytes(
                0, rows, cols, int(np.count_nonzero(np.abs(steps) >= 2))) < packed_bytes):
        parts = uint_dict16.split(levels, zeros, size, steps)
        counts = np.array(symbol_counts(parts[0]), np.int64)
        d = choose_dictionary(options, counts, held, params_left)
        members, arrays = UINT_DICT.encode(parts, counts, d, scales, zeros)
        coded = sum(arrays[a][0].nbytes for a in ("codes", "row_codes", "row_escapes",
                                                  "escape_cols", "escape_levels"))
        saving = packed_bytes - coded
        if d.content_id not in held and levels.size:
            saving = saving * params_left / levels.size - d.stored_nbytes
        if options.kbit_codec == "dict16" or saving > 0:
            return Prepared({**record, **members, "dictionary": d.content_id}, arrays, d)
    members, arrays = UINT.encode(levels, bits, scales, zeros)
    return Prepared({**record, **members}, arrays)
