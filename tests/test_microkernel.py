"""The CPU engine's IR kernels (``fastconv.cpu._microkernel``): the register-blocked FMA tile,
every (t, v) case against a float64 sum, nothing written outside the tile, the generated
loop keeping its accumulators in registers; the short-run copy and the block transpose; the
Winograd transform bands against the same arithmetic in NumPy, bit for bit, reading nothing
outside their rows and writing nothing outside their tiles; max pooling's stride-2 window
maxima against the tap-by-tap rule."""

import platform
import re

import numba
import numpy as np
import pytest

from fastconv.cpu import _microkernel
from fastconv.cpu._microkernel import (ROW_TILES, copy_run, lanes, max_tile, pixel_channels,
                                       pixel_vectors, prefer_wide_vectors, prefetch_run,
                                       stream_fence, stream_run, tile_fma, tile_fma_pixels,
                                       tile_fma_rows, transpose_block,
                                       window_max3_s2, winograd4_grad_band, winograd4_input_band,
                                       winograd4_output_band, winograd_grad_band,
                                       winograd_input_band, winograd_output_band)
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


@numba.njit
def _run_rows(x, xoff, rowstride, offs, nk, w, woff, b, boff, out, ooff, ostride, n_co, t, r,
              v):
    tile_fma_rows(x, xoff, rowstride, offs, nk, w, woff, b, boff, out, ooff, ostride, n_co, t,
                  r, v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("v", [1, 2])
def test_every_row_tile_shape_sums_its_taps(dtype, v):
    """tile_fma_rows(t, r) is tile_fma of r*t columns whose x offsets are i*rowstride + j."""
    rng = np.random.default_rng(10 + v)
    lv = v * lanes(dtype)
    eps = np.finfo(dtype).eps
    for r in range(2, ROW_TILES + 1):
        for t in range(1, max_tile() // r + 1):
            nk = int(rng.integers(2, 30))
            n_co = int(rng.integers(1, lv + 1))
            rowstride = int(rng.integers(t, 2 * t + 9))
            ostride = int(rng.integers(r * t, 3 * r * t + 5))
            x = rng.standard_normal(400).astype(dtype)
            offs = rng.integers(0, 250, nk).astype(np.int64)
            w = rng.standard_normal(nk * lv + 11).astype(dtype)
            b = rng.standard_normal(lv + 7).astype(dtype)
            out = np.full(5 + lv * ostride + 20, 7.5, dtype)
            _run_rows(x, 13, rowstride, offs, nk, w, 11, b, 7, out, 5, ostride, n_co, t, r, v)
            for c in range(lv):
                for q in range(ostride):
                    got = out[5 + c * ostride + q]
                    if c >= n_co or q >= r * t:  # outside the tile: untouched
                        assert got == 7.5, (t, r, v, c, q)
                        continue
                    at = 13 + (q // t) * rowstride + q % t
                    terms = [np.float64(b[7 + c])] + [
                        x[at + o] * np.float64(w[11 + k * lv + c]) for k, o in enumerate(offs)]
                    bound = (nk + 1) * eps * sum(abs(term) for term in terms)
                    assert abs(got - sum(terms)) <= bound, (t, r, v, c, q)
    # Outside the compiled cases (r = 1, r past ROW_TILES, r*t past max_tile): no write.
    out = np.full(64 * 40, 3.0, dtype)
    ones = np.ones(64 * 32, dtype)
    for t, r in ((3, 1), (1, ROW_TILES + 1), (max_tile() // 2 + 1, 2)):
        _run_rows(ones, 0, 5, np.zeros(2, np.int64), 2, ones, 0, ones, 0, out, 0, 40, 32, t, r,
                  v)
    assert (out == 3.0).all()


def test_unsupported_tiles_store_nothing():
    """A (t, v) outside the compiled cases falls through the switch: no write at all."""
    x = np.ones(64, np.float32)
    w = np.ones(64 * 32, np.float32)
    out = np.full(64 * 40, 3.0, np.float32)
    for t, v in ((0, 1), (max_tile() + 1, 1), (4, 3)):
        _run(x, 0, np.zeros(2, np.int64), 2, w, 0, w, 0, out, 0, 40, 32, t, v)
    assert (out == 3.0).all()


@numba.njit
def _run_pixels(x, xoff, offs, nk, w, woff, out, ooff, ostride, t, r):
    tile_fma_pixels(x, xoff, offs, nk, w, woff, out, ooff, ostride, t, r)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_pixel_tile_shape_adds_its_taps(dtype):
    """tile_fma_pixels(t, r): each of t channels' r*L pixels gets its taps' sum added; nothing
    outside the tile is written; (t, r) outside the compiled cases write nothing."""
    rng = np.random.default_rng(3)
    n = lanes(dtype)
    eps = np.finfo(dtype).eps
    for t in range(1, pixel_channels() + 1):
        for r in sorted({1, pixel_vectors(t)}):
            for nk in (0, 1, int(rng.integers(2, 40))):
                ostride = r * n + int(rng.integers(0, 9))
                x = rng.standard_normal(400).astype(dtype)
                offs = rng.integers(0, 400 - 13 - r * n, nk).astype(np.int64)
                w = rng.standard_normal(nk * t + 11).astype(dtype)
                out = np.full(5 + t * ostride + 20, 7.5, dtype)
                start = rng.standard_normal((t, r * n)).astype(dtype)
                for c in range(t):
                    out[5 + c * ostride:5 + c * ostride + r * n] = start[c]
                _run_pixels(x, 13, offs, nk, w, 11, out, 5, ostride, t, r)
                for c in range(t):
                    for q in range(ostride):
                        got = out[5 + c * ostride + q]
                        if q >= r * n:
                            assert got == 7.5, (t, r, nk, c, q)
                            continue
                        terms = [np.float64(start[c, q])] + [
                            np.float64(w[11 + k * t + c]) * x[13 + o + q] for k, o in enumerate(offs)]
                        bound = (nk + 1) * eps * sum(abs(term) for term in terms)
                        assert abs(got - sum(terms)) <= bound, (t, r, nk, c, q)
                assert (out[:5] == 7.5).all() and (out[5 + t * ostride:] == 7.5).all()
    out = np.full(64 * 40, 3.0, dtype)
    ones = np.ones(64 * 32, dtype)
    for t, r in ((0, 1), (pixel_channels() + 1, 1), (1, 2 if pixel_vectors(1) != 2 else 3)):
        _run_pixels(ones, 0, np.zeros(2, np.int64), 2, ones, 0, out, 0, 40, t, r)
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


def _pixel_tile_loops():
    """The tap loops of ``_run_pixels``'s fullest tiles compiled (not run) for float32: loops
    of at least 24 packed zmm FMAs (t*r = 24 or 25 for t = 3 to 6); (loops,
    whether each touches the stack)."""
    f32, i64 = numba.types.float32[::1], numba.types.int64
    sig = (f32, i64, i64[::1], i64, f32, i64, f32, i64, i64, i64, i64)
    fresh = numba.njit(sig)(_run_pixels.py_func)
    asm = fresh.inspect_asm(fresh.signatures[0])
    loops = [b for b in _loops(asm) if len(re.findall(r"vfmadd\w+ps\s+[^\n]*zmm", b)) >= 24]
    return loops, [_touches_stack(b, asm) for b in loops]


def _touches_stack(loop: str, asm: str) -> bool:
    """Whether ``loop`` addresses the stack: through %rsp, or through %rbp where the function
    makes it the frame pointer (elsewhere LLVM may use %rbp as one more pointer register: the
    7-channel pixel tile walks its weights with it)."""
    frame = re.search(r"movq\s+%rsp,\s*%rbp", asm) is not None
    return "rsp" in loop or (frame and "rbp)" in loop)


def _largest_tile_loops(rows: bool = False):
    """The tap loops of the largest tiles in ``_run`` (``rows``: ``_run_rows``) compiled (not
    run) for float32: each a loop with 2 * max_tile() packed FMAs on zmm registers (rows: 2 *
    the largest r*t but one, so the 3-row tiles count too); (loops, whether each touches the
    stack)."""
    f32, i64 = numba.types.float32[::1], numba.types.int64
    sig = (f32, i64, *((i64,) if rows else ()), i64[::1], i64, f32, i64, f32, i64, f32, i64,
           i64, i64, i64, *((i64,) if rows else ()), i64)
    fresh = numba.njit(sig)((_run_rows if rows else _run).py_func)
    asm = fresh.inspect_asm(fresh.signatures[0])
    least = 2 * (max_tile() - 2) if rows else 2 * max_tile()
    loops = [b for b in _loops(asm) if len(re.findall(r"vfmadd\w+ps\s+[^\n]*zmm", b)) >= least]
    return loops, ["rsp" in b or "rbp)" in b for b in loops]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="inspects x86 assembly")
def test_largest_tile_keeps_accumulators_in_registers(tmp_path):
    """The 14 x 2 tile's tap loop: 28 packed FMAs on zmm registers and no stack traffic (an
    accumulator spilled to the stack costs a load and a store per FMA; a run-time column
    stride once made LLVM do exactly that); likewise the multi-row tiles (2 x 7 and 3 x 4
    columns, a run-time row stride). Compiled for AVX-512 in a process of its own, so
    this runs on hosts without it too."""
    out = run_for_target("""
        import test_microkernel as t
        from fastconv.cpu import _microkernel
        assert _microkernel._wide_vectors() and _microkernel.max_tile() == 14
        for rows in (False, True):
            loops, spills = t._largest_tile_loops(rows)
            print(len(loops), sum(spills))
        loops, spills = t._pixel_tile_loops()
        print(len(loops), sum(spills))
    """, tmp_path, "znver4", AVX512_FEATURES)
    counts = list(map(int, out.split()[-6:]))
    for kind, n_loops, n_spilling in (("tile_fma", *counts[:2]), ("tile_fma_rows", *counts[2:4]),
                                      ("tile_fma_pixels", *counts[4:])):
        assert n_loops > 0, f"{kind}: no tap loop of the largest tiles' zmm FMAs"
        assert n_spilling == 0, f"{kind}: a tap loop of the largest tiles touches the stack"


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
                t.test_every_row_tile_shape_sums_its_taps(dtype, v)
            t.test_every_pixel_tile_shape_adds_its_taps(dtype)
            for step in (1, 2, 3):
                t.test_copy_run_moves_exactly_its_run(dtype, step)
            t.test_stream_run_moves_exactly_its_run(dtype)
            t.test_transpose_block_moves_exactly_its_block(dtype)
            t.test_winograd4_input_band_is_the_transform_of_its_patches(dtype)
            t.test_winograd4_output_band_writes_its_rows_and_columns_only(dtype)
            t.test_winograd4_grad_band_is_the_transform_of_its_tiles(dtype)
            for coded in (True, False):
                t.test_window_max3_s2_is_the_tap_order_max(dtype, coded)
        from helpers import assert_matches_torch
        import fastconv
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=gen) for s in ((2, 5, 11, 13), (19, 5, 3, 3), (19,)))
        assert_matches_torch(fastconv.conv2d, F.conv2d, [x, w, b], dict(stride=2, padding=1))
        # an RGB stem's input gradient by pixel tiles (4 channels a tile here)
        x, w = (torch.randn(s, generator=gen) for s in ((2, 6, 15, 14), (9, 6, 5, 5)))
        assert_matches_torch(fastconv.conv2d, F.conv2d, [x, w], dict(stride=2, padding=2))
        print("ok")
    """, tmp_path, "haswell", timeout=600)
    assert out.strip().endswith("ok")


# ---- Winograd transform bands. Each test surrounds the rows a band may read with NaN (a read
# past a mask would leak it into the result) and its output with a sentinel (a store past a
# mask would overwrite it), on band lengths around the vector width.
@numba.njit
def _input_band(x, r, left, w, vf, base, stride, n):
    winograd_input_band(x, r[0], r[1], r[2], r[3], left, w, vf, base, stride, n)


@numba.njit
def _grad_band(g, r0, r1, count, uf, base, stride, n):
    winograd_grad_band(g, r0, r1, count, uf, base, stride, n)


@numba.njit
def _output_band(mf, base, stride, y, top, bottom, count, bias, n):
    winograd_output_band(mf, base, stride, y, top, bottom, count, bias, n)


def _band_lengths(dtype):
    n = lanes(dtype)
    return [1, 2, n - 1, n, n + 1, 2 * n + 3]


def _rows_in_nan(rng, dtype, w, count):
    """(flat array, offsets): ``count`` rows of ``w`` values apart, NaN around and between."""
    gap = 3 * lanes(dtype) + 5
    x = np.full(gap + count * (w + gap), np.nan, dtype)
    offs = [gap + a * (w + gap) for a in range(count)]
    for o in offs:
        x[o:o + w] = rng.standard_normal(w).astype(dtype)
    return x, offs


def _planes_out(dtype, n, base=5, planes=16):
    """(sentinel-filled flat planes, base, stride) for ``planes`` planes of n tiles."""
    stride = n + 3
    return np.full(base + planes * stride + 2 * lanes(dtype), 7.5, dtype), base, stride


def _patches(x, rows, left, w, n, size):
    """(n, size, size) patches d[t, a, b] of a Winograd input band: row a at offset rows[a]
    (zeros for -1), column left + (size - 2) * t + b, zeros outside [0, w)."""
    d = np.zeros((n, size, size), x.dtype)
    for a, r in enumerate(rows):
        for t in range(n):
            for b in range(size):
                c = left + (size - 2) * t + b
                if r >= 0 and 0 <= c < w:
                    d[t, a, b] = x[r + c]
    return d


def _planes_in_nan(rng, dtype, n, planes):
    """(flat planes, base, stride, values): ``planes`` planes of n random tiles, NaN around."""
    base, stride = 3, n + 4
    m = rng.standard_normal((planes, n)).astype(dtype)
    mf = np.full(base + planes * stride + 2 * lanes(dtype), np.nan, dtype)
    for k in range(planes):
        mf[base + k * stride:base + k * stride + n] = m[k]
    return mf, base, stride, m


def _check_planes(vf, base, stride, n, want, rtol=0.0):
    """Planes equal to ``want`` (bit for bit, or within ``rtol`` of the planes' largest
    value), the sentinels around them untouched."""
    planes = len(want)
    got = np.stack([vf[base + k * stride:base + k * stride + n] for k in range(planes)])
    if rtol:
        assert np.abs(got - want).max() <= rtol * np.abs(want).max()
    else:
        assert np.array_equal(got, want)
    mask = np.ones(vf.size, bool)
    for k in range(planes):
        mask[base + k * stride:base + k * stride + n] = False
    assert (vf[mask] == 7.5).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd_input_band_is_the_transform_of_its_patches(dtype):
    """Element k of B^T d B per tile, d read from four rows (or zero rows) at a column
    offset that starts in the padding, ends past the row, or neither."""
    rng = np.random.default_rng(11)
    for n in _band_lengths(dtype):
        for w, left in [(2 * n + 2, 0), (2 * n, -1), (2 * n - 1, -2), (n + 3, 1), (1, -1)]:
            x, offs = _rows_in_nan(rng, dtype, w, 4)
            for rows in (offs, [offs[0], -1, offs[2], -1], [-1, -1, -1, offs[3]]):
                vf, base, stride = _planes_out(dtype, n)
                _input_band(x, np.array(rows, np.int64), left, w, vf, base, stride, n)
                d = _patches(x, rows, left, w, n, 4).transpose(1, 0, 2)  # row, tile, column
                rows_bd = [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]
                want = np.concatenate([np.stack([e[:, 0] - e[:, 2], e[:, 1] + e[:, 2],
                                                 e[:, 2] - e[:, 1], e[:, 1] - e[:, 3]])
                                       for e in rows_bd])
                _check_planes(vf, base, stride, n, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd_grad_band_is_the_transform_of_its_tiles(dtype):
    """Element k of A H A^T per tile, H's two rows (the second may be missing) read up to
    ``count`` columns, zeros after."""
    rng = np.random.default_rng(12)
    for n in _band_lengths(dtype):
        for count in (2 * n, 2 * n - 1, max(1, 2 * n - 4)):
            g, offs = _rows_in_nan(rng, dtype, count, 2)
            for r1 in (offs[1], -1):
                uf, base, stride = _planes_out(dtype, n)
                _grad_band(g, offs[0], r1, count, uf, base, stride, n)
                h = np.zeros((2, 2, n), dtype)  # row, column e, tile
                for i, r in enumerate((offs[0], r1)):
                    for t in range(n):
                        for e in range(2):
                            if r >= 0 and 2 * t + e < count:
                                h[i, e, t] = g[r + 2 * t + e]
                (h00, h01), (h10, h11) = h
                rows = [(h00, h01), (h00 + h10, h01 + h11), (h00 - h10, h01 - h11), (-h10, -h11)]
                want = np.concatenate([np.stack([x0, x0 + x1, x0 - x1, -x1]) for x0, x1 in rows])
                _check_planes(uf, base, stride, n, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd_output_band_writes_its_columns_only(dtype):
    """bias + A^T M A per tile into one or two output rows, columns up to ``count`` (odd:
    the last tile's left column only), reading only the band's tiles of each plane."""
    rng = np.random.default_rng(13)
    for n in _band_lengths(dtype):
        for count in (2 * n, 2 * n - 1):
            mf, base, stride, m = _planes_in_nan(rng, dtype, n, 16)
            bias = dtype(rng.standard_normal())
            for two_rows in (True, False):
                y = np.full(2 * count + 40, 7.5, dtype)
                top, bottom = 10, count + 25
                _output_band(mf, base, stride, y, top, bottom if two_rows else -1, count, bias,
                             n)
                s0 = [(m[j] + m[4 + j]) + m[8 + j] for j in range(4)]
                s1 = [(m[4 + j] - m[8 + j]) - m[12 + j] for j in range(4)]
                want = np.full(y.size, 7.5, dtype)
                for row, s in ((top, s0), (bottom, s1) if two_rows else (None, None)):
                    if row is None:
                        continue
                    cols = np.empty(2 * n, dtype)
                    cols[0::2] = ((bias + s[0]) + s[1]) + s[2]
                    cols[1::2] = ((bias + s[1]) - s[2]) - s[3]
                    want[row:row + count] = cols[:count]
                assert np.array_equal(y, want), (n, count, two_rows)


# F(4x4, 3x3)'s bands fuse their multiply-adds, so they are checked against float64 within a
# few units of roundoff, not bit for bit; NaN around the rows and sentinels as above.
@numba.njit
def _input4_band(x, r, left, w, vf, base, stride, n):
    winograd4_input_band(x, r[0], r[1], r[2], r[3], r[4], r[5], left, w, vf, base, stride, n)


@numba.njit
def _output4_band(mf, base, stride, y, r, count, bias, n):
    winograd4_output_band(mf, base, stride, y, r[0], r[1], r[2], r[3], count, bias, n)


@numba.njit
def _grad4_band(g, r, count, uf, base, stride, n):
    winograd4_grad_band(g, r[0], r[1], r[2], r[3], count, uf, base, stride, n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd4_input_band_is_the_transform_of_its_patches(dtype):
    """Element k of B^T d B per tile (``WINOGRAD4_BT``), d read from six rows (or zero rows)
    at a column offset that starts in the padding, ends past the row, or neither."""
    rng = np.random.default_rng(21)
    bt = np.array(_microkernel.WINOGRAD4_BT)
    eps = np.finfo(dtype).eps
    for n in _band_lengths(dtype):
        for w, left in [(4 * n + 2, 0), (4 * n, -1), (4 * n - 1, -2), (2 * n + 3, 1), (1, -1),
                        (4 * n + 9, 3)]:
            x, offs = _rows_in_nan(rng, dtype, w, 6)
            for rows in (offs, [offs[0], -1, offs[2], -1, offs[4], -1], [-1] * 5 + [offs[5]]):
                vf, base, stride = _planes_out(dtype, n, planes=36)
                _input4_band(x, np.array(rows, np.int64), left, w, vf, base, stride, n)
                d = _patches(x, rows, left, w, n, 6).astype(np.float64)  # tile, row, column
                want = np.einsum("ia,tab,jb->ijt", bt, d, bt).reshape(36, n)
                _check_planes(vf, base, stride, n, want, rtol=32 * eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd4_output_band_writes_its_rows_and_columns_only(dtype):
    """bias + A^T M A per tile (``WINOGRAD4_AT``) into up to four output rows, columns up to
    ``count`` (the last tile cut after 1, 2 or 3 columns), reading only the band's tiles."""
    rng = np.random.default_rng(22)
    at = np.array(_microkernel.WINOGRAD4_AT)
    eps = np.finfo(dtype).eps
    for n in _band_lengths(dtype):
        for count in (4 * n, 4 * n - 1, 4 * n - 2, 4 * n - 3):
            mf, base, stride, m = _planes_in_nan(rng, dtype, n, 36)
            bias = dtype(rng.standard_normal())
            tiles = np.einsum("ua,abt,vb->tuv", at, m.astype(np.float64).reshape(6, 6, n), at)
            for live in (4, 3, 1):
                y = np.full(4 * (count + 20) + 10, 7.5, dtype)
                rows = [10 + u * (count + 20) if u < live else -1 for u in range(4)]
                _output4_band(mf, base, stride, y, np.array(rows, np.int64), count, bias, n)
                want = np.full(y.size, 7.5)
                for u in range(live):
                    want[rows[u]:rows[u] + count] = \
                        (float(bias) + tiles[:, u, :]).reshape(-1)[:count]
                written = want != 7.5
                assert (y[~written] == 7.5).all(), (n, count, live)
                scale = np.abs(m).max() * 16 + abs(float(bias))
                assert np.abs(y[written] - want[written]).max() <= 32 * eps * scale


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_winograd4_grad_band_is_the_transform_of_its_tiles(dtype):
    """Element k of A H A^T per tile (A = ``WINOGRAD4_AT`` transposed), H's four rows (some
    missing) read up to ``count`` columns (the last tile cut after 1, 2 or 3), zeros after."""
    rng = np.random.default_rng(23)
    at = np.array(_microkernel.WINOGRAD4_AT)
    eps = np.finfo(dtype).eps
    for n in _band_lengths(dtype):
        for count in (4 * n, 4 * n - 1, 4 * n - 2, 4 * n - 3):
            g, offs = _rows_in_nan(rng, dtype, count, 4)
            for rows in (offs, [offs[0], offs[1], -1, -1], [offs[0], -1, -1, -1]):
                uf, base, stride = _planes_out(dtype, n, planes=36)
                _grad4_band(g, np.array(rows, np.int64), count, uf, base, stride, n)
                h = np.zeros((n, 4, 4))  # tile, row, column
                for u, r in enumerate(rows):
                    for t in range(n):
                        for v in range(4):
                            if r >= 0 and 4 * t + v < count:
                                h[t, u, v] = g[r + 4 * t + v]
                want = np.einsum("ui,tuv,vj->ijt", at, h, at).reshape(36, n)
                _check_planes(uf, base, stride, n, want, rtol=32 * eps)


# ---- Max pooling's window maxima (3 taps at stride 2)
@numba.njit
def _window_max3_s2(x, a, hv, hc, d, n, coded):
    window_max3_s2(x, a, hv, hc, d, n, coded)


@pytest.mark.parametrize("coded", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_window_max3_s2_is_the_tap_order_max(dtype, coded):
    """hv[d + t] = x[a + 2t + j] for the first j of 0, 1, 2 whose value no later tap beats
    (greater, or NaN: the rule of every max pooling kernel), hc[d + t] = j; on window counts
    around the vector width, with ties, NaN and -inf in the row; nothing written outside
    [d, d + n) (sentinels), and hc untouched when not coded."""
    rng = np.random.default_rng(3)
    for n in (0,) + tuple(_band_lengths(dtype)) + (40,):
        for a in (0, 1, 5):
            x = rng.integers(-2, 3, a + 2 * n + 1).astype(dtype)
            x[rng.random(x.size) < 0.15] = np.nan
            x[rng.random(x.size) < 0.1] = -np.inf
            d = 3
            hv = np.full(d + n + 2 * lanes(dtype), 7.5, dtype)
            hc = np.full(hv.size, 7.5, np.float32)
            _window_max3_s2(x, a, hv, hc, d, n, coded)
            want_v, want_c = hv.copy(), hc.copy()
            for t in range(n):
                best, code = x[a + 2 * t], 0
                for j in (1, 2):
                    v = x[a + 2 * t + j]
                    if v > best or v != v:
                        best, code = v, j
                want_v[d + t] = best
                if coded:
                    want_c[d + t] = code
            want_v[d + n:] = 7.5
            want_c[d + n:] = 7.5
            assert np.array_equal(hv, want_v, equal_nan=True), (n, a)
            assert np.array_equal(hc, want_c), (n, a)
            assert (hv[:d] == 7.5).all() and (hc[:d] == 7.5).all()
            if not coded:
                assert (hc == 7.5).all()
