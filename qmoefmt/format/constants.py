"""The spec's constants, each defined once (spec/format-v1.md; section numbers beside them).

Reader, writer, codecs, quantizers and the CLI import these; none writes its own copy.
"""
from __future__ import annotations

import numpy as np

# §3 versions: the newest this code reads and writes. A store declares the lowest version
# defining every codec and member it uses, so readers of older minors still open it.
FORMAT_VERSION = "1.5"
FORMAT_MAJOR, FORMAT_MINOR = 1, 5

# §2, §7, §12, §13 codec ids
CODEC_TERNARY = "qmoe.ternary-dict16"
CODEC_DENSE = "qmoe.dense"
CODEC_UINT = "qmoe.uint-packed"
CODEC_UINT_DICT = "qmoe.uint-dict16"

# §14 attachments: the source checkpoint's model description, in the root since 1.3
ATTACHMENTS_SINCE = "1.3"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
ATTACHMENT_NAMES = (CONFIG, GENERATION_CONFIG)     # what pack records, when present

# §4.4 the root's `source.metadata`: a safetensors source's `__metadata__`, since 1.4
SOURCE_METADATA_SINCE = "1.4"
MAX_SOURCE_METADATA_BYTES = 65536      # as canonical JSON (§9)

# §4.5 an array descriptor's `logical_dtype`, since 1.5: what a data type does not say, in
# the index, so that every zarr.json is a function of the index for any codec (§10)
LOGICAL_DTYPE_SINCE = "1.5"
LOGICAL_DTYPES = ("bfloat16",)

# §2 node names
TENSORS = "tensors"
DICTIONARIES = "dictionaries"
ROOT_META = "zarr.json"
CHECKSUM_PLACEHOLDER = "00000000"

# §7 logical dtype -> zarr data_type of the stored array
STORED_DTYPE = {
    "bool": "bool", "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64",
    "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    "float16": "float16", "float32": "float32", "float64": "float64",
    "bfloat16": "uint16",   # zarr-python has no bfloat16: raw bits, declared (spec §7)
}
FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")   # what pack may quantize

# §9 resource limits, enforced before allocation
MAX_ROOT_METADATA = 1 << 28
# A root's parse costs memory per value, not per byte: over ROOT_DENSE_FROM bytes, at most
# one '{' or '[' per ROOT_BYTES_PER_CONTAINER bytes and one ',' or ':' per
# ROOT_BYTES_PER_SEPARATOR (a written root has one per ~50 and ~10, spec §9)
ROOT_DENSE_FROM = 1 << 20
ROOT_BYTES_PER_CONTAINER = 24
ROOT_BYTES_PER_SEPARATOR = 8
MAX_NODE_METADATA = 1 << 20
MAX_RANK = 8
MAX_ELEMENTS = 1 << 40
MAX_TENSORS = 1_000_000
MAX_DICTIONARIES = 1024
MAX_NAME_BYTES = 4096
MAX_ATTACHMENTS = 16
MAX_ATTACHMENT_BYTES = 1 << 20
MAX_ATTACHMENT_NAME = 128

# §5 dictionaries
CODEWORDS = 1 << 16
MAX_STATES = 64
MAX_NNZ = 32
KIND_QMOE2023 = "qmoe-2023"      # §5.3
KIND_GOLOMB = "golomb-v2f"       # §5.4
COMPACT_DICTIONARIES_SINCE = "1.4"   # §5.7: dictionaries stored as trees/tries, not tables
DICTIONARY_KINDS = (KIND_QMOE2023, KIND_GOLOMB)

# §12 bit widths of the k-bit grids, and the ternary grid beside them (pack's --bits)
KBIT_BITS = (2, 3, 4)
TERNARY = "ternary"
GRIDS = (TERNARY, *map(str, KBIT_BITS))

# GPTQ (QMoE's settings, recorded in each quantizer and in sequential calibration files)
GPTQ_DAMP = 0.1          # dampening: damp * mean(diag H) added to the diagonal
# Column order by default: act-order (decreasing diag H), not QMoE's plain order. On the
# bundled model (bench/quality.py, sequential, two seeds) it lowered the loss ratio at
# every grid: ternary 0.171-0.178 -> 0.149-0.150, 2-bit 0.294-0.303 -> 0.245-0.253, 3-bit
# 0.321-0.336 -> 0.233-0.283, 4-bit 0.324 -> 0.245; ternary stores grow ~3% (fewer zeros).
GPTQ_ACT_ORDER = True


def index_dtype(cols: int) -> np.dtype:
    """Per-row counts and column indexes (§5.2 row_codes, §13 row_escapes/escape_cols):
    uint16 below 65,536 columns, else uint32."""
    return np.dtype("<u2") if cols < (1 << 16) else np.dtype("<u4")


def version_tuple(version: str) -> tuple[int, int]:
    major, minor = (int(x) for x in version.split("."))
    return major, minor

__all__ = [
    "FORMAT_VERSION", "FORMAT_MAJOR", "FORMAT_MINOR", "CODEC_TERNARY", "CODEC_DENSE",
    "CODEC_UINT", "CODEC_UINT_DICT", "TENSORS", "DICTIONARIES", "ROOT_META",
    "CHECKSUM_PLACEHOLDER", "STORED_DTYPE", "FLOAT_DTYPES", "MAX_ROOT_METADATA",
    "ROOT_DENSE_FROM", "ROOT_BYTES_PER_CONTAINER", "ROOT_BYTES_PER_SEPARATOR",
    "MAX_NODE_METADATA", "MAX_RANK", "MAX_ELEMENTS", "MAX_TENSORS", "MAX_DICTIONARIES",
    "MAX_NAME_BYTES", "MAX_ATTACHMENTS", "MAX_ATTACHMENT_BYTES", "MAX_ATTACHMENT_NAME",
    "ATTACHMENTS_SINCE", "CONFIG", "GENERATION_CONFIG", "ATTACHMENT_NAMES",
    "SOURCE_METADATA_SINCE", "LOGICAL_DTYPE_SINCE", "LOGICAL_DTYPES", "MAX_SOURCE_METADATA_BYTES", "CODEWORDS",
    "MAX_STATES", "MAX_NNZ", "KIND_QMOE2023", "KIND_GOLOMB", "COMPACT_DICTIONARIES_SINCE",
    "DICTIONARY_KINDS", "KBIT_BITS",
    "TERNARY", "GRIDS", "GPTQ_DAMP", "GPTQ_ACT_ORDER", "index_dtype", "version_tuple"
]
