"""Stores on disk: the reader, the writer, verify and the summary inspect prints."""
from .reader import Store, Tensor, open

__all__ = ["Store", "Tensor", "open"]
