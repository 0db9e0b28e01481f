"""What the two dictionary-coded codecs share (spec §5.2): a ternary stream of 16-bit
codewords, `codes` and `row_codes`, read through a stored dictionary."""
from __future__ import annotations

import numpy as np

from .. import dictionaries
from ..dictionaries.stream import encode
from ..errors import FormatError
from ..format import constants as C
from .base import ArraySpec, Codec, TensorArrays


def symbol_counts(symbols: np.ndarray) -> list[int]:
    """How many 0, 1 and 2 symbols (the record's `symbol_counts`). bincount widens its input
    to intp, 8 bytes a symbol, so it counts a block at a time: a tensor of 2^31 symbols
    costs 32 MiB, not 16 GiB."""
    flat, block = symbols.reshape(-1), 1 << 22
    counts = np.zeros(3, np.int64)
    for i in range(0, flat.size, block):
        counts += np.bincount(flat[i:i + block], minlength=3)[:3]
    return [int(c) for c in counts]


class DictionaryCoded(Codec):
    uses_dictionary = True
    members = ("dictionary", "quantizer", "symbol_counts")

    def stream_specs(self, t: TensorArrays) -> dict[str, ArraySpec]:
        rows, _ = t.rows_cols
        return {"codes": ArraySpec(("uint16",)),
                "row_codes": ArraySpec(("uint16", "uint32"), (rows,))}

    def coded(self, t: TensorArrays, check_crc: bool = True):
        """(codes, row_codes, dictionary), validated."""
        return t.array("codes", check_crc), t.array("row_codes", check_crc), t.load_dictionary()

    def ternary_stream(self, t: TensorArrays, symbols: np.ndarray) -> np.ndarray:
        """The ternary symbols the stream codes, from what `symbols()` gives."""
        return symbols

    def check(self, t: TensorArrays, deep: bool) -> None:
        r, where = t.record, t.where
        rows, cols = t.rows_cols
        counts = r.get("symbol_counts")
        if (not isinstance(counts, list) or len(counts) != 3
                or sum(c for c in counts if isinstance(c, int)) != rows * cols):
            raise FormatError(where, f"tensor {t.name!r}: symbol_counts {counts!r} do not add up "
                                     f"to {rows * cols} elements")
        codes, row_codes, d = self.coded(t, check_crc=False)
        self.check_params(t)
        want_dt = str(C.index_dtype(cols).newbyteorder("="))
        if r["arrays"]["row_codes"]["data_type"] != want_dt:
            raise FormatError(f"{where}/row_codes", f"tensor {t.name!r}: row_codes is "
                              f"{r['arrays']['row_codes']['data_type']}, the spec requires "
                              f"{want_dt} for {cols} columns")
        if not deep:
            return
        sym = self.ternary_stream(t, self.symbols(t, check_crc=False).reshape(rows, cols))
        got = symbol_counts(sym)
        if got != counts:
            raise FormatError(where, f"tensor {t.name!r}: decoded symbol counts {got} "
                                     f"!= recorded {counts}")
        canon = dictionaries.canonical(d.kind, d.params, d.form)
        if canon is not None and canon.content_id == d.content_id:
            c2, rc2 = encode(sym, canon)
            if not (np.array_equal(c2, codes) and np.array_equal(rc2.astype(np.int64),
                                                                  np.asarray(row_codes, np.int64))):
                raise FormatError(f"{where}/codes", f"tensor {t.name!r}: codeword stream is not "
                                                    "the canonical encoding of its symbols")

    def check_params(self, t: TensorArrays) -> None:
        """The codec's own members and arrays beside the stream (verify, shallow)."""
