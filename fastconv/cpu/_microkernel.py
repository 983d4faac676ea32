"""A register-blocked FMA microkernel for the CPU conv engine, emitted as LLVM IR.

``tile_fma`` computes a tile of t output columns x v*L output channels (L = ``lanes(dtype)``
channels to a vector) as sums over ``nk`` taps of (a scalar of x, broadcast) x (a vector of
packed weights), and stores it transposed, a row of t columns per channel::

    out[ooff + c*ostride + tt] = bias[boff + c] + sum_k x[xoff + offs[k] + tt] * w[woff + k*v*L + c]

for tt < t, c < min(n_co, v*L). For a convolution, tt walks ``t`` output columns of
one output row, k walks the (channel, kernel row, kernel column) taps (``offs[k]``: where tap
k sits in the input, relative to the tile's first output) and the ``v`` vectors are ``v*L``
output channels, the weights packed tap-major. Consecutive output columns read consecutive
x elements: a strided layer's input is first split into column phases (see conv2d.py), so the
t broadcasts are constant offsets from one address register. (With the stride as a run-time
factor, the t column offsets took t general registers, and LLVM spilled the accumulators:
3x3 stride 2, 128 channels, 18.5 ms against 8.8.)

Why IR and not a Numba loop: the tile's ``t*v`` accumulators must stay in vector registers for
the whole tap loop (x86-64 with AVX-512 has 32), with one broadcast load and ``v`` FMAs per x
value. Written as Numba loops over a scratch tile, LLVM keeps the accumulators in memory
(scalar code, measured 5 GFLOP/s on LeNet's 5x5 layer); this kernel runs it at 172 GFLOP/s on
two cores, PyTorch's oneDNN at 150-160.

Each (t, v) is its own loop with its accumulators in SSA registers, selected by a ``switch``
inside the one intrinsic; so callers pass t and v as ordinary integers and the whole kernel is
part of the calling function's module, cached on disk with it. Lane count and the largest
tile follow the vector registers Numba compiles for: AVX-512, 16 float32 lanes and tiles up
to 14 x 2 (28 accumulators, 2 weight vectors, of 32 registers); otherwise 256-bit vectors and
tiles up to 6 x 2 (12 of 16).

The accumulators start from the bias; products are fused (``llvm.fma``, one rounding) and
summed in tap order. The tile leaves the registers transposed (log2(L) stages of shuffles per
L x L block) and goes to the output planes a channel row at a time, by constant-length copies
from a stack block (storing it through a scratch tile with Numba loops instead cost a third of
LeNet's 5x5 layer).

Numba's on-disk cache keys a function on its own source file only: after editing this
module, delete the cached ``conv2d`` and ``pool2d`` kernels (``fastconv/cpu/__pycache__/*.nb*``)
or they keep the old code.
"""

from __future__ import annotations

import contextlib
import functools
import platform

import llvmlite.binding as llvm_binding
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@functools.cache
def _wide_vectors() -> bool:
    """True where Numba compiles for 512-bit vectors (AVX-512F)."""
    features = numba.config.CPU_FEATURES
    if features is None:
        if numba.config.CPU_NAME not in (None, "host"):
            return False  # a named portable target (e.g. "generic"): assume the narrow path
        host = llvm_binding.get_host_cpu_features()
        return bool(host.get("avx512f", False))
    return "+avx512f" in features


def vector_bytes() -> int:
    return 64 if _wide_vectors() else 32


def lanes(dtype) -> int:
    """Output channels per vector for ``dtype`` (float32 or float64)."""
    return vector_bytes() // np.dtype(dtype).itemsize


def max_tile() -> int:
    """Largest t (output columns per tile) ``tile_fma`` takes, for v = 1 or 2."""
    return 14 if _wide_vectors() else 6


def _vector_type(context, dtype):
    """(LLVM vector type of ``lanes`` elements of the Numba float ``dtype``, element bytes)."""
    size = dtype.bitwidth // 8
    return ir.VectorType(context.get_data_type(dtype), vector_bytes() // size), size


def _float_runs(arrays, ints) -> bool:
    """Whether ``arrays`` are 1-D contiguous arrays of one float dtype and ``ints`` integers:
    the argument types the intrinsics below take."""
    return all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in arrays) \
        and arrays[0].dtype in (types.float32, types.float64) \
        and all(a.dtype == arrays[0].dtype for a in arrays) \
        and all(isinstance(a, types.Integer) for a in ints)


def _element_ptr(context, builder, signature, args, a, i):
    """Pointer to element ``args[i]`` of the 1-D array ``args[a]`` in an intrinsic's codegen."""
    tys = signature.args
    data = context.make_array(tys[a])(context, builder, args[a]).data
    return builder.gep(data, [context.cast(builder, args[i], tys[i], types.int64)])


def _transpose(builder, rows, lanes_n):
    """rows[c][l] <- rows[l][c] for a square block of lanes_n vectors: log2(lanes_n) stages,
    each swapping the off-diagonal d x d sub-blocks of row pairs (i, i + d) by two-input
    shuffles (vpermt2ps on AVX-512)."""
    rows = list(rows)
    d = lanes_n // 2
    while d:
        lo = ir.Constant(ir.VectorType(ir.IntType(32), lanes_n),
                         [q if not q & d else lanes_n + q - d for q in range(lanes_n)])
        hi = ir.Constant(ir.VectorType(ir.IntType(32), lanes_n),
                         [q + d if not q & d else lanes_n + q for q in range(lanes_n)])
        for i in range(lanes_n):
            if not i & d:
                a, b = rows[i], rows[i + d]
                rows[i], rows[i + d] = (builder.shuffle_vector(a, b, lo),
                                        builder.shuffle_vector(a, b, hi))
        d //= 2
    return rows


def _splat(builder, vty, scalar):
    """``scalar`` in every lane of a ``vty`` vector (one vbroadcastss/sd from memory)."""
    i32 = ir.IntType(32)
    undef = ir.Constant(vty, ir.Undefined)
    return builder.shuffle_vector(builder.insert_element(undef, scalar, ir.Constant(i32, 0)),
                                  undef, ir.Constant(ir.VectorType(i32, vty.count),
                                                     [0] * vty.count))


def _tap_loop(builder, name, nk, init, body):
    """A loop over taps k = 0 .. nk - 1 with the accumulators ``init`` (vector values) as loop
    phis, updated by ``body(k, acc) -> new acc``; nothing when nk <= 0. Leaves the builder
    after the loop and returns the final accumulators (phis there)."""
    i64 = ir.IntType(64)
    pre = builder.basic_block
    loop = builder.append_basic_block(f"{name}.loop")
    after = builder.append_basic_block(f"{name}.store")
    builder.cbranch(builder.icmp_signed(">", nk, ir.Constant(i64, 0)), loop, after)
    builder.position_at_end(loop)
    k = builder.phi(i64)
    k.add_incoming(ir.Constant(i64, 0), pre)
    acc = [builder.phi(a.type) for a in init]
    for a, a0 in zip(acc, init):
        a.add_incoming(a0, pre)
    new = body(k, acc)
    k1 = builder.add(k, ir.Constant(i64, 1))
    end = builder.basic_block
    k.add_incoming(k1, end)
    for a, a1 in zip(acc, new):
        a.add_incoming(a1, end)
    builder.cbranch(builder.icmp_signed("<", k1, nk), loop, after)
    builder.position_at_end(after)
    result = []
    for a0, a1 in zip(init, new):
        phi = builder.phi(a0.type)
        phi.add_incoming(a0, pre)
        phi.add_incoming(a1, end)
        result.append(phi)
    return result


def _emit_tile(builder, fn_fma, vty, align, ptrs, nk, ostride, n_co, t, v, done, scratch,
               cols=None):
    """One (t, v) case: its own tap loop with the accumulators as loop phis, started from the
    bias; then the tile, transposed per block of L columns, stored a channel row at a time;
    then a branch to ``done``. ``cols``: column tt's x offset from the tap's (i64 values
    computed before the loop; default tt)."""
    xbase, offs, wbase, bbase, obase = ptrs
    i64 = ir.IntType(64)
    lanes_n = vty.count
    vptr = vty.as_pointer()
    undef = ir.Constant(vty, ir.Undefined)

    def vload(ptr, off):
        return builder.load(builder.bitcast(builder.gep(ptr, [ir.Constant(i64, off)]), vptr),
                            align=align)

    init = [vload(bbase, vv * lanes_n) for vv in range(v)]

    def taps(k, acc):
        xk = builder.gep(xbase, [builder.load(builder.gep(offs, [k]))])
        wk = builder.gep(wbase, [builder.mul(k, ir.Constant(i64, v * lanes_n))])
        wv = [vload(wk, vv * lanes_n) for vv in range(v)]
        new = []
        for tt in range(t):
            b = _splat(builder, vty, builder.load(builder.gep(
                xk, [ir.Constant(i64, tt) if cols is None else cols[tt]])))
            new += [builder.call(fn_fma, [b, wv[vv], acc[tt * v + vv]]) for vv in range(v)]
        return new

    flat = _tap_loop(builder, f"tile{t}x{v}", nk, [init[q % v] for q in range(t * v)], taps)
    result = [flat[tt * v:(tt + 1) * v] for tt in range(t)]
    for vv in range(v):
        # This vector's channels that exist (the rest of a last block is padding).
        live = builder.select(builder.icmp_signed("<", n_co, ir.Constant(i64, vv * lanes_n)),
                              ir.Constant(i64, 0), builder.sub(n_co, ir.Constant(i64, vv * lanes_n)))
        live = builder.select(builder.icmp_signed(">", live, ir.Constant(i64, lanes_n)),
                              ir.Constant(i64, lanes_n), live)
        for blk in range(0, t, lanes_n):
            cols = min(lanes_n, t - blk)
            block = [result[blk + q][vv] if q < cols else undef for q in range(lanes_n)]
            # The transposed rows go through a stack scratch and leave it by a loop of
            # constant-length copies (a few moves each): a row per channel, unrolled with a
            # branch each, made this function take 18 s to compile; a masked vector store
            # measured ~4x slower on Zen 4.
            for c, row in enumerate(_transpose(builder, block, lanes_n)):
                builder.store(row, builder.gep(scratch, [ir.Constant(i64, c)]), align=align)
            with cgutils.for_range(builder, live) as loop:
                c = loop.index
                dst = builder.gep(obase, [builder.add(builder.mul(builder.add(
                    c, ir.Constant(i64, vv * lanes_n)), ostride), ir.Constant(i64, blk))])
                src = builder.bitcast(builder.gep(scratch, [c]), dst.type)
                cgutils.raw_memcpy(builder, dst, src, ir.Constant(i64, cols), align)
    builder.branch(done)


def _tile_prologue(context, builder, signature, args, pos):
    """What a tile intrinsic's codegen starts with. pos: the argument indices of its pointer
    operands, each an array followed by its offset, except ``offs`` at index 1 of pos (x,
    xoff, offs, w, woff, ...; tile_fma's: bias, boff, out, ooff). Returns (as_i64: argument
    index -> i64 value, the vector FMA, the vector type, the element size, the pointers: x +
    xoff, offs, then each further array + its offset; one L x L scratch block)."""
    tys = signature.args

    def data(i):
        return context.make_array(tys[i])(context, builder, args[i]).data

    def as_i64(i):
        return context.cast(builder, args[i], tys[i], types.int64)

    vty, size = _vector_type(context, tys[pos[0]].dtype)
    suffix = f"v{vty.count}{'f32' if size == 4 else 'f64'}"
    ptrs = (builder.gep(data(pos[0]), [as_i64(pos[1])]), data(pos[2]),
            *(builder.gep(data(a), [as_i64(o)]) for a, o in zip(pos[3::2], pos[4::2])))
    fn_fma = builder.module.declare_intrinsic(f"llvm.fma.{suffix}", (),
                                              ir.FunctionType(vty, [vty] * 3))
    scratch = cgutils.alloca_once(builder, vty, size=vty.count)
    return as_i64, fn_fma, vty, size, ptrs, scratch


@intrinsic
def tile_fma(typingctx, x, xoff, offs, nk, w, woff, bias, boff, out, ooff, ostride, n_co, t, v):
    """See the module docstring. x, w, bias, out: 1-D contiguous arrays of one float dtype
    (bias: v*L values from boff); offs: 1-D int64, at least nk entries; the rest integers.
    1 <= t <= ``max_tile()`` and v in (1, 2); other (t, v) store nothing. No bounds checks:
    the caller keeps every read and write inside its arrays."""
    if not _float_runs((x, w, bias, out), (xoff, nk, woff, boff, ooff, ostride, n_co, t, v)):
        return None
    if not (isinstance(offs, types.Array) and offs.dtype == types.int64 and offs.ndim == 1):
        return None
    sig = types.void(x, xoff, offs, nk, w, woff, bias, boff, out, ooff, ostride, n_co, t, v)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        as_i64, fn_fma, vty, size, ptrs, scratch = _tile_prologue(
            context, builder, signature, args, (0, 1, 2, 4, 5, 6, 7, 8, 9))
        key = builder.add(builder.mul(as_i64(13), ir.Constant(i64, 64)), as_i64(12))
        done = builder.append_basic_block("tile.done")
        switch = builder.switch(key, done)
        for vcase in (1, 2):
            for tcase in range(1, max_tile() + 1):
                block = builder.append_basic_block(f"tile{tcase}x{vcase}")
                switch.add_case(ir.Constant(i64, vcase * 64 + tcase), block)
                builder.position_at_end(block)
                _emit_tile(builder, fn_fma, vty, size, ptrs, as_i64(3), as_i64(10),
                           as_i64(11), tcase, vcase, done, scratch)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


# Tiles of several kernel rows. A weight-gradient tile (conv2d.py, "Weight gradients as
# tiles") has a kernel row's kW taps as its columns: 3 for a 3x3 layer, so 6 accumulators, and
# per tap 2 weight-vector loads and 3 broadcasts for 6 FMAs, which the loads bound. Taking r
# consecutive kernel rows of one channel as r*kW columns (x offsets i*rowstride + j; the
# output's taps (c, i, j) are consecutive in i too) fills the registers and halves the loads
# per FMA.
ROW_TILES = 3  # kernel rows a tile_fma_rows tile takes at most


@intrinsic
def tile_fma_rows(typingctx, x, xoff, rowstride, offs, nk, w, woff, bias, boff, out, ooff,
                  ostride, n_co, t, r, v):
    """``tile_fma`` with r rows of t columns, r*t columns in all::

        out[ooff + c*ostride + i*t + j] = bias[boff + c]
            + sum_k x[xoff + offs[k] + i*rowstride + j] * w[woff + k*v*L + c]

    for i < r, j < t, c < min(n_co, v*L). 2 <= r <= ``ROW_TILES``, r*t <= ``max_tile()``,
    v in (1, 2); other (t, r, v) store nothing. No bounds checks."""
    if not _float_runs((x, w, bias, out),
                       (xoff, rowstride, nk, woff, boff, ooff, ostride, n_co, t, r, v)):
        return None
    if not (isinstance(offs, types.Array) and offs.dtype == types.int64 and offs.ndim == 1):
        return None
    sig = types.void(x, xoff, rowstride, offs, nk, w, woff, bias, boff, out, ooff, ostride,
                     n_co, t, r, v)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        as_i64, fn_fma, vty, size, ptrs, scratch = _tile_prologue(
            context, builder, signature, args, (0, 1, 3, 5, 6, 7, 8, 9, 10))
        rowstride = as_i64(2)
        key = builder.add(builder.mul(builder.add(builder.mul(as_i64(15), ir.Constant(i64, 8)),
                                                  as_i64(14)), ir.Constant(i64, 64)), as_i64(13))
        done = builder.append_basic_block("tile_rows.done")
        switch = builder.switch(key, done)
        for vcase in (1, 2):
            for rcase in range(2, ROW_TILES + 1):
                for tcase in range(1, max_tile() // rcase + 1):
                    block = builder.append_basic_block(f"tile{rcase}x{tcase}x{vcase}")
                    switch.add_case(ir.Constant(i64, (vcase * 8 + rcase) * 64 + tcase), block)
                    builder.position_at_end(block)
                    rows = [builder.mul(rowstride, ir.Constant(i64, i)) for i in range(rcase)]
                    cols = [builder.add(rows[q // tcase], ir.Constant(i64, q % tcase))
                            for q in range(rcase * tcase)]
                    _emit_tile(builder, fn_fma, vty, size, ptrs, as_i64(4), as_i64(11),
                               as_i64(12), rcase * tcase, vcase, done, scratch, cols)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------- pixel tiles
# tile_fma's vectors are output channels: a conv with few of them (the input gradient of a
# layer whose input has 3 or 6 channels) fills 3 or 6 of 16 lanes. ``tile_fma_pixels`` turns
# the tile around: a vector holds L consecutive output pixels (one flat run of a plane whose
# rows are padded so that every tap is a constant offset), the t <= ``pixel_channels()``
# output channels are broadcast weights, and the tile adds its r vectors per channel to the
# output as they are (no transpose; adding lets a caller sum the taps in chunks of input
# channels that stay in cache). Per tap: t broadcasts and r unaligned vector loads for t*r
# FMAs.
def pixel_channels() -> int:
    """Largest t (output channels per pixel tile)."""
    return 8 if _wide_vectors() else 4


def pixel_vectors(t: int) -> int:
    """r, the vectors of pixels a tile of t channels takes: t*r accumulators, t broadcasts
    and one loaded vector within the vector registers (32 with AVX-512, else 16), at most 8."""
    regs = 32 if _wide_vectors() else 16
    return max(1, min(8, (regs - 1 - t) // t))


def _emit_pixel_tile(builder, fn_fma, vty, align, ptrs, nk, ostride, t, r, done):
    """One (t, r) case of tile_fma_pixels: its tap loop with t*r accumulators as phis from
    the output's values, then each channel's r vectors stored back at out + c*ostride; then a
    branch to done."""
    xbase, offs, wbase, obase = ptrs
    i64 = ir.IntType(64)
    lanes_n = vty.count
    vptr = vty.as_pointer()

    def vptr_at(ptr, off):
        return builder.bitcast(builder.gep(ptr, [off if isinstance(off, ir.Value)
                                                 else ir.Constant(i64, off)]), vptr)

    rows = [builder.gep(obase, [builder.mul(ir.Constant(i64, tt), ostride)]) for tt in range(t)]
    init = [builder.load(vptr_at(rows[tt], vv * lanes_n), align=align)
            for tt in range(t) for vv in range(r)]

    def taps(k, acc):
        xk = builder.gep(xbase, [builder.load(builder.gep(offs, [k]))])
        wk = builder.gep(wbase, [builder.mul(k, ir.Constant(i64, t))])
        bcast = [_splat(builder, vty, builder.load(builder.gep(wk, [ir.Constant(i64, tt)])))
                 for tt in range(t)]
        new = [None] * (t * r)
        for vv in range(r):  # one loaded vector live at a time
            xv = builder.load(vptr_at(xk, vv * lanes_n), align=align)
            for tt in range(t):
                new[tt * r + vv] = builder.call(fn_fma, [bcast[tt], xv, acc[tt * r + vv]])
        return new

    flat = _tap_loop(builder, f"pix{t}x{r}", nk, init, taps)
    result = [flat[tt * r:(tt + 1) * r] for tt in range(t)]
    for tt in range(t):
        for vv in range(r):
            builder.store(result[tt][vv], vptr_at(rows[tt], vv * lanes_n), align=align)
    builder.branch(done)


@intrinsic
def tile_fma_pixels(typingctx, x, xoff, offs, nk, w, woff, out, ooff, ostride, t, r):
    """A tile of t channels x r vectors of L pixels (see above)::

        out[ooff + c*ostride + q] += sum_k w[woff + k*t + c] * x[xoff + offs[k] + q]

    for c < t, q < r*L; 1 <= t <= ``pixel_channels()`` and r in (1, ``pixel_vectors(t)``);
    other (t, r) store nothing. x, w, out: 1-D contiguous arrays of one float dtype; offs:
    1-D int64, at least nk entries. No bounds checks: the caller keeps every read and write
    inside its arrays."""
    if not _float_runs((x, w, out), (xoff, nk, woff, ooff, ostride, t, r)):
        return None
    if not (isinstance(offs, types.Array) and offs.dtype == types.int64 and offs.ndim == 1):
        return None
    sig = types.void(x, xoff, offs, nk, w, woff, out, ooff, ostride, t, r)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        as_i64, fn_fma, vty, size, ptrs, _ = _tile_prologue(
            context, builder, signature, args, (0, 1, 2, 4, 5, 6, 7))
        key = builder.add(builder.mul(as_i64(9), ir.Constant(i64, 64)), as_i64(10))
        done = builder.append_basic_block("pix.done")
        switch = builder.switch(key, done)
        for tcase in range(1, pixel_channels() + 1):
            for rcase in sorted({1, pixel_vectors(tcase)}):
                block = builder.append_basic_block(f"pix{tcase}x{rcase}")
                switch.add_case(ir.Constant(i64, tcase * 64 + rcase), block)
                builder.position_at_end(block)
                _emit_pixel_tile(builder, fn_fma, vty, size, ptrs, as_i64(3), as_i64(8),
                                 tcase, rcase, done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------- short runs
# Copies of a few dozen elements (rows of 28-56 floats split into column phases for the tiles)
# run scalar when written as Numba loops: LLVM's vector loop takes 64 float32
# elements per iteration with AVX-512 (16 lanes x 4) and leaves shorter runs to its scalar
# remainder. ``copy_run`` moves them a vector at a time, the last vector overlapping the one
# before, so a run of 16 or more is whole vectors only.
def _emit_copy_run(builder, vty, align, dst, src, n, step):
    """dst[q] = src[q*step] for q < n, step 1 or 2 (a constant), n >= lanes: whole vectors,
    the last at n - lanes. Reads no element past src[(n-1)*step]."""
    i64, i32 = ir.IntType(64), ir.IntType(32)
    lanes_n = vty.count
    vptr = vty.as_pointer()

    def load(q):
        if step == 1:
            return builder.load(builder.bitcast(builder.gep(src, [q]), vptr), align=align)
        # Evens of src[2q .. 2q + 2L - 2]: from [2q, 2q + L) and [2q + L - 1, 2q + 2L - 1),
        # so nothing past the last element read is touched.
        at = builder.mul(q, ir.Constant(i64, 2))
        a = builder.load(builder.bitcast(builder.gep(src, [at]), vptr), align=align)
        b = builder.load(builder.bitcast(builder.gep(src, [builder.add(
            at, ir.Constant(i64, lanes_n - 1))]), vptr), align=align)
        half = lanes_n // 2
        mask = [2 * m for m in range(half)] + [lanes_n + 1 + 2 * m for m in range(half)]
        return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, lanes_n), mask))

    def store(q, value):
        builder.store(value, builder.bitcast(builder.gep(dst, [q]), vptr), align=align)

    full = builder.udiv(n, ir.Constant(i64, lanes_n))
    with cgutils.for_range(builder, full) as loop:
        q = builder.mul(loop.index, ir.Constant(i64, lanes_n))
        store(q, load(q))
    last = builder.sub(n, ir.Constant(i64, lanes_n))
    store(last, load(last))


@intrinsic
def copy_run(typingctx, dst, d0, src, s0, n, step):
    """dst[d0 + q] = src[s0 + q*step] for q < n (1-D contiguous arrays of one float dtype,
    no overlap). Vectors for step 1 or 2 when n >= ``lanes``; an element loop otherwise. No
    bounds checks: the caller keeps both runs inside their arrays."""
    if not _float_runs((dst, src), (d0, s0, n, step)):
        return None
    sig = types.void(dst, d0, src, s0, n, step)

    def codegen(context, builder, signature, args):
        tys = signature.args
        i64 = ir.IntType(64)

        def as_i64(i):
            return context.cast(builder, args[i], tys[i], types.int64)

        vty, size = _vector_type(context, tys[0].dtype)
        dst_p = _element_ptr(context, builder, signature, args, 0, 1)
        src_p = _element_ptr(context, builder, signature, args, 2, 3)
        n_v, step_v = as_i64(4), as_i64(5)
        one = builder.icmp_signed("==", step_v, ir.Constant(i64, 1))
        two = builder.icmp_signed("==", step_v, ir.Constant(i64, 2))
        vectors = builder.and_(builder.icmp_signed(">=", n_v, ir.Constant(i64, vty.count)),
                               builder.or_(one, two))
        with builder.if_else(vectors) as (by_vectors, by_elements):
            with by_vectors:
                with builder.if_else(one) as (unit, pairs):
                    with unit:
                        _emit_copy_run(builder, vty, size, dst_p, src_p, n_v, 1)
                    with pairs:
                        _emit_copy_run(builder, vty, size, dst_p, src_p, n_v, 2)
            with by_elements:
                with cgutils.for_range(builder, n_v) as loop:
                    value = builder.load(builder.gep(src_p, [builder.mul(loop.index, step_v)]))
                    builder.store(value, builder.gep(dst_p, [loop.index]))
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------- streaming stores
@intrinsic
def stream_run(typingctx, dst, d0, src, s0, n):
    """dst[d0 + q] = src[s0 + q] for q < n (1-D contiguous arrays of one float dtype, no
    overlap, no bounds checks): the whole vectors of dst that the run covers by non-temporal
    (streaming) stores, which write memory without first reading the lines into the cache;
    the elements before the first and after the last such vector by plain stores. For large
    outputs written once: on the Intel Xeon a 100 MB fill ran at 36 GB/s streamed, 17 GB/s
    plain. (A Numba loop cannot express it: LLVM dropped the nontemporal mark of a scalar
    store in a copy loop, and made the others scalar ``movnti``.) The caller fences with
    ``stream_fence`` before the run is read elsewhere."""
    if not _float_runs((dst, src), (d0, s0, n)):
        return None
    sig = types.void(dst, d0, src, s0, n)

    def codegen(context, builder, signature, args):
        tys = signature.args
        i64 = ir.IntType(64)
        vty, size = _vector_type(context, tys[0].dtype)
        lanes_n = vty.count
        vptr = vty.as_pointer()
        dst_p = _element_ptr(context, builder, signature, args, 0, 1)
        src_p = _element_ptr(context, builder, signature, args, 2, 3)
        n_v = context.cast(builder, args[4], tys[4], types.int64)
        nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])

        def plain(q):
            builder.store(builder.load(builder.gep(src_p, [q])), builder.gep(dst_p, [q]))

        # Elements up to dst's first vector-aligned address (dst is element-aligned).
        at = builder.udiv(builder.ptrtoint(dst_p, i64), ir.Constant(i64, size))
        head = builder.urem(builder.sub(ir.Constant(i64, lanes_n),
                                        builder.urem(at, ir.Constant(i64, lanes_n))),
                            ir.Constant(i64, lanes_n))
        head = builder.select(builder.icmp_signed("<", head, n_v), head, n_v)
        with cgutils.for_range(builder, head) as loop:
            plain(loop.index)
        full = builder.udiv(builder.sub(n_v, head), ir.Constant(i64, lanes_n))
        with cgutils.for_range(builder, full) as loop:
            q = builder.add(head, builder.mul(loop.index, ir.Constant(i64, lanes_n)))
            value = builder.load(builder.bitcast(builder.gep(src_p, [q]), vptr), align=size)
            store = builder.store(value, builder.bitcast(builder.gep(dst_p, [q]), vptr),
                                  align=lanes_n * size)
            store.set_metadata("nontemporal", nontemporal)
        tail = builder.add(head, builder.mul(full, ir.Constant(i64, lanes_n)))
        with cgutils.for_range(builder, builder.sub(n_v, tail)) as loop:
            plain(builder.add(tail, loop.index))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def stream_fence(typingctx):
    """Order the streaming stores made so far (``sfence`` on x86, nothing elsewhere): they
    are weakly ordered, so a kernel fences them once at the end of its work item, before
    another thread may read them, rather than trust the threading layer's synchronisation.
    Not after each ``stream_run``: a fence per 4 KiB run waits for the stores to drain, and
    took max pooling's gradient from 7.2 back to 10 ms."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            builder.call(builder.module.declare_intrinsic(
                "llvm.x86.sse.sfence", (), ir.FunctionType(ir.VoidType(), [])), [])
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------- vector width
# LLVM's Intel targets with AVX-512 (Skylake-SP on) prefer 256-bit vectors: on the servers
# that introduced it, 512-bit instructions lowered the clock. The pooling kernels are
# shuffles, compares and blends over memory-speed streams, and gain from 512-bit vectors
# (3x3/s2 max pooling's row maxima with codes over 32x64x112x112, 2 threads: 7.3 -> 3.7 ms on
# the Xeon), while the conv kernels did not; so the attribute is asked for per function.
_PREFER_WIDE = '"prefer-vector-width"="512"'


@intrinsic
def prefer_wide_vectors(typingctx):
    """Let LLVM vectorise the calling function with 512-bit vectors where the target has
    them (AVX-512): the function attribute ``"prefer-vector-width"="512"``, which overrides
    the target's preference for that function only. Nothing elsewhere. Call it in the body
    of a ``prange`` loop: Numba outlines that body into a function of its own."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86 and _wide_vectors():
            # llvmlite's attribute set accepts only its listed keywords; LLVM IR takes this
            # string attribute where they go, written as is. Should a later llvmlite store
            # attributes otherwise, the kernels keep LLVM's own width (a test notices).
            try:
                set.add(builder.function.attributes, _PREFER_WIDE)
            except TypeError:
                pass
        return context.get_dummy_value()

    return sig, codegen


# ------------------------------------------------------------------------ prefetch
@intrinsic
def prefetch_run(typingctx, src, s0, n):
    """Ask for src[s0 : s0 + n] in the cache: ``llvm.prefetch`` (a read, kept in all levels)
    of each 64-byte line, a hint that never faults. For kernels that work through a large
    input a short row at a time, computing between rows: the hardware prefetchers did not
    keep ahead of max pooling's rows (see pool2d's _AHEAD_BYTES). ``src`` a 1-D contiguous
    array of numbers."""
    if not (isinstance(src, types.Array) and src.ndim == 1 and src.layout == "C"
            and isinstance(src.dtype, types.Number) and isinstance(s0, types.Integer)
            and isinstance(n, types.Integer)):
        return None
    sig = types.void(src, s0, n)

    def codegen(context, builder, signature, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        size = context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype))
        bptr = ir.IntType(8).as_pointer()
        start = builder.bitcast(_element_ptr(context, builder, signature, args, 0, 1), bptr)
        nbytes = builder.mul(context.cast(builder, args[2], signature.args[2], types.int64),
                             ir.Constant(i64, size))
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [bptr], ir.FunctionType(ir.VoidType(), [bptr, i32, i32, i32]))
        lines = builder.udiv(builder.add(nbytes, ir.Constant(i64, 63)), ir.Constant(i64, 64))
        with cgutils.for_range(builder, lines) as loop:
            at = builder.gep(start, [builder.mul(loop.index, ir.Constant(i64, 64))])
            builder.call(fn, [at, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


# ------------------------------------------------------------------------ block transpose
@intrinsic
def transpose_block(typingctx, dst, d0, dstride, src, s0, sstride):
    """dst[d0 + c*dstride + r] = src[s0 + r*sstride + c] for r, c < L (``lanes``): one L x L
    block, as L vector loads, the shuffle stages of the tile's store, and L vector stores.
    (Element loops over such a block ran scalar: packing ResNet's stem gradient, 25.7 MB,
    took 4.4 ms.) 1-D contiguous arrays of one float dtype, no overlap, no bounds checks."""
    if not _float_runs((dst, src), (d0, dstride, s0, sstride)):
        return None
    sig = types.void(dst, d0, dstride, src, s0, sstride)

    def codegen(context, builder, signature, args):
        tys = signature.args

        def as_i64(i):
            return context.cast(builder, args[i], tys[i], types.int64)

        vty, size = _vector_type(context, tys[0].dtype)
        vptr = vty.as_pointer()
        dst_p = _element_ptr(context, builder, signature, args, 0, 1)
        src_p = _element_ptr(context, builder, signature, args, 3, 4)
        dstride, sstride = as_i64(2), as_i64(5)
        rows = []
        for r in range(vty.count):
            at = builder.mul(ir.Constant(ir.IntType(64), r), sstride)
            rows.append(builder.load(builder.bitcast(builder.gep(src_p, [at]), vptr),
                                     align=size))
        for c, row in enumerate(_transpose(builder, rows, vty.count)):
            at = builder.mul(ir.Constant(ir.IntType(64), c), dstride)
            builder.store(row, builder.bitcast(builder.gep(dst_p, [at]), vptr), align=size)
        return context.get_dummy_value()

    return sig, codegen


# ------------------------------------------------------------- Winograd transform bands
# F(2x2, 3x3)'s transforms (conv2d.py) map one band of tiles (a tile row) of one channel to
# 16 planes, tile t of plane k at vf[base + k*stride + t]. Written as Numba loops over the
# tiles they ran scalar: each tile reads its patch at stride 2 and writes 16 planes, which
# LLVM's loop vectoriser does not take on. Here a vector holds L consecutive tiles: a patch
# row's columns 2t, 2t + 1 (and 2t + 2, 2t + 3) are the even and odd lanes of two vector
# loads, split by shuffles, and each plane gets one vector store. Masked loads read zeros
# outside the input (padding, a plane's last column or row); masked stores stop at the band's
# last tile or output column. The arithmetic is the scalar loops', operation for operation,
# in the tensor's dtype (the weight gradient's loop had mixed in a float64 zero, so its float32
# planes could differ from these by an ulp). Unit column step only: conv2d splits a dilated
# layer's columns into phases first. Measured (one thread, 64 channels on 56x56, a 3x3 layer's
# transforms of one image):
# input 0.30 -> 0.12 ms, grad_out 0.31 -> 0.11 ms.
class _Lanes:
    """Vector helpers for one intrinsic's codegen: masks, masked loads and stores, shuffles."""

    def __init__(self, context, builder, dtype):
        self.b = builder
        self.vty, self.size = _vector_type(context, dtype)
        self.n = self.vty.count
        i32, i1 = ir.IntType(32), ir.IntType(1)
        self.i32, self.i64 = i32, ir.IntType(64)
        self.mty = ir.VectorType(i1, self.n)
        self.iota = ir.Constant(ir.VectorType(i32, self.n), list(range(self.n)))
        suffix = f"v{self.n}{'f32' if self.size == 4 else 'f64'}.p0"
        vptr = self.vty.as_pointer()
        module = builder.module
        self._load = module.declare_intrinsic(
            f"llvm.masked.load.{suffix}", (),
            ir.FunctionType(self.vty, [vptr, i32, self.mty, self.vty]))
        self._store = module.declare_intrinsic(
            f"llvm.masked.store.{suffix}", (),
            ir.FunctionType(ir.VoidType(), [self.vty, vptr, i32, self.mty]))
        self.zero = ir.Constant(self.vty, None)

    def const(self, v):
        return ir.Constant(self.i64, v)

    def splat(self, value, vt=None):
        """``value`` in every lane of a vector of type ``vt`` (default: the float vector)."""
        vt = vt or self.vty
        u = self.b.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(self.i32, 0))
        return self.b.shuffle_vector(u, u, ir.Constant(ir.VectorType(self.i32, self.n),
                                                       [0] * self.n))

    def _splat32(self, v):
        return self.splat(v, ir.VectorType(self.i32, self.n))

    def _clamp(self, v):
        b = self.b
        lo, hi = self.const(-1), self.const(self.n + 1)
        v = b.select(b.icmp_signed("<", v, lo), lo, v)
        v = b.select(b.icmp_signed(">", v, hi), hi, v)
        return b.trunc(v, self.i32)

    def mask(self, lo, hi):
        """Lanes i with lo <= i < hi (i64 scalars, any values)."""
        b = self.b
        return b.and_(b.icmp_signed(">=", self.iota, self._splat32(self._clamp(lo))),
                      b.icmp_signed("<", self.iota, self._splat32(self._clamp(hi))))

    def below(self, hi):
        """Lanes i < hi."""
        return self.b.icmp_signed("<", self.iota, self._splat32(self._clamp(hi)))

    def _at(self, base, off):
        # Not inbounds: a masked access's first lanes may lie before the array (padding).
        return self.b.bitcast(self.b.gep(base, [off]), self.vty.as_pointer())

    def load(self, base, off, mask):
        return self.b.call(self._load, [self._at(base, off), ir.Constant(self.i32, self.size),
                                        mask, self.zero])

    def store(self, value, base, off, mask):
        self.b.call(self._store, [value, self._at(base, off), ir.Constant(self.i32, self.size),
                                  mask])

    def _shuffle(self, a, c, idx):
        return self.b.shuffle_vector(a, c, ir.Constant(ir.VectorType(self.i32, self.n), idx))

    def evens(self, a, c):
        """Lanes 0, 2, 4, ... of the 2L elements a, c."""
        return self._shuffle(a, c, [2 * i for i in range(self.n)])

    def odds(self, a, c):
        return self._shuffle(a, c, [2 * i + 1 for i in range(self.n)])

    def interleave(self, e, o):
        """(first L, last L) of e0, o0, e1, o1, ...: the inverse of evens and odds."""
        h = self.n // 2
        lo = [i // 2 + (self.n if i % 2 else 0) for i in range(self.n)]
        hi = [h + i // 2 + (self.n if i % 2 else 0) for i in range(self.n)]
        return self._shuffle(e, o, lo), self._shuffle(e, o, hi)

    @contextlib.contextmanager
    def blocks(self, n):
        """A loop over the blocks of L of n tiles; yields the block's first tile."""
        count = self.b.udiv(self.b.add(n, self.const(self.n - 1)), self.const(self.n))
        with cgutils.for_range(self.b, count) as loop:
            yield self.b.mul(loop.index, self.const(self.n))


def _band_args(context, builder, signature, args):
    """Data pointers of the array arguments, i64 of the integer ones, the rest as they are,
    in argument order."""
    out = []
    for ty, arg in zip(signature.args, args):
        if isinstance(ty, types.Array):
            out.append(context.make_array(ty)(context, builder, arg).data)
        elif isinstance(ty, types.Integer):
            out.append(context.cast(builder, arg, ty, types.int64))
        else:
            out.append(arg)
    return out


@intrinsic
def winograd_input_band(typingctx, x, r0, r1, r2, r3, left, w, vf, base, stride, n):
    """vf[base + k*stride + t] = element k of B^T d B for tiles t < n, d the 4x4 patch of
    rows x[r_a + c] (a < 4; r_a < 0: a row of zeros), columns c = left + 2t + b (b < 4),
    zero outside [0, w). x, vf: 1-D contiguous arrays of one float dtype; no bounds checks
    beyond the ones named."""
    if not _float_runs((x, vf), (r0, r1, r2, r3, left, w, base, stride, n)):
        return None
    sig = types.void(x, r0, r1, r2, r3, left, w, vf, base, stride, n)

    def codegen(context, builder, signature, args):
        xp, *rows, left_v, w_v, vp, base_v, stride_v, n_v = _band_args(context, builder,
                                                                        signature, args)
        lv = _Lanes(context, builder, signature.args[0].dtype)
        b = builder
        with lv.blocks(n_v) as q:
            c0 = b.add(left_v, b.mul(q, lv.const(2)))
            patch = []
            for r in rows:
                valid = b.icmp_signed(">=", r, lv.const(0))
                vecs = []
                for shift in (0, lv.n, 2, lv.n + 2):
                    start = b.add(c0, lv.const(shift))
                    lo = b.neg(start)
                    hi = b.select(valid, b.sub(w_v, start), lo)
                    vecs.append(lv.load(xp, b.add(r, start), lv.mask(lo, hi)))
                a0, a1, a2, a3 = vecs
                patch.append((lv.evens(a0, a1), lv.odds(a0, a1), lv.evens(a2, a3),
                              lv.odds(a2, a3)))
            p0, p1, p2, p3 = patch
            d = [[b.fsub(p0[j], p2[j]) for j in range(4)],
                 [b.fadd(p1[j], p2[j]) for j in range(4)],
                 [b.fsub(p2[j], p1[j]) for j in range(4)],
                 [b.fsub(p1[j], p3[j]) for j in range(4)]]
            live = lv.below(b.sub(n_v, q))
            at = b.add(base_v, q)
            for i, (e0, e1, e2, e3) in enumerate(d):
                for j, v in enumerate((b.fsub(e0, e2), b.fadd(e1, e2), b.fsub(e2, e1),
                                       b.fsub(e1, e3))):
                    lv.store(v, vp, b.add(at, b.mul(stride_v, lv.const(4 * i + j))), live)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def winograd_grad_band(typingctx, g, r0, r1, count, uf, base, stride, n):
    """uf[base + k*stride + t] = element k of A H A^T for tiles t < n, H the 2x2 tile of rows
    g[r0 + c], g[r1 + c] (r1 < 0: zeros), columns c = 2t, 2t + 1, zero from ``count`` on.
    g, uf: 1-D contiguous arrays of one float dtype."""
    if not _float_runs((g, uf), (r0, r1, count, base, stride, n)):
        return None
    sig = types.void(g, r0, r1, count, uf, base, stride, n)

    def codegen(context, builder, signature, args):
        gp, r0_v, r1_v, count_v, up, base_v, stride_v, n_v = _band_args(context, builder,
                                                                        signature, args)
        lv = _Lanes(context, builder, signature.args[0].dtype)
        b = builder
        with lv.blocks(n_v) as q:
            c0 = b.mul(q, lv.const(2))
            h = []
            for r in (r0_v, r1_v):
                valid = b.icmp_signed(">=", r, lv.const(0))
                vecs = []
                for shift in (0, lv.n):
                    start = b.add(c0, lv.const(shift))
                    hi = b.select(valid, b.sub(count_v, start), lv.const(0))
                    vecs.append(lv.load(gp, b.add(r, start), lv.below(hi)))
                h.append((lv.evens(*vecs), lv.odds(*vecs)))
            (h00, h01), (h10, h11) = h
            rows = ((h00, h01), (b.fadd(h00, h10), b.fadd(h01, h11)),
                    (b.fsub(h00, h10), b.fsub(h01, h11)), (b.fneg(h10), b.fneg(h11)))
            live = lv.below(b.sub(n_v, q))
            at = b.add(base_v, q)
            for i, (x0, x1) in enumerate(rows):
                for j, v in enumerate((x0, b.fadd(x0, x1), b.fsub(x0, x1), b.fneg(x1))):
                    lv.store(v, up, b.add(at, b.mul(stride_v, lv.const(4 * i + j))), live)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def winograd_output_band(typingctx, mf, base, stride, y, top, bottom, count, bias, n):
    """y[top + c], y[bottom + c] (bottom < 0: not written) for columns c < count = bias +
    (A^T M A) of tile c // 2, M's element k of tile t at mf[base + k*stride + t], t < n.
    mf, y: 1-D contiguous arrays of one float dtype; bias a float."""
    if not _float_runs((mf, y), (base, stride, top, bottom, count, n)) \
            or not isinstance(bias, types.Float):
        return None
    sig = types.void(mf, base, stride, y, top, bottom, count, mf.dtype, n)

    def codegen(context, builder, signature, args):
        b = builder
        vals = _band_args(context, builder, signature, args)
        mp, base_v, stride_v, yp, top_v, bot_v, count_v, _, n_v = vals
        lv = _Lanes(context, builder, signature.args[0].dtype)
        bias_v = lv.splat(args[7])
        has_bottom = b.icmp_signed(">=", bot_v, lv.const(0))
        with lv.blocks(n_v) as q:
            live = lv.below(b.sub(n_v, q))
            at = b.add(base_v, q)
            m = [lv.load(mp, b.add(at, b.mul(stride_v, lv.const(k))), live) for k in range(16)]
            s0 = [b.fadd(b.fadd(m[j], m[4 + j]), m[8 + j]) for j in range(4)]
            s1 = [b.fsub(b.fsub(m[4 + j], m[8 + j]), m[12 + j]) for j in range(4)]
            c0 = b.mul(q, lv.const(2))
            for s, row, write in ((s0, top_v, None), (s1, bot_v, has_bottom)):
                even = b.fadd(b.fadd(b.fadd(bias_v, s[0]), s[1]), s[2])
                odd = b.fsub(b.fsub(b.fadd(bias_v, s[1]), s[2]), s[3])
                for half, v in enumerate(lv.interleave(even, odd)):
                    start = b.add(c0, lv.const(half * lv.n))
                    hi = b.sub(count_v, start)
                    if write is not None:
                        hi = b.select(write, hi, lv.const(0))
                    lv.store(v, yp, b.add(row, start), lv.below(hi))
        return context.get_dummy_value()

    return sig, codegen


# ------------------------------------------------- Winograd F(4x4, 3x3) transform bands
# F(4x4, 3x3) at the points 0, 1, -1, 2, -1/2 (and infinity): 36 multiplies per 4x4 output
# tile where F(2x2, 3x3) does 16 per 2x2, so 1.78x fewer GEMM flops and transform planes per
# output. Of the point sets tried (float32, 3x3 layers of 64 and 256 channels, error against
# float64 as a multiple of PyTorch's own): 0, +-1, +-2 gave 12-18x, 0, +-1, +-1/2 12-19x,
# these 4.5-7x. Y = A^T [ (G g G^T) . (B^T d B) ] A; every entry of A^T and B^T is a small
# multiple of a power of 2, so the transforms round only in their sums.
WINOGRAD4_AT = ((1.0, 1.0, 1.0, 1.0, 1.0, 0.0),
                (0.0, 1.0, -1.0, 2.0, -0.5, 0.0),
                (0.0, 1.0, 1.0, 4.0, 0.25, 0.0),
                (0.0, 1.0, -1.0, 8.0, -0.125, 1.0))
WINOGRAD4_BT = ((1.0, 1.5, -2.0, -1.5, 1.0, 0.0),
                (0.0, -1.0, -2.5, -0.5, 1.0, 0.0),
                (0.0, 1.0, 0.5, -2.5, 1.0, 0.0),
                (0.0, -0.5, -1.0, 0.5, 1.0, 0.0),
                (0.0, 2.0, -1.0, -2.0, 1.0, 0.0),
                (0.0, 1.0, 1.5, -2.0, -1.5, 1.0))
# G = [p^k / prod_{l != j} (p_j - p_l)] per point p_j, and (0, 0, 1) for infinity.
WINOGRAD4_G = ((1.0, 0.0, 0.0),
               (-1 / 3, -1 / 3, -1 / 3),
               (1 / 3, -1 / 3, 1 / 3),
               (1 / 15, 2 / 15, 4 / 15),
               (-16 / 15, 8 / 15, -4 / 15),
               (0.0, 0.0, 1.0))


def _combine(lv, fma, coeffs, vecs):
    """sum_j coeffs[j] * vecs[j] (constant coefficients, zeros skipped, +-1 as adds, the
    others fused multiply-adds), in order of j."""
    b, acc = lv.b, None
    for c, v in zip(coeffs, vecs):
        if c == 0:
            continue
        if acc is None:
            acc = v if c == 1 else b.fneg(v) if c == -1 else \
                b.fmul(ir.Constant(lv.vty, [c] * lv.n), v)
        elif c == 1:
            acc = b.fadd(acc, v)
        elif c == -1:
            acc = b.fsub(acc, v)
        else:
            acc = b.call(fma, [ir.Constant(lv.vty, [c] * lv.n), v, acc])
    return acc


def _fma_of(lv):
    suffix = f"v{lv.n}{'f32' if lv.size == 4 else 'f64'}"
    return lv.b.module.declare_intrinsic(f"llvm.fma.{suffix}", (),
                                         ir.FunctionType(lv.vty, [lv.vty] * 3))


@intrinsic
def winograd4_input_band(typingctx, x, r0, r1, r2, r3, r4, r5, left, w, vf, base, stride, n):
    """vf[base + k*stride + t] = element k of B^T d B (``WINOGRAD4_BT``) for tiles t < n, d
    the 6x6 patch of rows x[r_a + c] (a < 6; r_a < 0: a row of zeros), columns c = left + 4t +
    b (b < 6), zero outside [0, w). As ``winograd_input_band``: a vector holds L tiles; a
    patch row's columns 4t + b (b < 4) are lanes b, b + 4, ... of four vector loads, split by
    two rounds of shuffles, and columns 4t + 4, 4t + 5 are columns 0 and 1 one tile on."""
    if not _float_runs((x, vf), (r0, r1, r2, r3, r4, r5, left, w, base, stride, n)):
        return None
    sig = types.void(x, r0, r1, r2, r3, r4, r5, left, w, vf, base, stride, n)

    def codegen(context, builder, signature, args):
        xp, *rest = _band_args(context, builder, signature, args)
        rows, (left_v, w_v, vp, base_v, stride_v, n_v) = rest[:6], rest[6:]
        lv = _Lanes(context, builder, signature.args[0].dtype)
        fma = _fma_of(lv)
        b, L = builder, lv.n
        two = lv.const(2)
        with lv.blocks(n_v) as q:
            c0 = b.add(left_v, b.mul(q, lv.const(4)))
            cols = []  # per patch row, its 6 column vectors transformed: d B
            for r in rows:
                valid = b.icmp_signed(">=", r, lv.const(0))
                vecs = []
                for s in range(5):
                    start = b.add(c0, lv.const(s * L))
                    lo = b.neg(start)
                    hi = b.sub(w_v, start)
                    if s == 4:  # only the next tile's first two columns
                        hi = b.select(b.icmp_signed(">", hi, two), two, hi)
                    hi = b.select(valid, hi, lo)
                    vecs.append(lv.load(xp, b.add(r, start), lv.mask(lo, hi)))
                e01, o01 = lv.evens(vecs[0], vecs[1]), lv.odds(vecs[0], vecs[1])
                e23, o23 = lv.evens(vecs[2], vecs[3]), lv.odds(vecs[2], vecs[3])
                d0, d2 = lv.evens(e01, e23), lv.odds(e01, e23)
                d1, d3 = lv.evens(o01, o23), lv.odds(o01, o23)
                nxt = list(range(1, L))
                d4 = lv._shuffle(d0, vecs[4], nxt + [L])
                d5 = lv._shuffle(d1, vecs[4], nxt + [L + 1])
                d = (d0, d1, d2, d3, d4, d5)
                cols.append([_combine(lv, fma, WINOGRAD4_BT[j], d) for j in range(6)])
            live = lv.below(b.sub(n_v, q))
            at = b.add(base_v, q)
            for i in range(6):
                for j in range(6):
                    v = _combine(lv, fma, WINOGRAD4_BT[i], [cols[a][j] for a in range(6)])
                    lv.store(v, vp, b.add(at, b.mul(stride_v, lv.const(6 * i + j))), live)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def winograd4_output_band(typingctx, mf, base, stride, y, r0, r1, r2, r3, count, bias, n):
    """y[r_u + c] (u < 4; r_u < 0: not written) for columns c < count = bias + (A^T M A)[u,
    c % 4] (``WINOGRAD4_AT``) of tile c // 4, M's element k of tile t at mf[base + k*stride +
    t], t < n. mf, y: 1-D contiguous arrays of one float dtype; bias a float."""
    if not _float_runs((mf, y), (base, stride, r0, r1, r2, r3, count, n)) \
            or not isinstance(bias, types.Float):
        return None
    sig = types.void(mf, base, stride, y, r0, r1, r2, r3, count, mf.dtype, n)

    def codegen(context, builder, signature, args):
        b = builder
        mp, base_v, stride_v, yp, *rows, count_v, _, n_v = _band_args(context, builder,
                                                                      signature, args)
        lv = _Lanes(context, builder, signature.args[0].dtype)
        fma = _fma_of(lv)
        bias_v = lv.splat(args[9])
        writes = [b.icmp_signed(">=", r, lv.const(0)) for r in rows]
        with lv.blocks(n_v) as q:
            live = lv.below(b.sub(n_v, q))
            at = b.add(base_v, q)
            m = [lv.load(mp, b.add(at, b.mul(stride_v, lv.const(k))), live) for k in range(36)]
            s = [[_combine(lv, fma, WINOGRAD4_AT[u], [m[6 * a + j] for a in range(6)])
                  for j in range(6)] for u in range(4)]
            c0 = b.mul(q, lv.const(4))
            for u in range(4):
                yv = [b.fadd(bias_v, _combine(lv, fma, WINOGRAD4_AT[v], s[u])) for v in range(4)]
                p_lo, p_hi = lv.interleave(yv[0], yv[2])
                q_lo, q_hi = lv.interleave(yv[1], yv[3])
                out = (*lv.interleave(p_lo, q_lo), *lv.interleave(p_hi, q_hi))
                for part, v in enumerate(out):
                    start = b.add(c0, lv.const(part * lv.n))
                    hi = b.select(writes[u], b.sub(count_v, start), lv.const(0))
                    lv.store(v, yp, b.add(rows[u], start), lv.below(hi))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def winograd4_grad_band(typingctx, g, r0, r1, r2, r3, count, uf, base, stride, n):
    """uf[base + k*stride + t] = element k of A H A^T (A = ``WINOGRAD4_AT`` transposed) for
    tiles t < n, H the 4x4 tile of rows g[r_u + c] (u < 4; r_u < 0: a row of zeros), columns
    c = 4t + v (v < 4), zero from ``count`` on: F(4x4, 3x3)'s grad_out transform for the
    weight gradient, the dual of ``winograd4_output_band``. Columns split four ways as in
    ``winograd4_input_band``. g, uf: 1-D contiguous arrays of one float dtype."""
    if not _float_runs((g, uf), (r0, r1, r2, r3, count, base, stride, n)):
        return None
    sig = types.void(g, r0, r1, r2, r3, count, uf, base, stride, n)

    def codegen(context, builder, signature, args):
        gp, *rest = _band_args(context, builder, signature, args)
        rows, (count_v, up, base_v, stride_v, n_v) = rest[:4], rest[4:]
        lv = _Lanes(context, builder, signature.args[0].dtype)
        fma = _fma_of(lv)
        b, L = builder, lv.n
        with lv.blocks(n_v) as q:
            c0 = b.mul(q, lv.const(4))
            cols = []  # per tile row u, its 6 column combinations: (H A^T)[u, j]
            for r in rows:
                valid = b.icmp_signed(">=", r, lv.const(0))
                vecs = []
                for s in range(4):
                    start = b.add(c0, lv.const(s * L))
                    hi = b.select(valid, b.sub(count_v, start), lv.const(0))
                    vecs.append(lv.load(gp, b.add(r, start), lv.below(hi)))
                e01, o01 = lv.evens(vecs[0], vecs[1]), lv.odds(vecs[0], vecs[1])
                e23, o23 = lv.evens(vecs[2], vecs[3]), lv.odds(vecs[2], vecs[3])
                h = (lv.evens(e01, e23), lv.evens(o01, o23), lv.odds(e01, e23),
                     lv.odds(o01, o23))
                cols.append([_combine(lv, fma, [WINOGRAD4_AT[v][j] for v in range(4)], h)
                             for j in range(6)])
            live = lv.below(b.sub(n_v, q))
            at = b.add(base_v, q)
            for i in range(6):
                for j in range(6):
                    v = _combine(lv, fma, [WINOGRAD4_AT[u][i] for u in range(4)],
                                 [cols[u][j] for u in range(4)])
                    lv.store(v, up, b.add(at, b.mul(stride_v, lv.const(6 * i + j))), live)
        return context.get_dummy_value()

    return sig, codegen


# ------------------------------------------------------------------------ pooling
@intrinsic
def window_max3_s2(typingctx, x, a, hv, hc, d, n, coded):
    """hv[d + t] = the max of x[a + 2t + j], j = 0, 1, 2, in that order (a later tap wins if
    greater or NaN), and, if ``coded``, hc[d + t] = its j (as a float32), for t < n. x, hv:
    1-D contiguous arrays of one float dtype; hc: 1-D contiguous float32. Reads and writes
    only those elements (masked at the end).

    Why IR: written as a Numba loop, LLVM groups two of the three stride-2 taps into one
    interleaved load and gathers the third (two ``vgatherqps`` per 16 windows, the hottest
    instructions of 3x3/s2 max pooling). Here each block of L windows is four plain loads:
    the evens and odds of x[a + 2q ...] are taps 0 and 1, the evens of x[a + 2q + 2 ...] tap 2.
    """
    if not (_float_runs((x, hv), (a, d, n)) and isinstance(hc, types.Array) and hc.ndim == 1
            and hc.layout == "C" and hc.dtype == types.float32
            and isinstance(coded, types.Boolean)):
        return None
    sig = types.void(x, a, hv, hc, d, n, coded)

    def codegen(context, builder, signature, args):
        b = builder
        xp, a_v, hvp, hcp, d_v, n_v, coded_v = _band_args(context, builder, signature, args)
        lv = _Lanes(context, builder, signature.args[0].dtype)
        cty = ir.VectorType(ir.FloatType(), lv.n)
        cstore = b.module.declare_intrinsic(
            f"llvm.masked.store.v{lv.n}f32.p0", (),
            ir.FunctionType(ir.VoidType(), [cty, cty.as_pointer(), lv.i32, lv.mty]))
        code_of = [ir.Constant(cty, [float(j)] * lv.n) for j in range(3)]
        every = ir.Constant(lv.mty, [1] * lv.n)

        def block(q, left, coded, masked):
            base = b.add(a_v, b.mul(q, lv.const(2)))
            reach = b.add(b.mul(left, lv.const(2)), lv.const(1))  # elements left to read
            vec = [lv.load(xp, b.add(base, lv.const(s)),
                           lv.below(b.sub(reach, lv.const(s))) if masked else every)
                   for s in (0, lv.n, 2, lv.n + 2)]
            taps = (lv.evens(vec[0], vec[1]), lv.odds(vec[0], vec[1]),
                    lv.evens(vec[2], vec[3]))
            best, code = taps[0], code_of[0]
            for j in (1, 2):
                v = taps[j]
                take = b.or_(b.fcmp_ordered(">", v, best), b.fcmp_unordered("uno", v, v))
                best = b.select(take, v, best)
                code = b.select(take, code_of[j], code)
            live = lv.below(left) if masked else every
            at = b.add(d_v, q)
            lv.store(best, hvp, at, live)
            if coded:
                ptr = b.bitcast(b.gep(hcp, [at]), cty.as_pointer())
                b.call(cstore, [code, ptr, ir.Constant(lv.i32, 4), live])

        # A loop per case, and within it plain loads and stores but for the last block
        # (masks computed per block cost about as much as the work).
        with b.if_else(coded_v) as (then, otherwise):
            for coded, arm in ((True, then), (False, otherwise)):
                with arm:
                    with lv.blocks(n_v) as q:
                        left = b.sub(n_v, q)  # windows from this block on
                        # Unmasked, a block reads 2L + 2 elements from its first window's:
                        # the windows' own while more than L windows are left.
                        tail = b.icmp_signed("<=", left, lv.const(lv.n))
                        with b.if_else(tail) as (last, inner):
                            with last:
                                block(q, left, coded, True)
                            with inner:
                                block(q, left, coded, False)
        return context.get_dummy_value()

    return sig, codegen
