"""Errors that name where a problem is: the file, the tensor, the field.

Everything qmoefmt raises on bad input or a wrong request is a QmoeError, so a caller (the
CLI among them) catches one base class; bugs stay other exceptions.
"""
from __future__ import annotations


class QmoeError(Exception):
    """Base of every error qmoefmt raises on bad input."""


class FormatError(QmoeError):
    """A store, dictionary or tensor that breaks the spec. `where` names the file or
    object (e.g. "store.qmoe/tensors/x/codes"), `what` says what is wrong."""

    def __init__(self, where: str, what: str):
        self.where = where
        self.what = what
        super().__init__(f"{where}: {what}")


class LimitError(FormatError):
    """A declared size beyond the reader's resource limits (spec §9); raised before any
    allocation is made for it."""


class IncompleteStoreError(QmoeError):
    """The store's commit marker does not say complete (spec §8)."""


class VersionError(FormatError):
    """A format_version this reader must not read (spec §3)."""


class NotApplicableError(QmoeError, TypeError):
    """An accessor the tensor's codec does not have (e.g. ternary scales of a dense
    tensor). Also a TypeError: it is a wrong call, not bad data."""


class NonFiniteError(QmoeError, ValueError):
    """A row that cannot be quantized: it holds a NaN or an infinity, or a value whose
    bf16 scale would be infinite (|w| beyond bfloat16's largest finite value)."""

    def __init__(self, row: int, beyond_bf16: bool = False):
        self.row = row
        super().__init__(f"row {row} holds a value beyond bfloat16's range (its scale would be "
                         "infinite)" if beyond_bf16 else
                         f"row {row} holds a non-finite value (NaN or infinity)")


class MissingExtraError(QmoeError, ImportError):
    """A feature that needs an optional dependency which is not installed."""


class QuantizeError(QmoeError):
    """A tensor that cannot be quantized as asked (non-finite weights, a Hessian of the
    wrong shape)."""
