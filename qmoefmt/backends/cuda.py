"""The CUDA runtime: gpu/*.cu compiled by CuPy's RawModule (NVRTC) on first use and
cached by CuPy, run through cuda_ops on CuPy arrays.

Three faces:
- `CudaBackend`, the decode backend "cuda": numpy in, numpy out (copies both ways), so
  every decode path and the backend suite can run on the GPU;
- `matmul` / `decode` on torch CUDA tensors: in and out through DLPack, never through
  the host, on the caller's stream (torch's current one by default);
- `to_device`, the expert budget's `move` for a GPU (an array's CuPy copy).

CuPy is imported only here, and only when one of these is used.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..codecs.base import RuntimeWeight
from ..errors import MissingExtraError
from . import cuda_build
from .base import DecodeBackend
from .cuda_ops import OUTPUTS, Launch, Ops, Runtime

BLOCK = 256                # threads a block: 8 warps, 8 rows at a time
BLOCKS_PER_SM = 8          # grid cap; warps loop over the rows beyond it
INSTALL_HINT = "pip install 'qmoefmt[gpu]' (CuPy for CUDA 13)"


def cupy():
    try:
        import cupy as cp
    except ImportError as e:
        raise MissingExtraError(f"the GPU runtime needs CuPy ({e}); {INSTALL_HINT}") from None
    return cp


class Device:
    """One GPU's compiled modules, dictionary tables and Runtime."""

    def __init__(self, index: int):
        cp = cupy()
        self.cp, self.index = cp, index
        self.sms = cp.cuda.Device(index).attributes["MultiProcessorCount"]
        self._modules: dict[str, object] = {}
        self._functions: dict[str, object] = {}
        self._tables: dict[str, tuple] = {}
        self.ops = Ops(cp, self.run, self.tables)
        self.runtime = Runtime(self.ops)

    def function(self, name: str):
        """Kernel `name`, its file compiled on first use (NVRTC, cached on disk by CuPy)."""
        f = self._functions.get(name)
        if f is None:
            cu = cuda_build.kernel_file(name)
            if cu not in self._modules:
                # the headers inlined: CuPy's kernel cache keys on the source text alone
                self._modules[cu] = self.cp.RawModule(code=cuda_build.bundle(cu),
                                                      options=(cuda_build.STD,))
            f = self._functions[name] = self._modules[cu].get_function(name)
        return f

    def run(self, launch: Launch) -> None:
        """Launches on CuPy's current stream; one warp a row, the grid capped (the kernels'
        warps loop over rows)."""
        if not launch.rows:
            return
        warps = BLOCK // 32
        grid = min(-(-launch.rows // warps), self.sms * BLOCKS_PER_SM)
        args = tuple(v if k == "p" else (np.int32(v) if k == "i" else np.int64(v))
                     for k, v in launch.args)
        with self.cp.cuda.Device(self.index):
            self.function(launch.name)((grid,), (BLOCK,), args, shared_mem=launch.shared)

    def tables(self, d) -> tuple:
        """Dictionary d's records and next states on this GPU, copied once per dictionary
        (8 bytes x 65,536 x S and 65,536 x S bytes: in global memory, L2-resident)."""
        t = self._tables.get(d.content_id)
        if t is None:
            with self.cp.cuda.Device(self.index):
                t = (self.cp.asarray(np.ascontiguousarray(d.runtime_records()[0])),
                     self.cp.asarray(np.ascontiguousarray(d.runtime_next())))
            self._tables[d.content_id] = t
        return t


def device(index: int | None = None) -> Device:
    """The Device of GPU `index` (None: CuPy's current one), made once a GPU."""
    return _device(cupy().cuda.Device().id if index is None else index)


@lru_cache(maxsize=None)
def _device(index: int) -> Device:
    return Device(index)


def available() -> bool:
    """Whether CuPy imports and sees a GPU."""
    try:
        return cupy().cuda.runtime.getDeviceCount() > 0
    except Exception:          # no driver, no device, no CuPy: all mean "no GPU here"
        return False


def to_device(a: np.ndarray, index: int | None = None):
    """An array's copy on GPU `index` (None: the current one): the expert budget's move."""
    cp = cupy()
    with cp.cuda.Device(cp.cuda.Device().id if index is None else index):
        return cp.asarray(a)


# ---------------------------------------------------------------- torch tensors


def _torch_stream(index: int, stream):
    """CuPy's view of the stream to run on: `stream` (a torch.cuda.Stream, or a raw
    cudaStream_t as an int), else torch's current stream on GPU `index`."""
    import torch
    if stream is None:
        stream = torch.cuda.current_stream(index)
    ptr = stream if isinstance(stream, int) else stream.cuda_stream
    return cupy().cuda.ExternalStream(ptr, index)


def on_device(weight: RuntimeWeight, index: int) -> bool:
    """Whether every array of `weight` is a CuPy array on GPU `index`."""
    cp = cupy()
    return all(isinstance(a, cp.ndarray) and a.device.id == index
               for a in weight.arrays().values())


def matmul(weight: RuntimeWeight, x, stream=None):
    """Y = X W^T for a torch CUDA tensor x [..., in] (any float dtype): float32 [..., out],
    fp32 accumulation, on `stream` (default: torch's current stream). `weight`'s arrays
    must be on x's GPU (`weight.copy(to_device)`, or an ExpertCache on "cuda")."""
    import torch
    cp = cupy()
    index = x.device.index
    if not on_device(weight, index):
        raise ValueError(f"{weight.where}: the weight's arrays are not on cuda:{index} "
                         "(copy it with weight.copy(cuda.to_device) or use an ExpertCache)")
    flat = x.detach().reshape(-1, weight.shape[1]).to(torch.float32).contiguous()
    with cp.cuda.Device(index), _torch_stream(index, stream):
        y = device(index).runtime.matmul(weight, cp.from_dlpack(flat))
        out = torch.from_dlpack(y)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def decode(weight: RuntimeWeight, dtype: str = "float32", index: int | None = None,
           stream=None):
    """The dense weight [out, in] as a torch CUDA tensor of `dtype` (float32, float16 or
    bfloat16, the latter two rounded to nearest even), decoded on GPU `index` (default:
    the one holding the weight's arrays)."""
    import torch
    cp = cupy()
    if dtype not in OUTPUTS:
        raise ValueError(f"dtype must be one of {sorted(OUTPUTS)}, not {dtype!r}")
    index = next(iter(weight.arrays().values())).device.id if index is None else index
    with cp.cuda.Device(index), _torch_stream(index, stream):
        out = torch.from_dlpack(device(index).runtime.decode(weight, dtype))
    # float16 and bfloat16 come as their bits (CuPy has no bfloat16)
    return out if dtype == "float32" else out.view(getattr(torch, dtype))


# ---------------------------------------------------------------- the decode backend


class CudaBackend(DecodeBackend):
    """The kernels behind the numpy DecodeBackend interface: inputs copied to the current
    GPU, outputs copied back (in its default stream, so each call ends synchronised)."""
    name = "cuda"

    def _dev(self) -> Device:
        return device()

    def ternary_symbols(self, codes, offsets, cols, d, out, status) -> None:
        self._stream_op("ternary_symbols", codes, offsets, cols, d, (), out, status)

    def ternary_values(self, codes, offsets, cols, d, lo, hi, out, status) -> None:
        self._stream_op("ternary_values", codes, offsets, cols, d, (lo, hi), out, status)

    def _stream_op(self, op, codes, offsets, cols, d, scales, out, status) -> None:
        dev = self._dev()
        cp = dev.cp
        o, s = cp.empty(out.shape, out.dtype), cp.zeros(status.shape, np.uint8)
        getattr(dev.ops, op)(cp.asarray(codes), cp.asarray(offsets), cols, d,
                             *map(cp.asarray, scales), o, s)
        out[...] = o.get()
        status[...] = s.get()

    def ternary_matmul(self, codes, offsets, cols, d, lo, hi, xt, y, status) -> None:
        dev = self._dev()
        cp = dev.cp
        yd, s = cp.zeros(y.shape, np.float32), cp.zeros(status.shape, np.uint8)
        dev.ops.ternary_matmul(cp.asarray(codes), cp.asarray(offsets), cols, d, cp.asarray(lo),
                               cp.asarray(hi), cp.asarray(xt).T, yd, s)
        y[...] = yd.get()
        status[...] = s.get()

    def kbit_matmul(self, packed, bits, cols, group_size, scales, zeros, xt, y, bad) -> None:
        dev = self._dev()
        cp = dev.cp
        yd, b = cp.zeros(y.shape, np.float32), cp.zeros(bad.shape, np.uint8)
        dev.ops.kbit_matmul(cp.asarray(packed), bits, cols, group_size, cp.asarray(scales),
                            cp.asarray(zeros), cp.asarray(xt).T, yd, b)
        y[...] = yd.get()
        bad[...] = b.get()

    def unpack_levels(self, packed, bits, cols, out, bad) -> None:
        dev = self._dev()
        cp = dev.cp
        o, b = cp.empty(out.shape, np.uint8), cp.zeros(bad.shape, np.uint8)
        dev.ops.unpack_levels(cp.asarray(packed), bits, cols, o, b)
        out[...] = o.get()
        bad[...] = b.get()


__all__ = ["CudaBackend", "available", "decode", "device", "matmul", "to_device"]
