"""The CPU engine's IR kernels (``fastconv.cpu._microkernel``): the register-blocked FMA tile,
every (t, v) case against a float64 sum, nothing written outside the tile, the generated
loop keeping its accumulators in registers; the short-run copy and the block transpose."""

import platform
import re

import numba
import numpy as np
import pytest

from fastconv.cpu import _microkernel
from fastconv.cpu._microkernel import (copy_run, lanes, max_tile, prefer_wide_vectors,
                                       prefetch_run, stream_fence, stream_run, tile_fma,
                                       transpose_block)
from helpers import AVX512_FEATURES, run_for_target


@numba.njit
def _run(x, xoff, offs, nk, w, woff, b, boff, out, ooff, ostride, n_co, t, v):
    tile_fma(x, xoff, offs, nk, w, woff, b, boff, out, ooff, ostride, n_co, t, v)


def _reference(x, xoff, offs, w, woff, b, boff, ostride, n_co, t, lv):
    """{flat output index: (value, sum of |terms|)} of the tile, in float64."""
    out = {}
    for c in range(n_co):
        for tt in range(t):
            terms = [np.float64(b[boff + c])] + [x[xoff + o + tt] * np.float64(w[woff + k * lv + c])
                                                  for k, o in enumerate(offs)]
            out[c * ostride + tt] = (sum(terms), sum(abs(v) for v in terms))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("v", [1, 2])
def test_every_tile_shape_sums_its_taps(dtype, v):
    rng = np.random.default_rng(v)
    lv = v * lanes(dtype)
    eps = np.finfo(dtype).eps
    for t in range(1, max_tile() + 1):
        for nk in (0, 1, int(rng.integers(2, 40))):
            n_co = int(rng.integers(1, lv + 1)) if nk != 1 else lv
            ostride = int(rng.integers(t, 3 * t + 5))
            x = rng.standard_normal(300).astype(dtype)
            offs = rng.integers(0, 250, nk).astype(np.int64)
            w = rng.standard_normal(nk * lv + 11).astype(dtype)
            b = rng.standard_normal(lv + 7).astype(dtype)
            ooff = 5
            out = np.full(ooff + lv * ostride + 20, 7.5, dtype)
            _run(x, 13, offs, nk, w, 11, b, 7, out, ooff, ostride, n_co, t, v)
            want = _reference(x, 13, offs, w, 11, b, 7, ostride, n_co, t, lv)
            for q in range(out.size):
                if q - ooff not in want:  # outside the tile: untouched
                    assert out[q] == 7.5, (t, v, nk, n_co, q)
                    continue
                value, size = want[q - ooff]
                # a sum of nk + 1 terms in the dtype: (nk + 1) * eps * sum|terms| bounds it
                assert abs(out[q] - value) <= (nk + 1) * eps * size, (t, v, nk, n_co, q)


def test_unsupported_tiles_store_nothing():
    """A (t, v) outside the compiled cases falls through the switch: no write at all."""
    x = np.ones(64, np.float32)
    w = np.ones(64 * 32, np.float32)
    out = np.full(64 * 40, 3.0, np.float32)
    for t, v in ((0, 1), (max_tile() + 1, 1), (4, 3)):
        _run(x, 0, np.zeros(2, np.int64), 2, w, 0, w, 0, out, 0, 40, 32, t, v)
    assert (out == 3.0).all()


def _loops(asm: str):
    """Single-block loops of the assembly: from a label to the branch back to it."""
    loops = []
    for block in re.split(r"\n(?=\.?L\w+:)", asm):
        label = block.split(":", 1)[0].strip()
        back = re.search(rf"\n\s*j\w+\s+{re.escape(label)}\s*(\n|$)", block)
        if label and back:
            loops.append(block[:back.end()])
    return loops


def _largest_tile_loops():
    """The tap loops of the largest tile in ``_run`` compiled (not run) for float32: each a
    loop with 2 * max_tile() packed FMAs on zmm registers; (loops, whether each touches the
    stack)."""
    f32, i64 = numba.types.float32[::1], numba.types.int64
    sig = (f32, i64, i64[::1], i64, f32, i64, f32, i64, f32, i64, i64, i64, i64, i64)
    fresh = numba.njit(sig)(_run.py_func)
    asm = fresh.inspect_asm(fresh.signatures[0])
    loops = [b for b in _loops(asm)
             if len(re.findall(r"vfmadd\w+ps\s+[^\n]*zmm", b)) >= 2 * max_tile()]
    return loops, ["rsp" in b or "rbp)" in b for b in loops]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="inspects x86 assembly")
def test_largest_tile_keeps_accumulators_in_registers(tmp_path):
    """The 14 x 2 tile's tap loop: 28 packed FMAs on zmm registers and no stack traffic (an
    accumulator spilled to the stack costs a load and a store per FMA; a run-time column
    stride once made LLVM do exactly that). Compiled for AVX-512 in a process of its own, so
    this runs on hosts without it too."""
    out = run_for_target("""
        import test_microkernel as t
        from fastconv.cpu import _microkernel
        assert _microkernel._wide_vectors() and _microkernel.max_tile() == 14
        loops, spills = t._largest_tile_loops()
        print(len(loops), sum(spills))
    """, tmp_path, "znver4", AVX512_FEATURES)
    n_loops, n_spilling = map(int, out.split()[-2:])
    assert n_loops > 0, "no tap loop with 28 zmm FMAs"
    assert n_spilling == 0, "a tap loop of the largest tile touches the stack"


@numba.njit
def _copy(d, d0, s, s0, n, step):
    copy_run(d, d0, s, s0, n, step)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("step", [1, 2, 3])
def test_copy_run_moves_exactly_its_run(dtype, step):
    """Every length around the vector width (element loop below it, whole vectors with an
    overlapping last one from it), unit and stride-2 reads (and 3: the element loop), at odd
    offsets: the run's elements, and nothing else, written."""
    rng = np.random.default_rng(step)
    for n in range(0, 4 * lanes(dtype) + 3):
        src = rng.standard_normal(5 + max(0, (n - 1) * step + 1)).astype(dtype)
        dst = np.full(n + 9, 9.0, dtype)
        _copy(dst, 4, src, 5, n, step)
        assert (dst[:4] == 9).all() and (dst[4 + n:] == 9).all(), n
        assert np.array_equal(dst[4:4 + n], src[5::step][:n]), n


@numba.njit
def _transpose_block(d, d0, dstride, s, s0, sstride):
    transpose_block(d, d0, dstride, s, s0, sstride)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transpose_block_moves_exactly_its_block(dtype):
    """One L x L block between strided rows at odd (unaligned) offsets, strides above and at
    L: every element transposed, bit for bit, and nothing outside the block written."""
    n = lanes(dtype)
    rng = np.random.default_rng(n)
    for s0, sstride, d0, dstride in [(3, n + 5, 7, n + 2), (0, n, 0, n), (1, 3 * n, 5, 2 * n + 1)]:
        src = rng.standard_normal(s0 + n * sstride).astype(dtype)
        dst = np.full(d0 + n * dstride + 4, np.nan, dtype)
        _transpose_block(dst, d0, dstride, src, s0, sstride)
        block = src[s0:s0 + n * sstride].reshape(n, sstride)[:, :n]
        got = dst[d0:d0 + n * dstride].reshape(n, dstride)
        assert np.array_equal(got[:, :n], block.T)
        assert np.isnan(got[:, n:]).all() and np.isnan(dst[:d0]).all()
        assert np.isnan(dst[d0 + n * dstride:]).all()


@numba.njit
def _stream(d, d0, s, s0, n):
    stream_run(d, d0, s, s0, n)
    stream_fence()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stream_run_moves_exactly_its_run(dtype):
    """stream_run: any start (aligned or not) and length (shorter than a vector, whole
    vectors, a ragged end): exactly its run copied, nothing around it touched."""
    rng = np.random.default_rng(1)
    src = rng.standard_normal(400).astype(dtype)
    for d0 in (0, 1, 5, lanes(dtype), 17):
        for s0 in (0, 3):
            for n in (0, 1, lanes(dtype) - 1, lanes(dtype), 3 * lanes(dtype) + 5, 300):
                dst = np.full(360, np.nan, dtype)
                _stream(dst, d0, src, s0, n)
                assert np.array_equal(dst[d0:d0 + n], src[s0:s0 + n]), (d0, s0, n)
                assert np.isnan(dst[:d0]).all() and np.isnan(dst[d0 + n:]).all(), (d0, s0, n)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="inspects x86 assembly")
def test_stream_run_streams():
    """Its whole vectors are non-temporal stores (vmovntps), not plain ones, and
    stream_fence is an sfence."""
    f32, i64 = numba.types.float32[::1], numba.types.int64
    fresh = numba.njit((f32, i64, f32, i64, i64))(_stream.py_func)
    asm = fresh.inspect_asm(fresh.signatures[0])
    assert re.search(r"\bv?movntp[sd]\b", asm)
    assert re.search(r"\bsfence\b", asm)


@numba.njit
def _prefetched_sum(x, s0, n):
    prefetch_run(x, s0, n)
    return x[s0:s0 + n].sum()


@numba.njit(parallel=True)
def _wide_body(x, y):
    for b in numba.prange(4):
        prefer_wide_vectors()
        for t in range(b * 64, (b + 1) * 64):
            y[t] = max(x[t], x[t + 1])


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="inspects x86 assembly")
@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_prefetch_run_prefetches_and_changes_nothing(dtype):
    """prefetch_run: a prefetch per 64-byte line (prefetcht0 on x86), of any numeric array,
    and the data are as they were."""
    x = np.arange(300).astype(dtype)
    for s0, n in ((0, 0), (5, 1), (7, 200)):
        assert _prefetched_sum(x, s0, n) == x[s0:s0 + n].sum()
    asm = _prefetched_sum.inspect_asm(_prefetched_sum.signatures[-1])
    assert re.search(r"\bprefetcht0\b", asm)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="inspects x86 assembly")
def test_prefer_wide_vectors_marks_the_prange_body():
    """The prange body calling prefer_wide_vectors carries the function attribute (where the
    target has AVX-512; nothing elsewhere), and its loop uses 512-bit registers there."""
    x, y = np.random.default_rng(0).standard_normal(260).astype(np.float32), \
        np.zeros(256, np.float32)
    _wide_body(x, y)
    assert np.array_equal(y, np.maximum(x[:256], x[1:257]))
    sig = _wide_body.signatures[0]
    # The prange body is compiled into a library the function links.
    library = _wide_body.overloads[sig].library
    llvm = "".join(lib.get_llvm_str() for lib in library._linking_libraries)
    asm = _wide_body.inspect_asm(sig)
    wide = _microkernel._wide_vectors()
    assert ('"prefer-vector-width"="512"' in llvm) == wide
    if wide:
        assert re.search(r"^\s*v\w+ps\s.*zmm", asm, re.MULTILINE)


def test_256_bit_build_of_the_tiles(tmp_path):
    """Where Numba compiles without AVX-512 (a named portable target here, as on an AVX2
    machine), the tiles are 8 float32 lanes and at most 6 x 2: the same checks, and a
    strided conv with bias and gradients against PyTorch, in a process built that way."""
    out = run_for_target("""
        import numpy as np, torch, torch.nn.functional as F
        import test_microkernel as t
        from fastconv.cpu import _microkernel
        assert not _microkernel._wide_vectors() and _microkernel.max_tile() == 6
        assert _microkernel.lanes(np.float32) == 8
        for dtype in (np.float32, np.float64):
            for v in (1, 2):
                t.test_every_tile_shape_sums_its_taps(dtype, v)
            for step in (1, 2, 3):
                t.test_copy_run_moves_exactly_its_run(dtype, step)
            t.test_stream_run_moves_exactly_its_run(dtype)
            t.test_transpose_block_moves_exactly_its_block(dtype)
        from helpers import assert_matches_torch
        import fastconv
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=gen) for s in ((2, 5, 11, 13), (19, 5, 3, 3), (19,)))
        assert_matches_torch(fastconv.conv2d, F.conv2d, [x, w, b], dict(stride=2, padding=1))
        print("ok")
    """, tmp_path, "haswell", timeout=600)
    assert out.strip().endswith("ok")
