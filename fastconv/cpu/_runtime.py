"""How the Numba engine shares the machine with PyTorch and BLAS.

Three hazards, each handled here once for every CPU kernel:

* Thread count. fastconv uses ``torch.get_num_threads()`` threads, like any PyTorch op. With
  the OpenMP threading layer Numba may share torch's ``libgomp.so.1``, and
  ``numba.set_num_threads`` then calls ``omp_set_num_threads``, which silently changes
  torch's own count; so the count is set to torch's and torch's is restored if it moved.
* Oversubscription. Kernels call BLAS (``_blas.gemm``: MKL from libtorch_cpu, else SciPy's
  OpenBLAS) from inside ``prange`` loops; BLAS must then run single-threaded. When there are
  fewer work items than threads, the items run one at a time and BLAS gets the threads
  instead.
* Concurrency. Numba's ``workqueue`` layer aborts the process when two Python threads enter
  parallel code at once. fastconv asks for ``tbb`` or ``omp`` first (unless the user chose a
  layer) and serialises its calls with a lock if ``workqueue`` is what Numba ended up with.
* Nesting. A kernel with fewer work items than threads runs them one at a time and gives BLAS
  the threads, but not from inside a parallel launch: MKL's OpenMP team started from within a
  Numba region of one thread is a nested team (one libgomp serves both here), and after a
  region of two threads it stalled for a scheduler time slice. Measured on the EPYC, 2
  threads, a (150x16) @ (16x100) GEMM right after a two-thread kernel: 7.7 ms from a
  one-thread region, 22 us from serial code; a batch-1 LeNet conv2 forward+backward took 8.0
  ms against PyTorch's 0.27. So every top-level kernel is compiled twice
  (``parallel_kernel``), and ``parallel_region`` picks the serial build where it would run one
  thread.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import threading
import types

import numba
import numpy as np
import torch

from . import _blas

if "NUMBA_THREADING_LAYER" not in os.environ and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
    # Only reorders the default search; an explicit user choice wins.
    numba.config.THREADING_LAYER_PRIORITY = ["tbb", "omp", "workqueue"]

_launch_lock = threading.Lock()
_layer: str | None = None
_scipy_blas = None  # threadpoolctl controllers for SciPy's BLAS, where gemm calls it


def threading_layer() -> str | None:
    """The Numba threading layer in use, or None before any parallel kernel has run."""
    global _layer
    if _layer is None:
        try:
            _layer = numba.threading_layer()
        except ValueError:  # not launched yet
            return None
    return _layer


def _scipy_blas_libs():
    """threadpoolctl handles on SciPy's BLAS where ``_blas.gemm`` calls it (no MKL in this
    torch), else none: MKL's count is set per call, inside the kernels (see _blas)."""
    global _scipy_blas
    if _scipy_blas is None:
        if _blas.NAME != "scipy":
            _scipy_blas = []
            return _scipy_blas
        import scipy.linalg.cython_blas  # noqa: F401  (loads the library gemm calls)
        from threadpoolctl import ThreadpoolController

        _scipy_blas = [
            lib for lib in ThreadpoolController().select(user_api="blas").lib_controllers
            if "scipy" in os.path.basename(os.path.dirname(lib.filepath))]
    return _scipy_blas


def blas_info() -> list[dict]:
    """Library, version, file and thread count (outside parallel kernels) of the BLAS the CPU
    engine's GEMMs call."""
    if _blas.NAME == "scipy":
        return [lib.info() for lib in _scipy_blas_libs()]
    return [{**_blas.info(), "num_threads": engine_threads()}]


def _cache_sizes() -> dict[int, int]:
    """{level: bytes} of cpu0's data and unified caches as Linux sysfs lists them ("2048K");
    a level that cannot be read is left out."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    sizes: dict[int, int] = {}
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return sizes
    for entry in entries:
        if not entry.startswith("index"):
            continue
        path = os.path.join(base, entry)
        try:
            with open(os.path.join(path, "level")) as f:
                level = int(f.read().strip())
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            if kind not in ("Unified", "Data"):
                continue
            with open(os.path.join(path, "size")) as f:
                size = f.read().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            sizes[level] = int(size.rstrip("KMG")) * scale
        except (OSError, ValueError):
            continue
    return sizes


@functools.cache
def l2_bytes() -> int:
    """One core's L2 cache in bytes (Linux sysfs), or 1 MiB where it cannot be read: what the
    kernels' cache-blocked buffers are sized from."""
    return _cache_sizes().get(2, 1 << 20)


@functools.cache
def llc_bytes() -> int:
    """The last-level cache in bytes (the highest level sysfs lists; on a virtual machine,
    what the hypervisor reports, shared with other tenants), or 0 where it cannot be read."""
    sizes = _cache_sizes()
    return sizes[max(sizes)] if sizes else 0


def engine_threads(torch_threads: int | None = None) -> int:
    """Threads the CPU engine uses: torch's count (``torch_threads``, when the caller has
    already asked torch), capped by Numba's pool size."""
    if torch_threads is None:
        torch_threads = torch.get_num_threads()
    return max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))


class _Region(threading.local):
    serial = False  # inside a parallel_region that runs one Numba thread (per Python thread)


_region = _Region()


class parallel_kernel:  # noqa: N801 - a decorator
    """``@parallel_kernel``: a Numba kernel with ``prange`` loops, compiled (lazily, each cached
    on disk) both ``parallel=True`` and as plain serial code, where ``prange`` is ``range``.
    A call runs the serial build inside a ``parallel_region`` of one Numba thread (see
    "Nesting" above), else the parallel one. Only for kernels called from Python; Numba code
    calls ``.parallel`` or a plain ``njit`` function."""

    def __new__(cls, fn=None, **options):
        """``@parallel_kernel`` or ``@parallel_kernel(**njit options)``."""
        if fn is None:
            return functools.partial(cls, **options)
        return super().__new__(cls)

    def __init__(self, fn, **options):
        self._fn = self.__wrapped__ = fn
        self._options = options
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__
        self.parallel = numba.njit(cache=True, parallel=True, **options)(fn)
        self._serial = None

    @property
    def serial(self):
        if self._serial is None:
            fn = self._fn
            # A copy under its own qualified name: Numba's disk cache is keyed by it, and the
            # two builds of one function would overwrite each other's index.
            copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__,
                                      fn.__defaults__, fn.__closure__)
            copy.__qualname__ = fn.__qualname__ + "__serial"
            copy.__module__, copy.__doc__ = fn.__module__, fn.__doc__
            self._serial = numba.njit(cache=True, nogil=True, **self._options)(copy)
        return self._serial

    def __call__(self, *args):
        return (self.serial if _region.serial else self.parallel)(*args)

    def __getattr__(self, name):
        # The rest of a dispatcher's interface (py_func, targetoptions, signatures,
        # inspect_asm...) is the parallel build's.
        if name.startswith("_") or name == "parallel":
            raise AttributeError(name)
        return getattr(self.parallel, name)


class parallel_region:  # noqa: N801 - used like a function: ``with parallel_region(n):``
    """Run one Numba parallel kernel with ``items`` independent work items.

    Yields the number of threads the kernel's ``prange`` will use. Numba runs ``prange`` with
    torch's thread count when there are enough items; otherwise with one thread and BLAS gets
    torch's count instead, so exactly torch's count of cores is ever busy. A class rather
    than a generator context manager, and counts set only when they change: this runs on
    every engine call, and a tiny conv's whole kernel takes a few microseconds.
    """

    __slots__ = ("items", "torch_threads", "saved_numba", "saved_blas", "lock", "was_serial")

    def __init__(self, items: int):
        self.items = items

    def __enter__(self) -> int:
        self.torch_threads = torch.get_num_threads()
        threads = engine_threads(self.torch_threads)
        numba_threads = threads if self.items >= threads else 1
        blas_threads = 1 if numba_threads > 1 else threads
        self.lock = _launch_lock if _layer in (None, "workqueue") else None
        if self.lock is not None:
            self.lock.acquire()
        # Numba's count is per Python thread and only this region sets it: None when it was
        # already right, so the exit need not ask again (~0.7 us a call).
        self.saved_numba = numba.get_num_threads()
        if self.saved_numba != numba_threads:
            numba.set_num_threads(numba_threads)
        else:
            self.saved_numba = None
        _blas.set_threads(threads)
        self.was_serial = _region.serial
        _region.serial = numba_threads == 1
        self.saved_blas = []
        for lib in _scipy_blas_libs():
            current = lib.num_threads
            if current != blas_threads:
                lib.set_num_threads(blas_threads)
                self.saved_blas.append((lib, current))
        return numba_threads

    def __exit__(self, *exc) -> bool:
        try:
            _region.serial = self.was_serial
            for lib, n in self.saved_blas:
                lib.set_num_threads(n)
            if self.saved_numba is not None:
                numba.set_num_threads(self.saved_numba)
            threading_layer()
            if torch.get_num_threads() != self.torch_threads:
                torch.set_num_threads(self.torch_threads)
        finally:
            if self.lock is not None:
                self.lock.release()
        return False


# ------------------------------------------------------------------------ glibc's heap
# The kernels' own temporaries (Winograd's transform planes, im2col chunks, phase planes: from
# a few hundred KiB to a few MiB per work item) come from malloc, as do PyTorch's CPU tensors.
# Left alone, glibc pays for such blocks in page faults, call after call, two ways:
# * a block over its mmap threshold is a fresh mapping, unmapped on free. The threshold starts
#   at 128 KiB and rises to a freed mapping's size (at most 32 MiB) the first time one is
#   freed, so until some large tensor dies every temporary faults on each page: a fresh
#   process's dilated 3x3 layer (64 channels, 56x56, batch 8) ran Winograd F(4x4) in
#   12.5-17.6 ms (~1300 faults a call) instead of 4.2-4.5 (Xeon), and the autotuner ranked it so;
# * the heap's free top is returned to the system (trimmed) once it exceeds twice that
#   threshold, at most 64 MiB. A training step whose temporaries stack higher than that (one
#   1x1 256->64 layer's backward at batch 8 takes ~90 MB) gives its pages back at the end of
#   every call and faults them in again on the next: PyTorch's own forward+backward of that
#   layer took 33-51 ms with ~22,000 faults a call, 19-21 ms with none (EPYC; how many of its
#   blocks landed on the trimmed top, and so its speed, also depended on what else the process
#   had allocated: 36 ms in a bare process, 46-51 after fastconv's kernels were loaded).
# So importing the engine fixes both thresholds: blocks under 32 MiB (glibc's own largest
# threshold) come from the heap, and up to FASTCONV_MALLOC_KEEP_MB (default 512) of free heap
# top stays mapped. Process-wide, PyTorch's tensors included, as jemalloc's or tcmalloc's
# retention would be; the cost is resident memory that a peak leaves behind, which
# ``fastconv.cpu.empty_cache()`` returns (malloc_trim). FASTCONV_MALLOC_KEEP_MB=0 leaves
# malloc's settings alone.
_MMAP_THRESHOLD = 32 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


def _malloc_keep_limit() -> int:
    raw = os.environ.get("FASTCONV_MALLOC_KEEP_MB", "512")
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb >= 0:  # also refuses nan
        raise ValueError(f"FASTCONV_MALLOC_KEEP_MB must be a number of MiB >= 0 (0 leaves "
                         f"glibc's malloc settings alone), got {raw!r}")
    return int(mb * (1 << 20))


@functools.cache
def _glibc():
    """The C library through ctypes where it is glibc, else None."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def _tune_malloc() -> int:
    """Set glibc's mmap and trim thresholds (see above); the bytes of free heap top it may
    keep, or 0 where malloc was left alone (turned off, or not glibc)."""
    keep = _malloc_keep_limit()
    libc = _glibc()
    if keep == 0 or libc is None:
        return 0
    keep = min(keep, (1 << 31) - 1)  # mallopt takes an int
    if not (libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
            and libc.mallopt(_M_TRIM_THRESHOLD, keep)):
        return 0
    return keep


MALLOC_KEEP = _tune_malloc()


def trim_heap() -> None:
    """Return the free heap memory glibc kept mapped (``malloc_trim(0)``), where fastconv
    tuned it."""
    if MALLOC_KEEP:
        _glibc().malloc_trim(0)


# ---------------------------------------------------------------------------- output memory
# A fresh multi-megabyte tensor is a fresh mmap: its first write takes one page fault per 4 KiB
# page, and the kernel zeroes every page first. On this class of machine that costs more than
# the kernel that writes it (a 100 MB pooling gradient: ~30 ms of faults, ~8 ms of kernel), and
# PyTorch's CPU allocator pays it on every call: glibc unmaps a freed buffer of 32 MiB and up
# (its largest mmap threshold) at once. So outputs that large come from a cache of mappings
# instead, recycled when the tensor on them dies, as PyTorch's CUDA caching allocator does on
# the GPU: a training loop's second step reuses its first step's pages, already mapped
# (the 100 MB gradient: ~4.5 ms less per call). Fresh mappings are advised to use transparent
# huge pages (512x fewer faults where THP is in "madvise" mode, the common default).
# Outputs from 4 MiB up take the cache too: glibc keeps smaller buffers in its heap without
# faults, but PyTorch asks it for 64-byte-aligned blocks, which it often cannot carve from the
# block just freed, so a call's output lands at fresh heap addresses, cold in every cache (a
# 25 MB tensor allocated and freed eight times took eight addresses, each 25 MB above the
# last). Measured on the Xeon, from 32 / from 4 MiB, forward+backward of 32x64x56x56: average
# pooling 2x2/s2 2.63-2.72 / 2.32-2.38 ms, max pooling 3x3/s1 11.5-11.8 / 10.5-10.9 ms;
# fastconv bench, two alternating runs each, the geometric mean of the 11 convolutions'
# times: forward 2.80-2.88 / 2.60-2.72 ms, forward+backward 11.4-11.6 / 10.7-11.1 ms.
#
# A recycled tensor wraps its mapping as ``torch.from_numpy`` does, so its storage cannot be
# resized (``resize_`` to a larger size raises); everything else is an ordinary tensor.
# FASTCONV_CACHE_MB caps the bytes held idle (default 1024; 0 turns recycling off, and then
# outputs are torch.empty, huge-page advised from 32 MiB); FASTCONV_HUGE_PAGES=0 turns the
# advice off. ``fastconv.cpu.empty_cache()`` returns idle mappings to the system.
_HUGE = 2 << 20
_CACHE_FROM = 4 << 20
# With recycling off, only outputs this large are advised, each call: advice on every fresh
# 25 MB stem output made its forward swing between ~20 and ~45 ms (a recycled block is
# advised once, when first mapped).
_ADVISE_FROM = 32 << 20


@functools.cache
def _load_madvise():
    """(libc madvise, MADV_HUGEPAGE), or None where unavailable or turned off."""
    if os.environ.get("FASTCONV_HUGE_PAGES", "1") == "0" or not hasattr(os, "uname") \
            or os.uname().sysname != "Linux":
        return None
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        return fn, mmap.MADV_HUGEPAGE
    except (AttributeError, OSError):
        return None


def _advise(start: int, nbytes: int) -> None:
    """Ask for huge pages on the 2 MiB-aligned part of [start, start + nbytes)."""
    advise = _load_madvise()
    if advise:
        lo, hi = (start + _HUGE - 1) & ~(_HUGE - 1), (start + nbytes) & ~(_HUGE - 1)
        if hi > lo:
            advise[0](lo, hi - lo, advise[1])  # a refused hint changes nothing


def _cache_limit() -> int:
    raw = os.environ.get("FASTCONV_CACHE_MB", "1024")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"FASTCONV_CACHE_MB must be a number of MiB (0 turns the output cache "
                         f"off), got {raw!r}") from None
    return max(0, int(mb * (1 << 20)))


class _OutputCache:
    """Idle mappings, oldest first, at most ``limit`` bytes. ``take`` hands one out; the
    lease object that owns it while a tensor uses it gives it back from its ``__del__``."""

    def __init__(self):
        self.limit = _cache_limit()
        self.idle: list[np.ndarray] = []
        self.idle_bytes = 0
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def take(self, nbytes: int) -> np.ndarray:
        size = (nbytes + _HUGE - 1) & ~(_HUGE - 1)  # round up so near sizes share blocks
        with self.lock:
            for i in range(len(self.idle) - 1, -1, -1):  # newest first: likeliest still hot
                if self.idle[i].nbytes == size:
                    block = self.idle.pop(i)
                    self.idle_bytes -= size
                    self.hits += 1
                    return block
            self.misses += 1
        m = mmap.mmap(-1, size)
        block = np.frombuffer(m, dtype=np.uint8)  # owns the mapping: unmapped when it dies
        _advise(block.ctypes.data, size)
        return block

    def give_back(self, block: np.ndarray) -> None:
        # From __del__, which may run inside ``take`` on this very thread (a collection
        # triggered there): never wait for the lock; a block not taken back is just unmapped.
        if not self.lock.acquire(blocking=False):
            return
        try:
            if block.nbytes > self.limit:
                return
            self.idle.append(block)
            self.idle_bytes += block.nbytes
            while self.idle_bytes > self.limit:
                self.idle_bytes -= self.idle.pop(0).nbytes
        finally:
            self.lock.release()

    def clear(self) -> None:
        with self.lock:
            self.idle.clear()
            self.idle_bytes = 0


_cache = _OutputCache()
if hasattr(os, "register_at_fork"):  # a fork while another thread holds the lock
    os.register_at_fork(after_in_child=lambda: setattr(_cache, "lock", threading.Lock()))


class _Lease:
    """Base object of a recycled tensor's array (NumPy's array interface): alive exactly as
    long as some tensor or array uses the block."""

    __slots__ = ("block", "__array_interface__")

    def __init__(self, block: np.ndarray, shape: tuple, typestr: str):
        self.block = block
        self.__array_interface__ = {"data": (block.ctypes.data, False), "shape": shape,
                                    "typestr": typestr, "version": 3}

    def __del__(self):
        try:
            _cache.give_back(self.block)
        except Exception:  # noqa: BLE001 - interpreter shutdown: module globals may be gone
            pass


def empty_cache() -> None:
    """Unmap the idle output memory the CPU engine holds for reuse (see ``cache_info``), and
    return the free heap memory glibc keeps mapped under fastconv's settings (see "glibc's
    heap" above)."""
    _cache.clear()
    trim_heap()


def cache_info() -> dict:
    """The CPU engine's output cache: ``limit`` and ``idle`` bytes, idle ``blocks``, and
    ``hits``/``misses`` (large outputs served from it / freshly mapped)."""
    with _cache.lock:
        return dict(limit=_cache.limit, idle=_cache.idle_bytes, blocks=len(_cache.idle),
                    hits=_cache.hits, misses=_cache.misses)


@functools.cache
def _typestr(dtype: torch.dtype) -> str:
    return torch.empty(0, dtype=dtype).numpy().dtype.str


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty`` for an output the engine is about to write in full; one of
    ``_CACHE_FROM`` (4 MiB) and up comes from the output cache (see above)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _CACHE_FROM:
        return torch.empty(shape, dtype=dtype)
    if _cache.limit == 0:
        t = torch.empty(shape, dtype=dtype)
        if nbytes >= _ADVISE_FROM:
            _advise(t.data_ptr(), nbytes)
        return t
    typestr = _typestr(dtype)
    return torch.from_numpy(np.asarray(_Lease(_cache.take(nbytes), shape, typestr)))


# ------------------------------------------------------------------- half-precision dtypes
_HALF = (torch.float16, torch.bfloat16)


def _round(t, dtype):
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t


def float32_for_half(fn):
    """Make an engine entry point take float16/bfloat16 tensors: Numba has neither type, so
    they are widened to float32 (exactly), computed there, and each floating result is rounded
    once to the input's dtype, as PyTorch's CPU kernels accumulate half types in float32."""

    @functools.wraps(fn)
    def entry(*args, **kwargs):
        # Every entry point's first argument is a tensor of the op's dtype.
        half = args[0].dtype
        if half not in _HALF:
            return fn(*args, **kwargs)
        out = fn(*(a.float() if isinstance(a, torch.Tensor) and a.dtype in _HALF else a
                   for a in args), **kwargs)
        return tuple(_round(o, half) for o in out) if isinstance(out, tuple) \
            else _round(out, half)

    return entry

