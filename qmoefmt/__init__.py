"""qmoefmt: a file format and toolkit for compressed Mixture-of-Experts weights."""
from ._version import __version__
from .errors import FormatError, IncompleteStoreError, LimitError, QmoeError, VersionError
from .format.constants import FORMAT_VERSION
from .store.reader import Store, Tensor, open

__all__ = ["__version__", "FORMAT_VERSION", "open", "Store", "Tensor", "QmoeError",
           "FormatError", "IncompleteStoreError", "LimitError", "VersionError"]
