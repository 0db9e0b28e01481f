"""The fuzzer's worker process (qmoefmt.testing.fuzz.Worker): reads store paths from
stdin, one per line (or 'TARGET<tab>CHECKPOINT' for a checkpoint to pack with a fuzz
target's options), and answers each with one line: refused, accepted, memory or
'crash: <exception>'. Its address space is capped at argv[1] bytes above its size once
warm, so a mutant that allocates beyond that shows as 'memory', not as a stalled machine."""
from __future__ import annotations

import resource
import sys
from pathlib import Path


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    from qmoefmt.testing import fuzz_checkpoint
    from qmoefmt.testing.fuzz import examine
    import qmoefmt.backends.cpu  # noqa: F401 - compile-load the kernels before the cap
    import qmoefmt.pack  # noqa: F401 - and the packer's modules, torch among them
    import torch  # noqa: F401
    limit = _vm_size() + int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print("ready", flush=True)
    for line in sys.stdin:
        target, _, path = line.rstrip("\n").rpartition("\t")
        try:
            answer = (fuzz_checkpoint.examine(Path(path), target) if target
                      else examine(Path(path)))
        except MemoryError:
            answer = "memory"
        except RecursionError as e:
            answer = f"crash: RecursionError {e}"[:300]
        except Exception as e:  # noqa: BLE001 - every other escape is a finding
            answer = f"crash: {type(e).__name__}: {e}".replace("\n", " ")[:300]
        print(answer, flush=True)


if __name__ == "__main__":
    main()
