"""Packs killed with SIGKILL at a chosen write, for the resume tests and the fault
campaign: the child process counts the store writer's file writes and kills itself at
write number N, before it ("before") or with the temporary file written and not yet
renamed ("renaming"), as a power cut or an OOM kill would leave the store."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

MODES = ("before", "renaming")

_CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    from qmoefmt.pack import PackOptions, pack
    from qmoefmt.store import writer as W
    ckpt, out, n, mode, options = sys.argv[1:6]
    n, real, count = int(n), W._write_file, [0]
    def dying(path, data, *a, **kw):
        if count[0] == n:
            if mode == "renaming":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(f"{path}.partial.{os.getpid()}").write_bytes(bytes(data)[:7])
            os.kill(os.getpid(), signal.SIGKILL)
        count[0] += 1
        return real(path, data, *a, **kw)
    W._write_file = dying
    from qmoefmt.pack.executor import staging
    pack(ckpt, out, PackOptions(**json.loads(options)), resume=staging(out)[0].exists())
""")


def kill_at(ckpt: Path, out: Path, n: int, mode: str, options: dict) -> int:
    """Runs the pack of `ckpt` into `out` (resuming if its directory exists: `out`, or for
    an archive `out`.partial) in a child killed at
    write `n`; returns its exit status (-9 when the kill came, 0 when the pack finished
    first)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.run([sys.executable, "-c", _CHILD, str(ckpt), str(out), str(n), mode,
                           json.dumps(options)],
                          env=env, capture_output=True, timeout=600).returncode


def counted_writes(ckpt: Path, out: Path, options: dict) -> list[str]:
    """Packs `ckpt` into `out` uninterrupted; returns the files it wrote (for an archive,
    in its staging directory), in order."""
    from ..pack import PackOptions, pack
    from ..pack.executor import staging
    from ..store import writer as W
    writes, real, work = [], W._write_file, staging(out)[0]

    def counting(path, *a, **kw):
        writes.append(Path(path).relative_to(work).as_posix())
        return real(path, *a, **kw)
    W._write_file = counting
    try:
        pack(ckpt, out, PackOptions(**options))
    finally:
        W._write_file = real
    return writes
