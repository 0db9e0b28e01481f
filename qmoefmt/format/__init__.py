"""The spec's vocabulary, in one namespace: constants (`constants`), the exact metadata
documents and node paths (`metadata`), bfloat16 (`bf16`)."""
from .constants import *  # noqa: F401,F403
from .metadata import *   # noqa: F401,F403
