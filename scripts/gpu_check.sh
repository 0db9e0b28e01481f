#!/usr/bin/env bash
# The GPU runtime's checks on a machine with a CUDA GPU (made for the lent H200, whose
# image has python3 with torch, CuPy (cupy-cuda13x), numba, pytest, pytest-xdist and
# hypothesis, and nvcc): the GPU tests, the kernels' compile and host-harness tests, and
# bench/runtime_gpu.py, in under 9 minutes (run it with a 600 s limit). Results go to
# $OUT (else ./gpu-check-out):
#   nvidia-smi.txt  the device          tests.log / tests.xml  pytest's output, junit
#   ptxas.txt       registers / spills  bench.log / bench.json the benchmark
#
#   bash scripts/gpu_check.sh [quick]
#
# The image lacks crc32c (a qmoefmt dependency): carry its wheel in .gpu-wheels/, made
# here with
#   pip download crc32c --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 --no-deps -d .gpu-wheels
# (and .gpu-wheels/ listed in .git/info/exclude, named in the run's carry).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/qmoefmt-numba
quick=${1:-}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
if ! $PY -c "import crc32c" 2>/dev/null; then
    $PY -m pip install -q --no-index --find-links .gpu-wheels crc32c >>"$OUT/nvidia-smi.txt" 2>&1
fi
$PY - >>"$OUT/nvidia-smi.txt" 2>&1 <<'PY'
import cupy, numba, numpy, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
print("cupy", cupy.__version__, "numpy", numpy.__version__, "numba", numba.__version__)
from qmoefmt.backends import cuda
print("qmoefmt GPU runtime available:", cuda.available())
PY

# registers and spills of every kernel as NVRTC (what CuPy compiles with) builds them, in
# the background (the tests report nvcc's)
$PY - >"$OUT/ptxas.txt" 2>&1 <<'PY' &
from qmoefmt.backends import cuda_build as b
lib = b.nvrtc()
if lib is None:
    raise SystemExit("no NVRTC found")
for cu in b.KERNEL_FILES:
    for arch in b.ARCHS:
        ok, log, reports = b.nvrtc_compile(cu, arch, lib)
        if not ok:
            print(f"{arch} {cu}: NVRTC failed\n{log}")
        for r in reports:
            print(f"{arch} {cu:15} {r.name:34} {r.registers:3} registers {r.stack:4} stack "
                  f"{r.spill_stores:4} spill stores {r.spill_loads:4} spill loads")
PY
ptxas=$!

n=$(( $(nproc) < 8 ? $(nproc) : 8 ))
timeout 270 $PY -m pytest -o addopts= -q -rfE -p no:cacheprovider -n "$n" --dist loadfile \
    --junitxml="$OUT/tests.xml" tests/test_gpu_runtime.py tests/test_gpu_backend.py \
    tests/test_gpu_harness.py tests/test_gpu_compile.py 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}

bench_args=(--json "$OUT/bench.json")
[ "$quick" = quick ] && bench_args+=(--quick --reps 5)
timeout 220 $PY bench/runtime_gpu.py "${bench_args[@]}" 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
wait $ptxas
echo "gpu_check: tests exit $tests, bench exit $bench"
exit $(( tests || bench ))
