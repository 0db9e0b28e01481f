"""Where the GPU runtime's CUDA sources are, and the two builds that need no GPU: each
kernel file compiled by the local `nvcc` for an architecture (with ptxas's register and
spill report, which the tests hold at zero spills), and the host harness
(gpu/host_harness.cpp, the kernels' warp drivers on the host) built as a shared library."""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

try:        # installed: the data package qmoefmt_gpu (an editable install maps it to gpu/)
    import qmoefmt_gpu
    SOURCES = Path(qmoefmt_gpu.__file__).resolve().parent
except ImportError:     # a checkout on PYTHONPATH, not installed (scripts/gpu_check.sh)
    SOURCES = Path(__file__).resolve().parents[2] / "gpu"
KERNEL_FILES = ("ternary.cu", "kbit.cu", "dict_levels.cu")
HEADERS = ("qmoe_warp.cuh", "qmoe_lane.cuh", "qmoe_kernels.cuh")
HARNESS = "host_harness.cpp"
ARCHS = ("sm_80", "sm_90")
STD = "-std=c++17"


def nvcc() -> str | None:
    """The nvcc on PATH, else CUDA's usual places, else None."""
    found = shutil.which("nvcc")
    for p in (found, os.environ.get("CUDA_HOME", "") + "/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if p and Path(p).is_file():
            return p
    return None


# kernel name prefix -> the file that defines it
_KERNEL_FILES = {"qm_ternary_": "ternary.cu", "qm_unpack_levels": "kbit.cu",
                 "qm_kbit_": "kbit.cu", "qm_dict_values_": "dict_levels.cu",
                 "qm_escape_corrections_": "dict_levels.cu"}
_INCLUDE = re.compile(r'^#include "([\w.]+)"\s*$', re.M)


def kernel_file(name: str) -> str:
    return next(f for p, f in _KERNEL_FILES.items() if name.startswith(p))


def bundle(name: str, seen: set[str] | None = None) -> str:
    """A source with its local headers inlined, each once (as #pragma once would)."""
    seen = set() if seen is None else seen
    seen.add(name)

    def inline(m: re.Match) -> str:
        h = m.group(1)
        return "" if h in seen else bundle(h, seen)

    return _INCLUDE.sub(inline, (SOURCES / name).read_text()).replace("#pragma once\n", "")


@dataclass(frozen=True)
class KernelReport:
    """ptxas's figures for one kernel of one compile."""
    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int


_FUNCTION = re.compile(r"Compiling entry function '(\w+)'")
_USAGE = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(text: str) -> list[KernelReport]:
    """The per-kernel lines of `ptxas -v` output: entry, then its stack/spill line, then its
    register line."""
    out, name, frame = [], None, None
    for line in text.splitlines():
        if m := _FUNCTION.search(line):
            name, frame = m.group(1), None
        elif (m := _FRAME.search(line)) and name:
            frame = tuple(int(g) for g in m.groups())
        elif (m := _USAGE.search(line)) and name:
            stack, stores, loads = frame or (0, 0, 0)
            out.append(KernelReport(name, int(m.group(1)), stores, loads, stack))
            name = None
    return out


def compile_kernels(cu: str, arch: str, exe: str | None = None) -> tuple[int, str, list[KernelReport]]:
    """`nvcc -c -arch=ARCH -Xptxas -v` of one kernel file: both of nvcc's passes, the host
    one as a build of the file would run it (a -cubin build runs only the device pass and
    misses what the host pass refuses). -> (returncode, output, ptxas's report per
    kernel)."""
    exe = exe or nvcc()
    if exe is None:
        raise FileNotFoundError("nvcc not found")
    with tempfile.TemporaryDirectory() as tmp:
        p = subprocess.run([exe, STD, "-c", f"-arch={arch}", "-Xptxas", "-v",
                            "-I", str(SOURCES), "-o", str(Path(tmp) / "k.o"),
                            str(SOURCES / cu)], capture_output=True, text=True)
    text = p.stdout + p.stderr
    return p.returncode, text, parse_ptxas(text)


_NVRTC_NAMES = ("libnvrtc.so.13", "libnvrtc.so", "libnvrtc.so.12", "nvrtc64_130_0.dll")


def nvrtc() -> ctypes.CDLL | None:
    """NVRTC, the compiler CuPy's RawModule runs, from the system or the nvidia-cuda-nvrtc
    wheel; None where there is none."""
    spec = importlib.util.find_spec("nvidia")
    wheel = [Path(p) / sub / "lib" for p in (spec.submodule_search_locations or [])
             for sub in ("cu13", "cuda_nvrtc")] if spec else []
    for name in _NVRTC_NAMES:
        for where in ("", *map(str, wheel), "/usr/local/cuda/lib64"):
            try:
                return ctypes.CDLL(str(Path(where) / name) if where else name)
            except OSError:
                continue
    return None


def nvrtc_compile(cu: str, arch: str, lib: ctypes.CDLL) -> tuple[bool, str, list[KernelReport]]:
    """What RawModule compiles (`bundle(cu)`, the runtime's options) through NVRTC for
    `arch`, with ptxas's report. -> (compiled, log, reports)."""
    prog = ctypes.c_void_p()
    src = bundle(cu).encode()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src, cu.encode(), 0, None, None):
        return False, "nvrtcCreateProgram failed", []
    opts = [o.encode() for o in (STD, f"-arch={arch}", "-Xptxas", "-v")]
    try:
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    text = log.value.decode(errors="replace")
    return rc == 0, text, parse_ptxas(text)


_ENTRY = re.compile(r"\.entry (\w+)\(([^)]*)\)")
_PARAM = re.compile(r"\.param \.[us](\d+) ")


def ptx_entries(cu: str, exe: str | None = None) -> dict[str, list[int]]:
    """Each kernel of a file and the bit widths of its parameters, from nvcc's PTX: what
    a launch's arguments must match (pointers and int64 are 64 bits, ints 32)."""
    exe = exe or nvcc()
    if exe is None:
        raise FileNotFoundError("nvcc not found")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "k.ptx"
        p = subprocess.run([exe, STD, "-ptx", f"-arch={ARCHS[-1]}", "-I", str(SOURCES), "-o",
                            str(out), str(SOURCES / cu)], capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(p.stdout + p.stderr)
        ptx = out.read_text()
    return {m.group(1): [int(w) for w in _PARAM.findall(m.group(2))]
            for m in _ENTRY.finditer(ptx)}


def compiler() -> str | None:
    """A host C++ compiler for the harness: $CXX, g++ or c++."""
    for c in (os.environ.get("CXX"), "g++", "c++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def harness_library(cache: Path | None = None) -> Path:
    """The host harness built once per content of its sources (g++ -O2 -shared), in
    `cache` (default: a qmoefmt folder in the system's temporary directory)."""
    cxx = compiler()
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (set CXX, or install g++)")
    h = hashlib.sha256()
    for name in (*HEADERS, HARNESS):
        h.update((SOURCES / name).read_bytes())
    cache = cache or Path(tempfile.gettempdir()) / "qmoefmt-gpu-harness"
    cache.mkdir(parents=True, exist_ok=True)
    lib = cache / f"harness-{h.hexdigest()[:16]}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.partial")
        p = subprocess.run([cxx, STD, "-O2", "-Wall", "-shared", "-fPIC",
                            "-I", str(SOURCES), "-o", str(tmp), str(SOURCES / HARNESS)],
                           capture_output=True, text=True)
        if p.returncode:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"building the host harness failed:\n{p.stdout}{p.stderr}")
        tmp.replace(lib)      # atomic: a concurrent build finds a whole library or none
    return lib
