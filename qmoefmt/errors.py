"""Errors that name where a problem is: the file, the tensor, the field."""
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
