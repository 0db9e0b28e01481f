"""Codec `qmoe.dense` (spec §7): a tensor as it was, in its original dtype."""
from __future__ import annotations

import numpy as np

from ..dictionaries.stream import row_range
from ..errors import FormatError
from ..format import constants as C
from .base import ArraySpec, Codec, TensorArrays


class Dense(Codec):
    id = C.CODEC_DENSE
    since = "1.0"
    arrays = ("data",)
    expert = False

    def logical_dtype(self, array: str, dtype: str) -> str | None:
        return "bfloat16" if array == "data" and dtype == "bfloat16" else None

    def array_specs(self, t: TensorArrays) -> dict[str, ArraySpec]:
        return {"data": ArraySpec((C.STORED_DTYPE.get(t.record["dtype"], "?"),), tuple(t.shape))}

    def native(self, t: TensorArrays, check_crc: bool = True) -> np.ndarray:
        """The data in its original dtype (bfloat16 as ml_dtypes.bfloat16)."""
        a = t.array("data", check_crc)
        if t.record["dtype"] == "bfloat16":
            import ml_dtypes
            return a.view(ml_dtypes.bfloat16)
        if a.dtype == np.bool_ and a.size:
            # numpy reads any nonzero byte as True, another reader may not: one meaning
            raw = a.reshape(-1).view(np.uint8)
            if int(raw.max()) > 1:
                i = int(np.argmax(raw > 1))
                raise FormatError(f"{t.where}/data", f"tensor {t.name!r}: element {i} is byte "
                                                     f"{int(raw[i])}; bool data is 0 or 1 (spec §7)")
        return a

    def decode(self, t: TensorArrays, check_crc: bool = True, backend=None,
               rows: slice | None = None) -> np.ndarray:
        """float32 values for float dtypes; integers and bools in their own dtype, which
        float32 would round (int64 above 2^24, spec §7)."""
        a = self.native(t, check_crc)
        if rows is not None:
            a = a.reshape(t.rows_cols)[slice(*row_range(rows, t.rows_cols[0]))]
        return np.asarray(a, dtype=np.float32 if t.record["dtype"] in C.FLOAT_DTYPES else None)

    def check(self, t: TensorArrays, deep: bool) -> None:
        self.native(t, check_crc=False)

    def encode(self, a: np.ndarray, dtype: str) -> tuple[dict, dict]:
        """(record members, arrays {name: (ndarray, logical dtype)}) of a source tensor."""
        data = a.view(np.uint16) if dtype == "bfloat16" else a
        return {"codec": self.id}, {"data": (data, self.logical_dtype("data", dtype))}
