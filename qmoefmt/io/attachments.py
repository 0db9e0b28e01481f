"""The files beside a checkpoint that describe its model (spec §14): Hugging Face's
config.json and generation_config.json in the checkpoint's directory (the directory
given, or the one holding the file given), read within the attachment size limit."""
from __future__ import annotations

import os

from ..errors import LimitError
from ..format.attachments import make_entry
from ..format.constants import ATTACHMENT_NAMES, MAX_ATTACHMENT_BYTES


def source_attachments(input_path) -> list[dict]:
    """The attachment entries for the checkpoint at `input_path`, sorted by name; each
    file checked (a JSON object within the limit) before the store exists."""
    path = os.fspath(input_path)
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    entries = []
    for name in sorted(ATTACHMENT_NAMES):
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            continue
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_ATTACHMENT_BYTES:      # refused before it is read
                raise LimitError(file, f"{size:,} bytes, the attachment limit is "
                                       f"{MAX_ATTACHMENT_BYTES:,} (spec §9)")
            data = f.read(MAX_ATTACHMENT_BYTES + 1)   # a file that grew meanwhile is caught too
        entries.append(make_entry(name, data, file))
    return entries
