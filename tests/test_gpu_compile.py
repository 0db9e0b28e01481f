"""Every CUDA kernel file compiles with the local nvcc for sm_80 and sm_90, with no
register spills (ptxas -v), and defines every kernel the Python side launches. Skips
where nvcc is absent (CI installs none)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from qmoefmt.backends import cuda_build
from qmoefmt.backends.cuda_ops import INDEX_SUFFIX, OUTPUTS, WIDTHS

NVCC = cuda_build.nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")
PAIRS = [(cu, arch) for cu in cuda_build.KERNEL_FILES for arch in cuda_build.ARCHS]


@pytest.fixture(scope="module")
def compiled():
    """(file, arch) -> (returncode, output, reports), compiled two at a time."""
    with ThreadPoolExecutor(2) as pool:
        done = pool.map(lambda p: cuda_build.compile_kernels(*p, exe=NVCC), PAIRS)
        return dict(zip(PAIRS, done))


def launched_kernels() -> set[str]:
    """Every kernel name cuda_ops can launch."""
    out = {OUTPUTS[d][0] for d in OUTPUTS}
    idx = set(INDEX_SUFFIX.values())
    return ({"qm_ternary_symbols", "qm_unpack_levels"}
            | {f"qm_ternary_values_{s}" for s in out} | {f"qm_kbit_values_{s}" for s in out}
            | {f"qm_ternary_matmul_b{w}" for w in WIDTHS} | {f"qm_kbit_matmul_b{w}" for w in WIDTHS}
            | {f"qm_dict_values_{s}_{i}" for s in out for i in idx}
            | {f"qm_escape_corrections_b{w}_{i}" for w in WIDTHS for i in idx})


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("cu,arch", PAIRS)
def test_compiles_without_spills(compiled, cu, arch):
    rc, text, reports = compiled[cu, arch]
    assert rc == 0, text
    assert "warning" not in text.lower(), text
    assert reports, text
    spilled = [r for r in reports if r.spill_stores or r.spill_loads]
    assert not spilled, "\n".join(f"{r.name}: {r.spill_stores} bytes spill stores, "
                                  f"{r.spill_loads} bytes spill loads" for r in spilled)


@needs_nvcc
@pytest.mark.slow
def test_every_launched_kernel_is_defined_where_the_runtime_looks(compiled):
    defined = {(r.name, cu) for (cu, arch), (_, _, reps) in compiled.items() for r in reps}
    for name in launched_kernels():
        assert (name, cuda_build.kernel_file(name)) in defined, name


NVRTC = cuda_build.nvrtc()


@pytest.mark.skipif(NVRTC is None, reason="NVRTC not found (the nvidia-cuda-nvrtc wheel has it)")
@pytest.mark.slow
@pytest.mark.parametrize("cu,arch", PAIRS)
def test_what_cupy_compiles_compiles_with_nvrtc(cu, arch):
    """The runtime's own compile path (NVRTC, no host compiler, no standard headers) on
    the bundled text CuPy gets, with no spills either."""
    ok, log, reports = cuda_build.nvrtc_compile(cu, arch, NVRTC)
    assert ok, log
    assert reports and not [r for r in reports if r.spill_stores or r.spill_loads], log


def test_ptxas_report_is_parsed_spills_included():
    """The spill check reads what ptxas prints (so a spill would fail the test above)."""
    text = """ptxas info    : Compiling entry function 'qm_a' for 'sm_90'
ptxas info    : Function properties for qm_a
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 48 registers, used 1 barriers, 464 bytes cmem[0]
ptxas info    : Compiling entry function 'qm_b' for 'sm_90'
ptxas info    : Function properties for qm_b
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, 464 bytes cmem[0]
"""
    a, b = cuda_build.parse_ptxas(text)
    assert (a.name, a.registers, a.spill_stores, a.spill_loads) == ("qm_a", 48, 0, 0)
    assert (b.name, b.registers, b.spill_stores, b.spill_loads, b.stack) == ("qm_b", 255, 8, 12, 24)


def test_bundle_inlines_each_header_once():
    """What CuPy compiles: one self-contained text per file (its cache keys on the text)."""
    for cu in cuda_build.KERNEL_FILES:
        text = cuda_build.bundle(cu)
        assert '#include "' not in text and "#pragma once" not in text
        assert text.count("struct DeviceWarp {") == 1


def every_launch() -> list:
    """The Launch of every kernel the runtime can ask for, recorded, not run."""
    import numpy as np

    from qmoefmt.backends import cuda_host
    from qmoefmt.backends.cuda_ops import Ops
    from qmoefmt.testing.reference import dictionary
    launches = []
    ops = Ops(np, launches.append, cuda_host.tables)
    d = dictionary("qmoe-2023")
    rows, cols = 2, 8
    codes, offsets = np.zeros(4, np.uint16), np.array([0, 2, 4], np.int64)
    lo = hi = sc = np.ones((rows, 1), np.float32)
    zeros, q = np.ones((rows, 1), np.uint8), np.zeros((rows, 2), np.uint8)
    status, ends = np.zeros(rows, np.uint8), np.array([0, 1, 2], np.int64)
    ops.ternary_symbols(codes, offsets, cols, d, np.zeros((rows, cols), np.int8), status)
    ops.unpack_levels(q, 2, cols, np.zeros((rows, cols), np.uint8), status)
    for dtype, (_, _, store) in OUTPUTS.items():
        out = np.zeros((rows, cols), store)
        ops.ternary_values(codes, offsets, cols, d, lo[:, 0], hi[:, 0], out, status, dtype)
        ops.kbit_values(q, 2, cols, cols, sc, zeros, out, status, dtype)
        for idx in (np.uint16, np.uint32):
            ops.dict_values(np.zeros((rows, cols), np.int8), 2, cols, sc, zeros, ends,
                            np.zeros(2, idx), np.zeros(2, np.uint8), out, status, dtype)
    for w in WIDTHS:
        x, y = np.zeros((w, cols), np.float32), np.zeros((w, rows), np.float32)
        ops.ternary_matmul(codes, offsets, cols, d, lo[:, 0], hi[:, 0], x, y, status)
        ops.kbit_matmul(q, 2, cols, cols, sc, zeros, x, y, status)
        for idx in (np.uint16, np.uint32):
            ops.escape_corrections(cols, 2, cols, sc, zeros, ends, np.zeros(2, idx),
                                   np.zeros(2, np.uint8), x, y)
    return launches


@needs_nvcc
@pytest.mark.slow
def test_launch_arguments_match_the_kernels_parameters():
    """The host harness proves the drivers with the Launch arguments; the device kernels
    must take the same ones: same count, 64-bit where a pointer or int64 goes, 32 where an
    int. (The harness functions are the kernels' parameters after their selectors.)"""
    entries = {}
    for cu in cuda_build.KERNEL_FILES:
        entries.update(cuda_build.ptx_entries(cu, NVCC))
    launches = every_launch()
    assert {ln.name for ln in launches} == launched_kernels()
    for ln in launches:
        want = [32 if kind == "i" else 64 for kind, _ in ln.args]
        assert entries[ln.name] == want, ln.name
