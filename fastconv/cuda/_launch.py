"""Compiling and launching the CUDA kernels in ``kernels/`` through CuPy.

Every kernel is a C++ template; a *name expression* such as
``conv2d_forward_implicit_gemm<float, int, false, 64, 64, 16, 4, 4>`` names one instantiation.
The engine modules build them with :func:`expr`, and :func:`instantiations` lists every one
the engine can ask for, per source file and dtype: NVRTC compiles exactly that list (one
``cupy.RawModule`` per device, source and dtype, so a float32 model never compiles the
half-precision kernels), and the nvcc test in ``tests/test_kernels_compile.py`` compiles the
same list for sm_80 and sm_90 on machines without a GPU.

Launches go through a *backend*. The real one is CuPy's: NVRTC compiles through CuPy, and
each launch is one ``cuLaunchKernel`` (CuPy's driver binding) on PyTorch's current CUDA stream
of the tensors' device, with the tensors' device pointers passed directly (zero copy);
outputs come from PyTorch's caching allocator. The test suite swaps in a CPU emulator of the
same kernels (``tests/cuda_emulator``) with :func:`use_backend`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from pathlib import Path

import numpy as np
import torch

from . import kernel_dir

#: C++ spelling of each dtype the kernels take.
CTYPES = {
    torch.float32: "float",
    torch.float64: "double",
    torch.float16: "fastconv::half_t",
    torch.bfloat16: "fastconv::bfloat16_t",
}
DTYPES = tuple(CTYPES)
INDEX_TYPES = ("int", "long long")
#: Threads per block of the elementwise and reduction kernels.
THREADS = 256
#: Compute capability the kernels need: mma.sync for bf16 and cvt.rn.bf16 are sm_80+.
MIN_CAPABILITY = (8, 0)
INT32_LIMIT = 2**31 - 1

#: Kernel sources by op (one op, one name: kernels/conv2d.cu serves fastconv.conv2d).
SOURCES = {"conv2d": "conv2d.cu", "pool2d": "pool2d.cu"}
_REGISTRY: dict[str, callable] = {}


@functools.cache  # the launchers ask for the same few names on every call
def expr(name: str, *template_args) -> str:
    """The name expression of one instantiation: ``expr("k", "float", "int", True, 64)``."""
    def spell(a):
        if isinstance(a, bool):
            return "true" if a else "false"
        return str(a)
    return f"{name}<{', '.join(spell(a) for a in template_args)}>"


def register(op: str):
    """Decorator: ``fn(dtype) -> list of name expressions`` that ``op``'s engine may launch."""
    def wrap(fn):
        _REGISTRY[op] = fn
        return fn
    return wrap


def instantiations(op: str, dtype: torch.dtype) -> list[str]:
    """Every name expression of ``op``'s source for ``dtype`` (the engine modules register
    them when ``fastconv.cuda`` is imported)."""
    return list(_REGISTRY[op](dtype))


def index_type(*tensors_or_counts) -> str:
    """``"int"`` when every tensor (or element count) is below 2^31 elements, else
    ``"long long"``: 64-bit arithmetic only where a tensor needs it."""
    biggest = 0
    for t in tensors_or_counts:
        if t is None:
            continue
        biggest = max(biggest, t.numel() if isinstance(t, torch.Tensor) else int(t))
    return "int" if biggest <= INT32_LIMIT else "long long"


def index_scalar(index: str, value: int):
    """``value`` as the kernel's Index type (kernel scalars are passed by exact size)."""
    return np.int32(value) if index == "int" else np.int64(value)


def sm_count(like: torch.Tensor) -> int:
    """Streaming multiprocessors of ``like``'s device (as the active backend reports them)."""
    be = backend()
    return be.sm_count(be.device_index(like))


def source(op: str) -> tuple[Path, str]:
    """(path, code) of ``op``'s kernel file, with a ``#line`` directive so that compiler
    messages name the real file and line rather than CuPy's temporary copy."""
    path = kernel_dir() / SOURCES[op]
    return path, f'#line 1 "{path}"\n' + path.read_text()


# ---- backends ------------------------------------------------------------------------------
class CupyBackend:
    """Launches on the GPU through CuPy; imported lazily so CPU-only machines never load it."""

    def __init__(self):
        import cupy

        self.cupy = cupy
        self._modules: dict = {}
        self._functions: dict = {}
        self._lock = threading.Lock()

    def device_index(self, tensor: torch.Tensor) -> int:
        return tensor.device.index if tensor.device.index is not None \
            else torch.cuda.current_device()

    def sm_count(self, device_index: int) -> int:
        return _sm_count(device_index)

    def _module(self, device_index: int, op: str, dtype: torch.dtype):
        key = (device_index, op, dtype)
        module = self._modules.get(key)
        if module is None:
            path, code = source(op)
            with self.cupy.cuda.Device(device_index):
                module = self.cupy.RawModule(
                    code=code, options=("-std=c++17", f"-I{path.parent}"),
                    name_expressions=instantiations(op, dtype))
                try:
                    module.compile()
                except self.cupy.cuda.compiler.CompileException as exc:
                    raise RuntimeError(f"fastconv: NVRTC failed to compile {path.name} for "
                                       f"{dtype}:\n{exc.get_message()}") from None
            self._modules[key] = module
        return module

    def function(self, device_index: int, op: str, dtype: torch.dtype, name: str) -> int:
        """The CUfunction handle of instantiation ``name`` (compiling its module once)."""
        key = (device_index, op, dtype, name)
        fn = self._functions.get(key)
        if fn is None:
            with self._lock:
                module = self._module(device_index, op, dtype)
                with self.cupy.cuda.Device(device_index):
                    kernel = module.get_function(name)  # a RawKernel; .kernel is its Function
                fn = getattr(kernel, "kernel", kernel).ptr
            self._functions[key] = fn
        return fn

    def launch(self, device_index, op, dtype, name, grid, block, args):
        # cuLaunchKernel itself, not the CuPy kernel object's call, which rebuilds a structured
        # numpy argument's descr (16 Python calls) and enters a device and a stream context on
        # every launch: host time, which is most of a small layer's time on the GPU.
        fn = self.function(device_index, op, dtype, name)
        stream = _raw_stream(device_index)
        storage, params = pack_params(args)  # the driver copies them during the call
        runtime = self.cupy.cuda.runtime
        previous = runtime.getDevice()
        if previous != device_index:
            runtime.setDevice(device_index)
        try:
            self.cupy.cuda.driver.launchKernel(fn, *grid, *block, 0, stream,
                                               ctypes.addressof(params), 0)
        except self.cupy.cuda.driver.CUDADriverError as exc:
            raise RuntimeError(f"fastconv: launching {name} with grid {grid}, block {block} "
                               f"failed: {exc}") from exc
        finally:
            if previous != device_index:
                runtime.setDevice(previous)

    def empty(self, shape, dtype, device) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)


def _raw_stream(device_index: int) -> int:
    """The cudaStream_t of PyTorch's current stream on ``device_index``."""
    return torch.cuda.current_stream(device_index).cuda_stream


if hasattr(torch._C, "_cuda_getCurrentRawStream"):  # the same, without a Stream object
    def _raw_stream(device_index: int) -> int:  # noqa: F811
        return torch._C._cuda_getCurrentRawStream(device_index)


def pack_params(args) -> tuple:
    """cuLaunchKernel's ``kernelParams`` for ``args``: an array of pointers, one per kernel
    parameter, each to a copy of that parameter's bytes. A Python int is a device pointer
    (8 bytes); numpy scalars and size-one structured arrays pass their own bytes (by exact
    size, structs by value). Returns (storage to keep alive until the launch, the array)."""
    blob = bytearray()
    offsets = []
    for a in args:
        if type(a) is int:
            data, align = a.to_bytes(8, "little"), 8
        elif isinstance(a, (np.generic, np.ndarray)):
            data, align = a.tobytes(), a.dtype.alignment
        else:
            raise TypeError(f"fastconv: kernel argument of type {type(a).__name__}: expected a "
                            f"device pointer (int), a numpy scalar or a numpy struct")
        blob += bytes(-len(blob) % align)
        offsets.append(len(blob))
        blob += data
    storage = (ctypes.c_char * len(blob)).from_buffer(blob)  # every kernel takes arguments
    base = ctypes.addressof(storage)
    params = (ctypes.c_void_p * len(offsets))(*[base + o for o in offsets])
    return storage, params


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_override = threading.local()
_cupy_backend: CupyBackend | None = None


def backend():
    """The active backend: a test's :func:`use_backend`, else CuPy."""
    chosen = getattr(_override, "backend", None)
    if chosen is not None:
        return chosen
    global _cupy_backend
    if _cupy_backend is None:
        _cupy_backend = CupyBackend()
    return _cupy_backend


@contextlib.contextmanager
def use_backend(chosen):
    """Run the CUDA engine on ``chosen`` (the tests' CPU emulator) in this thread."""
    previous = getattr(_override, "backend", None)
    _override.backend = chosen
    try:
        yield chosen
    finally:
        _override.backend = previous


def _arg(a):
    if isinstance(a, torch.Tensor):
        return a.data_ptr()
    if a is None:
        return 0  # nullptr
    return a


def launch(op: str, like: torch.Tensor, name: str, grid, block, args) -> None:
    """Launch instantiation ``name`` of ``op``'s source for ``like``'s dtype and device.

    ``args`` may hold tensors (passed as device pointers), None (a null pointer), numpy
    scalars (passed by exact size) and size-one numpy structured arrays (structs by value).
    """
    # An empty problem still gets one block (as CuPy does), whose threads find no work.
    grid = tuple(max(1, int(g)) for g in grid) + (1,) * (3 - len(grid))
    block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
    if grid[0] > 2**31 - 1 or grid[1] > 65535 or grid[2] > 65535:
        raise RuntimeError(f"fastconv: {name}: grid {grid} exceeds CUDA's limits "
                           f"(x < 2^31, y and z <= 65535)")
    be = backend()
    be.launch(be.device_index(like), op, like.dtype, name, grid, block,
              tuple(_arg(a) for a in args))


def launch_over(op: str, like: torch.Tensor, name: str, count: int, args) -> None:
    """Launch a grid-stride kernel over ``count`` elements, THREADS per block: enough blocks
    to fill the device, capped so that each thread of a large launch loops over several
    elements."""
    blocks = max(1, min(-(-count // THREADS), sm_count(like) * 32))
    launch(op, like, name, (blocks,), (THREADS,), args)


def empty(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised output on ``like``'s device from the backend's allocator."""
    return backend().empty(tuple(shape), dtype or like.dtype, like.device)
