"""Codec `qmoe.dense` (spec §7): a tensor as it was, in its original dtype."""
from __future__ import annotations

import numpy as np

from ..format import constants as C
from ..dictionaries.stream import row_range
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
        return a

    def decode(self, t: TensorArrays, check_crc: bool = True, backend=None,
               rows: slice | None = None) -> np.ndarray:
        a = self.native(t, check_crc)
        if rows is not None:
            a = a.reshape(t.rows_cols)[slice(*row_range(rows, t.rows_cols[0]))]
        return np.asarray(a, dtype=np.float32)

    def encode(self, a: np.ndarray, dtype: str) -> tuple[dict, dict]:
        """(record members, arrays {name: (ndarray, logical dtype)}) of a source tensor."""
        data = a.view(np.uint16) if dtype == "bfloat16" else a
        return {"codec": self.id}, {"data": (data, self.logical_dtype("data", dtype))}
