"""fastconv.cpu._blas: the GEMM the CPU kernels call (MKL from libtorch_cpu, else SciPy's)."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from numba import njit, prange
from numba.core.errors import TypingError

from fastconv.cpu import _blas
from fastconv.cpu import _runtime
from fastconv.cpu._runtime import blas_info, engine_threads, parallel_kernel, parallel_region

ROOT = Path(__file__).resolve().parents[1]


@njit
def _gemm(a, b, out, accumulate):
    _blas.gemm(a, b, out, accumulate)


SHAPES = [(1, 1, 1), (3, 5, 7), (17, 129, 33), (64, 300, 5), (2, 1, 40), (0, 3, 4), (4, 0, 3),
          (4, 3, 0)]


def _views(a):
    """``a``'s values as a C array, an F array (a transposed view), and blocks of a larger
    C and a larger F array (rows or columns with a leading dimension)."""
    rows, cols = a.shape
    c_big = np.full((rows + 3, cols + 5), np.nan, a.dtype)
    f_big = np.asfortranarray(np.full((rows + 4, cols + 2), np.nan, a.dtype))
    c_big[2:2 + rows, 1:1 + cols] = a
    f_big[1:1 + rows, 2:2 + cols] = a
    return [a, np.asfortranarray(a), c_big[2:2 + rows, 1:1 + cols],
            f_big[1:1 + rows, 2:2 + cols]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mkn", SHAPES, ids=str)
def test_gemm_is_the_matrix_product(dtype, mkn):
    """out = a @ b and out += a @ b for every pair of operand layouts (C, F, blocks of
    either), into a whole array and into a block of one, against float64 numpy; every
    element of out written (it starts as NaN) and nothing around it."""
    m, k, n = mkn
    rng = np.random.default_rng(sum(mkn))
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    expected = a.astype(np.float64) @ b.astype(np.float64)
    # k roundings of a product at most |a||b| each: the error bound of any summation order.
    tol = max(k, 1) * np.finfo(dtype).eps * ((np.abs(a) @ np.abs(b)).max(initial=0) + 1)
    for a_ in _views(a):
        for b_ in _views(b):
            big = np.full((m + 2, n + 3), np.nan, dtype=dtype)
            for out in (np.full((m, n), np.nan, dtype=dtype), big[1:1 + m, 2:2 + n]):
                _gemm(a_, b_, out, False)
                np.testing.assert_allclose(out, expected, rtol=0, atol=tol)
                again = out.copy()
                _gemm(a_, b_, again, True)
                np.testing.assert_allclose(again, 2 * expected, rtol=0, atol=3 * tol)
            big[1:1 + m, 2:2 + n] = np.nan
            assert np.isnan(big).all()  # the block's surroundings were never written


def test_gemm_refuses_what_it_cannot_compute():
    a = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="shapes do not match"):
        _gemm(a, np.ones((5, 2), np.float32), np.empty((3, 2), np.float32), False)
    with pytest.raises(ValueError, match="shapes do not match"):
        _gemm(a, np.ones((4, 2), np.float32), np.empty((3, 3), np.float32), False)
    with pytest.raises(ValueError, match="no unit stride"):  # neither rows nor columns
        _gemm(np.ones((6, 8), np.float32)[::2, ::2], np.ones((4, 2), np.float32),
              np.empty((3, 2), np.float32), False)
    with pytest.raises(ValueError, match="out must have rows of unit stride"):
        _gemm(a, np.ones((4, 2), np.float32), np.empty((2, 3), np.float32).T, False)
    with pytest.raises(TypingError, match="one float dtype"):
        _gemm(a, np.ones((4, 2), np.float64), np.empty((3, 2), np.float32), False)


def _misaligned(arr, offset):
    """A copy of ``arr`` starting ``offset`` elements past a 64-byte boundary."""
    buf = np.empty(arr.size + 32, arr.dtype)
    base = (-(buf.ctypes.data // arr.itemsize)) % (64 // arr.itemsize)
    view = buf[base + offset:base + offset + arr.size].reshape(arr.shape)
    view[...] = arr
    return view


@pytest.mark.parametrize("mkn", [(64, 576, 313), (37, 129, 301), (6, 150, 100)], ids=str)
def test_gemm_is_bitwise_repeatable(mkn):
    """The same product, bit for bit, whatever the operands' and the output's alignment at the
    16 bytes every allocation gets (malloc's, numpy's), in a region of one thread (BLAS on
    all the cores) and of several (BLAS on one): the kernels promise results repeatable run
    to run for a given thread count. Not across the two regions, nor at 4-byte offsets: MKL
    on Zen 4 splits a 6-row product differently on 2 threads than on 1, and by the output's
    4-byte offset (measured; on a Xeon it did not)."""
    m, k, n = mkn
    rng = np.random.default_rng(7)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    for items in (1, engine_threads()):
        first = None
        with parallel_region(items):
            for off_a in (0, 4, 8, 12):
                for off_b in (0, 4):
                    for off_out in (0, 8):
                        out = _misaligned(np.zeros((m, n), np.float32), off_out)
                        _gemm(_misaligned(a, off_a), _misaligned(b, off_b), out, False)
                        if first is None:
                            first = out.copy()
                        assert np.array_equal(out, first), (items, off_a, off_b, off_out)


@njit(parallel=True)
def _threads_seen(seen):
    for i in prange(seen.shape[0]):
        seen[i, 0] = _blas._region_threads()
        seen[i, 1] = _blas._published_threads()


@pytest.mark.parametrize("items", [1, 64])
def test_gemm_runs_blas_single_threaded_inside_parallel_kernels(items):
    """What gemm's thread choice reads: in a kernel whose prange runs on several threads, the
    region's count (so BLAS gets 1 thread); with one thread (fewer items than threads), the
    count parallel_region publishes, torch's (BLAS gets the cores)."""
    seen = np.zeros((64, 2), np.int64)
    with parallel_region(items) as threads:
        _threads_seen(seen)
    assert (seen[:, 0] == threads).all()
    assert (seen[:, 1] == engine_threads()).all()
    assert threads == (1 if items < engine_threads() else engine_threads())


def test_a_one_thread_region_runs_the_serial_build():
    """A parallel_kernel runs its serial build inside a parallel_region of one thread, where
    gemm's BLAS team is a top-level one and not nested in a Numba region (which stalled: see
    _runtime's "Nesting"), and its parallel build with several threads. The choice is per
    Python thread and undone on leaving the region, by an exception too."""
    import threading

    kernel = parallel_kernel(_threads_seen.py_func)  # fresh dispatchers: no signatures yet
    seen = np.zeros((64, 2), np.int64)
    with parallel_region(1):
        assert _runtime._region.serial
        other = []
        t = threading.Thread(target=lambda: other.append(_runtime._region.serial))
        t.start()
        t.join()
        assert other == [False]
        kernel(seen)
    assert len(kernel.serial.signatures) == 1 and kernel.parallel.signatures == []
    assert (seen[:, 0] == 1).all() and (seen[:, 1] == engine_threads()).all()
    assert not _runtime._region.serial
    if engine_threads() > 1:
        with parallel_region(64) as threads:
            assert not _runtime._region.serial
            kernel(seen)
        assert len(kernel.parallel.signatures) == 1 and (seen[:, 0] == threads).all()
    with pytest.raises(ValueError), parallel_region(1):
        raise ValueError
    assert not _runtime._region.serial


def _numba_kernels(tree):
    """{name: decorator source} of the functions in ``tree`` compiled by Numba."""
    return {f.name: ast.unparse(d) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
            for d in f.decorator_list if "njit" in ast.unparse(d) or "parallel_kernel" in
            ast.unparse(d) or "intrinsic" in ast.unparse(d)}


@pytest.mark.parametrize("module", ["conv2d", "pool2d", "_window", "_microkernel"])
def test_parallel_njit_is_only_called_from_numba_code(module):
    """A plain ``njit(parallel=True)`` kernel called from Python would run inside a one-thread
    region as parallel code and nest BLAS's team: kernels called from Python are
    parallel_kernels, and a parallel njit is only called by other Numba code."""
    tree = ast.parse((ROOT / "fastconv" / "cpu" / f"{module}.py").read_text())
    kernels = _numba_kernels(tree)
    parallel = {n for n, d in kernels.items() if "njit" in d and "parallel=True" in d}
    for f in ast.walk(tree):
        if not isinstance(f, ast.FunctionDef) or f.name in kernels:
            continue
        called = {ast.unparse(c.func) for c in ast.walk(f) if isinstance(c, ast.Call)}
        assert not called & parallel, (module, f.name, sorted(called & parallel))
    if module == "conv2d":
        assert parallel == {"_packed_groups"}  # the check sees what it checks


def test_blas_info_names_the_library():
    (lib,) = blas_info()
    assert lib["internal_api"] in ("mkl", "openblas", "blis")
    assert lib["num_threads"] >= 1 and os.path.exists(lib["filepath"])
    if _blas.NAME == "mkl":
        assert "Math Kernel Library" in lib["version"]


def _gemm_callers():
    """Names of the functions in conv2d.py that call _blas.gemm."""
    tree = ast.parse((ROOT / "fastconv" / "cpu" / "conv2d.py").read_text())
    return sorted(f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                  and any(isinstance(c, ast.Call) and ast.unparse(c.func) == "_blas.gemm"
                          for c in ast.walk(f)))


@pytest.mark.slow
def test_kernels_that_call_gemm_are_cached_on_disk(tmp_path):
    """Every kernel that calls gemm lands in Numba's on-disk cache: a kernel that reached BLAS
    through a ctypes pointer could not be cached, and every new process would compile it
    again. Runs every algorithm of every pass (autotuning with no work floor) on layers that
    take each GEMM path (the strided 16-channel one: phase-gemm), in a process with an empty
    cache folder."""
    script = textwrap.dedent("""
        import torch, fastconv
        from fastconv.cpu import _autotune
        _autotune.MIN_FLOPS = 0
        for xs, ws, opts in [((2, 16, 14, 14), (16, 16, 3, 3), dict(padding=1)),
                             ((2, 3, 12, 12), (4, 3, 5, 5), dict(stride=2, padding=1)),
                             ((2, 16, 12, 12), (16, 16, 3, 3), dict(stride=2, padding=1)),
                             ((3, 8, 7, 7), (40, 8, 1, 1), {}),
                             ((2, 8, 20, 20), (24, 8, 1, 1), {})]:
            x = torch.randn(xs, requires_grad=True)
            w = torch.randn(ws, requires_grad=True)
            fastconv.conv2d(x, w, **opts).sum().backward()
    """)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Cannot cache" not in run.stderr, run.stderr
    # (a parallel_kernel's serial build is indexed as "<name>__serial")
    indexed = {p.name.split(".")[1].rsplit("-", 1)[0].removesuffix("__serial")
               for p in tmp_path.rglob("conv2d.*.nbi")}
    callers = _gemm_callers()
    assert len(callers) >= 10
    assert sorted(set(callers) - indexed) == []


def test_scipy_blas_where_torch_has_no_mkl():
    """FASTCONV_BLAS=scipy (what a torch without MKL gets): gemm calls SciPy's BLAS, the
    kernels cached with MKL behind the symbol run unchanged, and a conv with every GEMM pass
    still matches PyTorch."""
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F, fastconv
        from fastconv.cpu import _blas, _runtime
        assert _blas.NAME == "scipy", _blas.NAME
        assert _runtime.blas_info()[0]["internal_api"] == "openblas"
        fastconv.cpu.set_autotune(False)
        x = torch.randn(3, 8, 7, 7, dtype=torch.float64, requires_grad=True)
        w = torch.randn(40, 8, 1, 1, dtype=torch.float64, requires_grad=True)
        ours = torch.autograd.grad(fastconv.conv2d(x, w).square().sum(), (x, w))
        theirs = torch.autograd.grad(F.conv2d(x, w).square().sum(), (x, w))
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "FASTCONV_BLAS": "scipy"})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
