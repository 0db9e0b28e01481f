"""pack: checkpoint reader -> quantizer -> codec -> store writer, one tensor at a time.

`options` says what to do, `plan` fixes what each tensor becomes, `stages` are the pure
per-tensor steps, `executor` runs them locally and coordinates the writer."""
from .executor import PackSummary, pack
from .options import PackError, PackOptions

__all__ = ["PackError", "PackOptions", "PackSummary", "pack"]
