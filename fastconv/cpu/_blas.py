"""The GEMM the CPU engine's kernels call: ``gemm(a, b, out)``, out = a @ b, from Numba code.

PyTorch's x86 builds carry Intel MKL inside ``libtorch_cpu`` and export its Fortran BLAS
entry points (``sgemm_``, ``dgemm_``). Measured on the 2-core Xeon (AVX-512), one thread,
float32, GFLOP/s MKL / the OpenBLAS that Numba's ``np.dot`` calls (SciPy's): 1024x512 @ 512x392
156 / 143, 2048x512 @ 512x196 146 / 135, 64x256 @ 256x3136 157 / 105, 64x576 @ 576x3136
155 / 105; and 10-50% more for every GEMM the engine runs (the 1x1 layers, im2col, the
Winograd products). So the kernels call MKL's GEMM where this torch has it, and SciPy's (the
one ``np.dot`` calls) where it does not (aarch64, macOS builds): both are the Fortran BLAS
``?gemm`` ABI, reached through one symbol name per dtype, ``fastconv_sgemm`` /
``fastconv_dgemm``, registered with LLVM below. Compiled code names the symbol, not an
address, so the on-disk cache stays valid whichever library is behind it.

Threads: MKL in ``libtorch_cpu`` runs OpenMP teams of its own, so a GEMM called from a
``prange`` body would put a whole team on every core already busy. ``gemm`` sets MKL's count
for the calling thread around each call (``MKL_Set_Num_Threads_Local``, restored after): one
thread inside a parallel region of several threads, else the count ``parallel_region``
publishes in ``fastconv_blas_threads`` (torch's). SciPy's OpenBLAS keeps its process-wide
count, set by ``parallel_region`` through threadpoolctl, as before.

``gemm`` takes 2-D operands of one float dtype whose rows or columns have unit stride (C or F
arrays, transposed views, blocks of rows and columns of either: BLAS's leading dimensions, no
copy), and an output whose rows have unit stride.
"""

from __future__ import annotations

import ctypes
import os

import llvmlite.binding as llvm_binding
import numpy as np
import torch
from llvmlite import ir
from numba import cfunc, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import (get_cython_function_address, intrinsic, overload,
                              register_jitable)
from numba.np.ufunc.parallel import _launch_threads


def _mkl_library():
    """ctypes handle on the loaded libtorch_cpu if it exports MKL's GEMM and thread control,
    else None."""
    if not torch.backends.mkl.is_available():
        return None
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        path = os.path.join(lib_dir, name)
        if not os.path.exists(path):
            continue
        try:
            lib = ctypes.CDLL(path)  # loaded by ``import torch``: this only returns its handle
            for symbol in ("sgemm_", "dgemm_", "MKL_Set_Num_Threads_Local",
                           "MKL_Get_Version_String"):
                getattr(lib, symbol)
        except (OSError, AttributeError):
            return None
        return lib, path
    return None


_found = None if os.environ.get("FASTCONV_BLAS", "").strip().lower() == "scipy" \
    else _mkl_library()
# The count gemm gives MKL outside a multi-threaded parallel region (see the docstring).
_threads = np.ones(1, dtype=np.int32)
if _found is not None:
    _lib, _path = _found
    NAME = "mkl"
    _addresses = {
        "fastconv_sgemm": ctypes.cast(_lib.sgemm_, ctypes.c_void_p).value,
        "fastconv_dgemm": ctypes.cast(_lib.dgemm_, ctypes.c_void_p).value,
        "fastconv_blas_set_local_threads":
            ctypes.cast(_lib.MKL_Set_Num_Threads_Local, ctypes.c_void_p).value,
    }
else:
    import scipy.linalg.cython_blas  # noqa: F401

    @cfunc(types.int32(types.int32), cache=True)
    def _keep_threads(n):  # in MKL_Set_Num_Threads_Local's place: SciPy's count is global
        return 0

    _path = scipy.linalg.cython_blas.__file__
    NAME = "scipy"
    _addresses = {
        "fastconv_sgemm": get_cython_function_address("scipy.linalg.cython_blas", "sgemm"),
        "fastconv_dgemm": get_cython_function_address("scipy.linalg.cython_blas", "dgemm"),
        "fastconv_blas_set_local_threads": _keep_threads.address,
    }
_addresses["fastconv_blas_threads"] = _threads.ctypes.data
for _symbol, _address in _addresses.items():
    llvm_binding.add_symbol(_symbol, _address)


_launched = False


def set_threads(n: int) -> None:
    """The count of MKL threads a GEMM gets outside a multi-threaded parallel region."""
    global _launched
    if not _launched:  # defines the "get_num_threads" symbol that cached kernels name
        _launch_threads()
        _launched = True
    _threads[0] = max(1, int(n))


@intrinsic
def _region_threads(typingctx):
    """Threads of the parallel region the caller runs in (numba.get_num_threads), read
    through Numba's own symbol: the ``get_num_threads`` overload calls a ctypes pointer,
    which keeps its caller out of the on-disk cache."""
    _launch_threads()

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(cgutils.intp_t, []),
                                            "get_num_threads")
        return builder.call(fn, [])

    return types.intp(), codegen


def info() -> dict:
    """Which library ``gemm`` calls: {"internal_api", "version", "filepath"}."""
    version = None
    if NAME == "mkl":
        buf = ctypes.create_string_buffer(256)
        _lib.MKL_Get_Version_String(buf, len(buf))
        version = buf.value.decode(errors="replace").strip()
    return {"internal_api": NAME, "version": version, "filepath": _path}


@intrinsic
def _xgemm(typingctx, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc, threads):
    """Fortran ``?gemm``: c = a' @ b' + beta*c, column-major, ``trans_*`` ord('N') or ord('T'),
    run with ``threads`` MKL threads on this thread (restored after)."""
    if not (isinstance(a, types.Array) and a.dtype in (types.float32, types.float64)
            and b.dtype == a.dtype and c.dtype == a.dtype):
        return None
    sig = types.void(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc, threads)

    def codegen(context, builder, signature, args):
        dtype = signature.args[5].dtype
        ft = context.get_data_type(dtype)
        i8, i32 = ir.IntType(8), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8.as_pointer()] * 2 + [i32.as_pointer()] * 3
                               + [ft.as_pointer(), ft.as_pointer(), i32.as_pointer(),
                                  ft.as_pointer(), i32.as_pointer(), ft.as_pointer(),
                                  ft.as_pointer(), i32.as_pointer()])
        name = "fastconv_sgemm" if dtype == types.float32 else "fastconv_dgemm"
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        set_threads = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i32, [i32]), "fastconv_blas_set_local_threads")

        def value(i, ty):  # argument i converted to Numba type ty
            return context.cast(builder, args[i], signature.args[i], ty)

        def ref(i, ty):  # Fortran passes every argument by reference
            return cgutils.alloca_once_value(builder, value(i, ty))

        def data(i):
            return context.make_array(signature.args[i])(context, builder, args[i]).data

        previous = builder.call(set_threads, [value(12, types.int32)])
        builder.call(fn, [ref(0, types.int8), ref(1, types.int8), ref(2, types.int32),
                          ref(3, types.int32), ref(4, types.int32),
                          cgutils.alloca_once_value(builder, ft(1.0)), data(5),
                          ref(6, types.int32), data(7), ref(8, types.int32), ref(9, dtype),
                          data(10), ref(11, types.int32)])
        builder.call(set_threads, [previous])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _published_threads(typingctx):
    """``_threads[0]``, read through its symbol (a cached function holds no address)."""
    def codegen(context, builder, signature, args):
        g = builder.module.globals.get("fastconv_blas_threads")
        if g is None:  # a declaration: the address comes from llvm_binding.add_symbol
            g = ir.GlobalVariable(builder.module, ir.IntType(32), "fastconv_blas_threads")
        return builder.load(g)

    return types.int32(), codegen


def gemm(a, b, out, accumulate=False):
    """out = a @ b (``accumulate``: out += a @ b). a (M, K), b (K, N): rows or columns of
    unit stride; out (M, N): rows of unit stride. Numba code only."""
    raise TypeError("fastconv.cpu._blas.gemm is called from Numba-compiled code")


@register_jitable
def _leading(x):
    """(row-major?, leading dimension) of 2-D ``x`` as a BLAS operand: rows of unit stride
    (C-like: a C array, or a block of rows and columns of one), else columns of unit stride
    (F-like: a transposed view); any other stride pattern is refused. A dimension of one
    element may have any stride."""
    rows, cols = x.shape
    size = x.itemsize
    s0, s1 = x.strides
    if (cols <= 1 or s1 == size) and (rows <= 1 or (s0 > 0 and s0 % size == 0
                                                    and s0 // size >= cols)):
        return True, s0 // size if rows > 1 else max(cols, 1)
    if (rows <= 1 or s0 == size) and (cols <= 1 or (s1 > 0 and s1 % size == 0
                                                    and s1 // size >= rows)):
        return False, s1 // size if cols > 1 else max(rows, 1)
    raise ValueError("gemm: an operand has no unit stride (rows or columns must be "
                     "contiguous)")


@overload(gemm)
def _gemm_overload(a, b, out, accumulate=False):
    arrays = (a, b, out)
    if not all(isinstance(x, types.Array) and x.ndim == 2 for x in arrays):
        raise TypingError("gemm: a, b and out must be 2-D arrays")
    if a.dtype not in (types.float32, types.float64) or b.dtype != a.dtype \
            or out.dtype != a.dtype:
        raise TypingError("gemm: a, b and out must share one float dtype")

    def impl(a, b, out, accumulate=False):
        m, k = a.shape
        n = b.shape[1]
        if b.shape[0] != k or out.shape[0] != m or out.shape[1] != n:
            raise ValueError("gemm: shapes do not match")
        if m == 0 or n == 0:
            return
        if k == 0:
            if not accumulate:
                out[:] = 0
            return
        # Row-major out = a @ b is column-major out' = b' @ a': b is the Fortran call's
        # first operand. Row-major memory read column-major is the transpose, which 'N'
        # then wants; a column-major operand (a transposed view) takes 'T'.
        b_rows, ldb = _leading(b)
        a_rows, lda = _leading(a)
        out_rows, ldc = _leading(out)
        if not out_rows:
            raise ValueError("gemm: out must have rows of unit stride")
        threads = 1 if _region_threads() > 1 else _published_threads()
        _xgemm(78 if b_rows else 84, 78 if a_rows else 84, n, m, k, b, ldb, a, lda,
               1.0 if accumulate else 0.0, out, ldc, threads)  # 78, 84: 'N', 'T'

    return impl
