"""qmoefmt: a file format and toolkit for compressed Mixture-of-Experts weights."""
from ._version import __version__
from .errors import FormatError, IncompleteStoreError, LimitError, QmoeError, VersionError
from .layout import FORMAT_VERSION
from .store_reader import Store, Tensor, open

__all__ = ["__version__", "FORMAT_VERSION", "open", "Store", "Tensor", "QmoeError",
           "FormatError", "IncompleteStoreError", "LimitError", "VersionError"]
