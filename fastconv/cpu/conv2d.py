"""conv2d on the CPU: Numba kernels, forward and backward.

Algorithm: 3x3 stride-1 layers of one group (and at least 8 channels in and out) run as
Winograd F(2x2, 3x3) (see "Winograd" below). When each group has one input channel
(depthwise, or any conv of a single-channel input), direct kernels on flat or zero-padded
planes (see "depthwise" below). 1x1 layers that read the input as it is, with large weights
(``_DIRECT_GEMM_BYTES``), run as BLAS GEMMs on the input. Every other forward runs
register-blocked tiles straight from the input (see "tiles" below: ``_microkernel.tile_fma``,
t output columns x up to 2 vectors of output channels summed over all taps in registers; no
im2col, no GEMM call); 1x1 layers on small planes run their tiles over the whole batch's
pixels (``_pointwise_band``).

The gradients of those other layers, where a group's channels fill enough of a vector's lanes
(``*_MIN_FILL``): grad_input as tiles too, one stride-1 conv of grad_out per stride phase of
the input (see ``_input_grad_tiles``; one-group layers with fewer input channels: pixel tiles,
a vector of output pixels at a time, see ``_pixel_phases``); grad_weight (kernels larger than
1x1, dW = 1) as tiles whose taps are the batch's output pixels (see "Weight gradients as
tiles"). The rest (few channels, 1x1 layers, dilated columns): per work item (image n, group
g), chunks of whole output rows (~256 columns) are im2col-ed, in the "wide" layout of the
input's stride-phase planes (see ``_phase_planes``: one contiguous copy per tap, any stride),
into a (K, chunk) matrix, K = C_in/groups * kH * kW, small enough to stay in L2, and multiplied
with BLAS. A 1x1 kernel with stride 1 and no padding skips im2col: the input already is that
matrix; on small planes (at most half a chunk) several images are packed side by side into one
GEMM (the weight gradient: all of them, one deep GEMM per block of output channels).

That is the rule. Where a pass has more than one algorithm that computes it (Winograd layers:
the rule's other choice too; 1x1 layers read as they are: tiles and the GEMM; the input
gradient of strided one-group layers: the phase tiles and a GEMM per tap on shifted views,
see ``_input_grad_phase_gemm``; of one-group layers with few input channels: pixel tiles
and im2col + BLAS), the first call on a configuration with enough work times
them and keeps the fastest (see ``_autotune``).

Parallelism and determinism:
* forward and grad_input: work items (n, g), or (n, g, band of output rows), write disjoint
  output slices, so ``prange`` over them has no races;
* grad_weight sums over the batch: the batch (tiles: its output pixels) is cut into P fixed
  contiguous chunks (P depends only on the thread count; tiles: only on the shapes), each
  chunk reduces into its own buffer, and the buffers are summed in chunk order, so the
  result is bitwise the same run to run (1x1 layers on small planes: each thread owns rows of
  grad_weight, and chunks of images are added in order);
* grad_bias: one channel per iteration, accumulated in float64.

Array views passed in: x5 (N, G, C_in/G, H, W), w3 (G, C_out/G, K), y4 (N, G, C_out/G, Ho*Wo).
Indexing only with integers keeps Numba's C-contiguous layout, which ``gemm`` (``_blas``)
requires.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from numba import njit, prange

from .._args import Conv2dParams
from . import _autotune, _blas, _microkernel, _runtime
from ._runtime import (engine_threads, float32_for_half, l2_bytes, parallel_kernel,
                       parallel_region)
from ._microkernel import (WINOGRAD4_G, copy_run, tile_fma, tile_fma_pixels, tile_fma_rows,
                           transpose_block,
                           winograd4_grad_band, winograd4_input_band, winograd4_output_band,
                           winograd_grad_band, winograd_input_band, winograd_output_band)
from ._window import (U2, U64, add_at, col_range, copy_at, fill, fill_at, front,
                      phase_merge, phase_split)


# Output rows per chunk: about this many columns keeps the (K, chunk) im2col tile in L2 and
# is where BLAS runs fastest on these GEMM shapes (measured: 84 vs 71 GFLOP/s at M=64, K=576).
_CHUNK_COLUMNS = 256


@njit(cache=True, nogil=True)
def _rows_per_chunk(ho, wo):
    """Output rows per chunk for rows of ``wo`` columns (at least 1, at most Ho)."""
    return min(ho, max(1, _CHUNK_COLUMNS // wo))


# "Wide" im2col. The zero-padded input of each channel is split into sH*sW phase planes,
# plane (a, b) holding padded rows a, a + sH, ... and columns b, b + sW, ... (with stride 1,
# the one plane is the padded input). Tap (i, j) of an output (oh, ow) then reads phase plane
# ((i*dH) % sH, (j*dW) % sW) at (oh + (i*dH)//sH, ow + (j*dW)//sW). With the output rows laid
# out Wq apart (Wq, the planes' width, is Wo plus the taps' reach: the columns between rows
# are garbage), the im2col row of a tap is one contiguous slice of one plane: one long copy
# per tap instead of one short (strided) copy per tap and output row (LeNet's 5x5 layer on
# 14x14: 1500 copies of 10 per image; the stride-2 3x3 layer: 28 strided gathers of 28).
@njit(cache=True, nogil=True)
def _phase_extent(ho, wo, kh, kw, sh, sw, dh, dw):
    """(Hq, Wq): the extent of the phase planes that an (Ho, Wo) output reads."""
    return ho + ((kh - 1) * dh) // sh, wo + ((kw - 1) * dw) // sw


@njit(cache=True, nogil=True)
def _tap_at(c, i, j, sh, sw, dh, dw, wq):
    """(phase plane, flat shift) that tap (i, j) of channel c reads for output 0."""
    plane = (c * sh + (i * dh) % sh) * sw + (j * dw) % sw
    return plane, ((i * dh) // sh) * wq + (j * dw) // sw


@njit(cache=True, nogil=True)
def _im2col_wide(xq3, col, kh, kw, sh, sw, dh, dw, base, span):
    """col[(c*kh + i)*kw + j, :span] = the phase plane of tap (i, j) of channel c, flattened,
    from base plus the tap's shift."""
    cin, wq = xq3.shape[0] // (sh * sw), xq3.shape[2]
    plane_size, ld = xq3.shape[1] * wq, col.shape[1]
    src, dst = xq3.reshape(-1), col.reshape(-1)  # offsets, not a view per tap: see copy_at
    for c in range(cin):
        for i in range(kh):
            for j in range(kw):
                plane, shift = _tap_at(c, i, j, sh, sw, dh, dw, wq)
                copy_at(dst, ((c * kh + i) * kw + j) * ld, src, plane * plane_size + base + shift,
                        span)


@njit(cache=True, nogil=True)
def _phase_planes(x3, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo):
    """(C*sH*sW, Hq, Wq): plane (c*sH + a)*sW + b holds padded rows a + r*sH, columns
    b + s*sW of channel c (input x3[c, a + r*sH - pt, b + s*sW - pl], 0 outside)."""
    cin, h, w = x3.shape
    hq, wq = _phase_extent(ho, wo, kh, kw, sh, sw, dh, dw)
    xq = np.empty((cin * sh * sw, hq, wq), dtype=x3.dtype)
    if sh == 1 and sw == 1:
        for c in range(cin):
            _pad_plane(x3[c], xq[c], pt, pl)
        return xq
    # Flat offsets, not a view per row: these rows are short (29 columns for a 3x3/s2 layer
    # on 56x56), and views and slices cost more per row than the copy.
    src, dst = x3.reshape(-1), xq.reshape(-1)
    for c in range(cin):
        for a in range(sh):
            for r in range(hq):
                ih = r * sh + a - pt
                for b in range(sw):
                    d = (((c * sh + a) * sw + b) * hq + r) * wq
                    if ih < 0 or ih >= h:
                        fill_at(dst, d, wq, 0)
                        continue
                    lo, hi = col_range(pl - b, sw, w, wq)
                    fill_at(dst, d, lo, 0)
                    s0 = U64((c * h + ih) * w + lo * sw - (pl - b))
                    d0 = U64(d + lo)
                    if sw == 2:  # the stride a literal: interleaved vector loads
                        for q in range(U64(hi - lo)):
                            dst[d0 + q] = src[s0 + U2 * q]
                    else:
                        for q in range(U64(hi - lo)):
                            dst[d0 + q] = src[s0 + U64(sw) * q]
                    fill_at(dst, d + hi, wq - hi, 0)
    return xq


@njit(cache=True, nogil=True)
def _merge_phases(gxq, gx3, sh, sw, pt, pl):
    """The adjoint of ``_phase_planes``: gx3[c, ih, iw] = its element of the phase planes;
    input rows and columns beyond them (no output reads them) get 0."""
    cin, h, w = gx3.shape
    hq, wq = gxq.shape[1], gxq.shape[2]
    if sh == 1 and sw == 1:
        for c in range(cin):
            _crop_plane(gxq[c], gx3[c], pt, pl)
        return
    for c in range(cin):
        for ih in range(h):
            row = gx3[c, ih]
            rq, a = (ih + pt) // sh, (ih + pt) % sh
            if rq >= hq:
                fill(row, 0)
                continue
            for iw in range(w):
                sq, b = (iw + pl) // sw, (iw + pl) % sw
                row[iw] = gxq[(c * sh + a) * sw + b, rq, sq] if sq < wq else 0


@njit(cache=True, nogil=True)
def _padded_extent(ho, wo, kh, kw, sh, sw, dh, dw):
    """(Hp, Wp): the extent of the zero-padded input that an (Ho, Wo) output reads."""
    return (ho - 1) * sh + (kh - 1) * dh + 1, (wo - 1) * sw + (kw - 1) * dw + 1


@njit(cache=True, nogil=True)
def _rows_to_wide(src, dst, oh0, oh1, wo, wp):
    """dst[(oh - oh0)*Wp + ow] = src[oh*Wo + ow] for rows [oh0, oh1) of one channel, and 0 in
    the columns between rows (so garbage im2col columns meet zeros in a product)."""
    for oh in range(oh0, oh1):
        r = (oh - oh0) * wp
        # copy_at, not ``dst[r + ow]``: Numba's negative-index checks on that stop LLVM from
        # vectorising (measured: 2.4 ns per element, the stem's backward 15 ms).
        copy_at(dst, r, src, oh * wo, wo)
        if oh + 1 < oh1:
            fill_at(dst, r + wo, wp - wo, 0)


@njit(cache=True, nogil=True)
def _rows_from_wide(src, dst, oh0, oh1, wo, wp, bias=0.0, has_bias=False):
    """dst[oh*Wo + ow] = src[(oh - oh0)*Wp + ow] (+ bias) for rows [oh0, oh1) of one channel.
    The bias is added here, in the copy, rather than in a pass of its own."""
    for oh in range(oh0, oh1):
        if has_bias:
            _copy_plus_at(dst, oh * wo, src, (oh - oh0) * wp, wo, bias)
        else:
            copy_at(dst, oh * wo, src, (oh - oh0) * wp, wo)


@njit(cache=True, nogil=True, inline="always")
def _copy_plus_at(dst, d0, src, s0, n, bias):
    """dst[d0 + q] = src[s0 + q] + bias for q < n: copy_at with the bias added."""
    if d0 < 0 or s0 < 0:
        return
    for q in range(n):
        dst[d0 + q] = src[s0 + q] + bias


@njit(cache=True, nogil=True)
def _backward_input_wide(gy2, w2, gx3, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo):
    """gx3 (C_in/G, H, W) = the adjoint of ``_forward_wide``: dcol = w2^T @ wide grad rows,
    each tap's row added back into its phase plane at its shift, then the planes merged."""
    cin, k, cout = gx3.shape[0], w2.shape[1], w2.shape[0]
    hq, wq = _phase_extent(ho, wo, kh, kw, sh, sw, dh, dw)
    gxq = np.zeros((cin * sh * sw, hq, wq), dtype=gx3.dtype)
    gxq_flat = gxq.reshape(-1)
    rows = _rows_per_chunk(ho, wq)  # a wide row is Wq columns
    gy_buf = np.empty(cout * rows * wq, dtype=gx3.dtype)
    dcol_buf = np.empty(k * rows * wq, dtype=gx3.dtype)
    for oh0 in range(0, ho, rows):
        oh1 = min(ho, oh0 + rows)
        span = (oh1 - oh0 - 1) * wq + wo
        gy, dcol = front(gy_buf, cout, span), front(dcol_buf, k, span)
        for co in range(cout):
            _rows_to_wide(gy2[co], gy[co], oh0, oh1, wo, wq)
        _blas.gemm(w2.T, gy, dcol)
        for c in range(cin):
            for i in range(kh):
                for j in range(kw):
                    plane, shift = _tap_at(c, i, j, sh, sw, dh, dw, wq)
                    add_at(gxq_flat, plane * hq * wq + oh0 * wq + shift, dcol_buf,
                           ((c * kh + i) * kw + j) * span, span)
    _merge_phases(gxq, gx3, sh, sw, pt, pl)


@njit(cache=True, nogil=True)
def _backward_weight_wide(gy2, x3, acc_t, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo):
    """acc_t (K, C_out/G) += the wide im2col of x3 @ wide grad rows^T (the im2col's garbage
    columns meet the grad rows' zeros)."""
    k, cout = acc_t.shape[0], acc_t.shape[1]
    xp = _phase_planes(x3, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo)
    wq = xp.shape[2]
    rows = _rows_per_chunk(ho, wq)  # a wide row is Wq columns
    col_buf = np.empty(k * rows * wq, dtype=x3.dtype)
    gy_buf = np.empty(cout * rows * wq, dtype=x3.dtype)
    for oh0 in range(0, ho, rows):
        oh1 = min(ho, oh0 + rows)
        span = (oh1 - oh0 - 1) * wq + wo
        col, gy = front(col_buf, k, span), front(gy_buf, cout, span)
        _im2col_wide(xp, col, kh, kw, sh, sw, dh, dw, oh0 * wq, span)
        for co in range(cout):
            _rows_to_wide(gy2[co], gy[co], oh0, oh1, wo, wq)
        _blas.gemm(col, gy.T, acc_t, accumulate=True)


@njit(cache=True, nogil=True)
def _forward_wide(x3, w2, b1, has_bias, out, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo):
    """out (C_out/G, Ho*Wo) = b1 + w2 (C_out/G, K) @ the wide im2col of x3 (C_in/G, H, W),
    in chunks of output rows."""
    k, cout = w2.shape[1], w2.shape[0]
    xp = _phase_planes(x3, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo)
    wq = xp.shape[2]
    rows = _rows_per_chunk(ho, wq)  # a wide row is Wq columns
    col_buf = np.empty(k * rows * wq, dtype=x3.dtype)
    y_buf = np.empty(cout * rows * wq, dtype=x3.dtype)
    for oh0 in range(0, ho, rows):
        oh1 = min(ho, oh0 + rows)
        span = (oh1 - oh0 - 1) * wq + wo
        col, y = front(col_buf, k, span), front(y_buf, cout, span)
        _im2col_wide(xp, col, kh, kw, sh, sw, dh, dw, oh0 * wq, span)
        _blas.gemm(w2, col, y)
        for co in range(cout):
            _rows_from_wide(y[co], out[co], oh0, oh1, wo, wq, b1[co], has_bias)


@parallel_kernel
def _forward(x5, w3, b2, y4, has_bias, direct, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo):
    n_img, groups, cin_g, h, w = x5.shape
    cout_g = w3.shape[1]
    for item in prange(n_img * groups):
        n = item // groups
        g = item % groups
        out = y4[n, g]
        if direct:
            _blas.gemm(w3[g], x5[n, g].reshape(cin_g, h * w), out)
            if has_bias:
                for oc in range(cout_g):
                    row, b = out[oc], b2[g, oc]
                    for q in range(ho * wo):
                        row[q] += b
        else:
            _forward_wide(x5[n, g], w3[g], b2[g], has_bias, out, kh, kw, sh, sw, pt, pl, dh,
                          dw, ho, wo)


@parallel_kernel
def _backward_input(gy4, w3, gx5, direct, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo):
    n_img, groups, cin_g, h, w = gx5.shape
    for item in prange(n_img * groups):
        n = item // groups
        g = item % groups
        if direct:
            _blas.gemm(w3[g].T, gy4[n, g], gx5[n, g].reshape(cin_g, h * w))
        else:
            _backward_input_wide(gy4[n, g], w3[g], gx5[n, g], kh, kw, sh, sw, pt, pl, dh, dw,
                                 ho, wo)


@parallel_kernel
def _backward_weight(gy4, x5, part, direct, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo):
    """part (P, G, C_out/G, K): chunk p's sum over its images of gy @ col.T."""
    n_img, groups, cin_g, h, w = x5.shape
    chunks = part.shape[0]
    cout_g, k = part.shape[2], part.shape[3]
    for item in prange(chunks * groups):
        p = item // groups
        g = item % groups
        acc = part[p, g]
        # Each path sums (K, C_out/G) products, col @ gy^T, and transposes at the end: BLAS
        # runs that orientation 1.1-1.7x faster than gy @ col^T on these layers (measured
        # single-threaded: LeNet's 16 x 150 86 vs 51 GFLOP/s, 3x3 stride 2 165 vs 145, the
        # 1x1 256->64 on 56x56 158 vs 138).
        # The GEMMs add into acc_t themselves (beta = 1), not through a product matrix.
        acc_t = np.zeros((k, cout_g), dtype=x5.dtype)
        if direct:
            for n in range(p * n_img // chunks, (p + 1) * n_img // chunks):
                _blas.gemm(x5[n, g].reshape(cin_g, h * w), gy4[n, g].T, acc_t, accumulate=True)
        else:
            for n in range(p * n_img // chunks, (p + 1) * n_img // chunks):
                _backward_weight_wide(gy4[n, g], x5[n, g], acc_t, kh, kw, sh, sw, pt, pl, dh,
                                      dw, ho, wo)
        for oc in range(cout_g):
            row = acc[oc]
            for kk in range(k):
                row[kk] = acc_t[kk, oc]


# 1x1 layers on small planes (ResNet's 7x7 stage): one GEMM per image has too few columns (49)
# for BLAS to run well, and the weight gradient's per-image products each need a temporary
# and an addition. Images are packed side by side instead, up to _PACKED_COLUMNS columns, and
# the threads share the GEMM by rows (output channels): each reads only its rows of the
# weights. Cut by images instead (blocks of up to 256 columns), each thread read all 4 MiB of
# 512->2048's weights: Xeon, 2 threads, MKL, forward 3.0-3.2 -> 2.7-2.8 ms at batch 8 (input
# gradient 3.2 -> 3.0), 15.8-16.3 -> 10.8-11.2 ms at batch 32; 2048->512 3.0-3.2 -> 2.8-3.0.
# Planes from 12x12 keep one GEMM per image: packed, 512->128 on 28x28 took 3.7 ms, not 2.5.
_PACKED_COLUMNS = 2048
@njit(cache=True, nogil=True)
def _pack_images(a4, n0, cnt, g, packed, r0, c0):
    """packed[r, c0 + i*HW:c0 + (i+1)*HW] = a4[n0 + i, g, r0 + r] for r < packed's rows (rows
    r0.. of a (K, HW) matrix per image, side by side from column c0)."""
    hw = a4.shape[3]
    dst, ld = packed.reshape(-1), packed.shape[1]
    for i in range(cnt):
        src = a4[n0 + i, g].reshape(-1)
        for r in range(packed.shape[0]):
            copy_at(dst, r * ld + c0 + i * hw, src, (r0 + r) * hw, hw)


@njit(cache=True, parallel=True)
def _packed_groups(a4, n0, cnt):
    """(G, K, cnt*HW): images [n0, n0 + cnt) of a4 (N, G, K, HW) side by side, per group."""
    groups, k, hw = a4.shape[1], a4.shape[2], a4.shape[3]
    packed = np.empty((groups, k, cnt * hw), dtype=a4.dtype)
    for item in prange(groups * cnt):
        g, i = item // cnt, item % cnt
        _pack_images(a4, n0 + i, 1, g, packed[g], 0, i * hw)
    return packed


@parallel_kernel
def _pointwise_packed(a4, mat3, b2, out4, has_bias, transpose, n0, cnt, mblocks):
    """out4[n, g] = mat3[g] @ a4[n, g] (``mat3[g].T`` with ``transpose``), plus the bias, for
    images [n0, n0 + cnt): packed side by side into one (Ka, cnt*HW) matrix per group, then one
    GEMM per group and block of rows (``mblocks`` a group). a4 (N, G, Ka, HW), out4 (N, G, M,
    HW)."""
    groups, hw = a4.shape[1], a4.shape[3]
    m = out4.shape[2]
    packed = _packed_groups(a4, n0, cnt)
    for item in prange(groups * mblocks):
        g, blk = item // mblocks, item % mblocks
        r0, r1 = blk * m // mblocks, (blk + 1) * m // mblocks
        if r0 == r1:
            continue
        result = np.empty((r1 - r0, cnt * hw), dtype=a4.dtype)
        if transpose:
            _blas.gemm(mat3[g].T[r0:r1], packed[g], result)
        else:
            _blas.gemm(mat3[g][r0:r1], packed[g], result)
        res = result.reshape(-1)
        for i in range(cnt):
            out = out4[n0 + i, g].reshape(-1)
            for oc in range(r0, r1):  # a plain copy of one row, plus the bias
                if has_bias:
                    _copy_plus_at(out, oc * hw, res, ((oc - r0) * cnt + i) * hw, hw,
                                  b2[g, oc])
                else:
                    copy_at(out, oc * hw, res, ((oc - r0) * cnt + i) * hw, hw)


# The weight gradient of a 1x1 layer on small planes sums gy @ x.T over the batch. Cut by
# output channels, each thread's GEMM runs over all the batch's pixels into its own rows of
# grad_weight: no partial sums to add, and a GEMM as deep as the batch (cut by images, each
# GEMM was 196 deep and two 4 MiB partial sums were added: 512 -> 2048 on 7x7, batch 8,
# 6.7 -> 4.2 ms; 2048 -> 512 6.3 -> 4.7 ms). Up to this many pixels a GEMM; deeper batches
# add each chunk's product in image order.
_WEIGHT_GEMM_DEPTH = 2048


@parallel_kernel
def _pointwise_weight_rows(gy4, x4, gw3, n0, cnt, blocks, first):
    """gw3[g] (+)= gy @ x.T over images [n0, n0 + cnt) as one GEMM of depth cnt*HW per
    block of output channels (``blocks`` a group): gy4 (N, G, C_out/G, HW), x4 (N, G,
    C_in/G, HW); ``first``: gw3 is written, else added to."""
    groups, m, hw = gy4.shape[1], gy4.shape[2], gy4.shape[3]
    xp = _packed_groups(x4, n0, cnt)
    for item in prange(groups * blocks):
        g, blk = item // blocks, item % blocks
        r0, r1 = blk * m // blocks, (blk + 1) * m // blocks
        if r0 == r1:
            continue
        gp = np.empty((r1 - r0, cnt * hw), dtype=gy4.dtype)
        _pack_images(gy4, n0, cnt, g, gp, r0, 0)
        if first:
            _blas.gemm(gp, xp[g].T, gw3[g, r0:r1])
        else:
            _blas.gemm(gp, xp[g].T, gw3[g, r0:r1], True)


def _pointwise_per(params: Conv2dParams, kernel_hw, in_hw, out_hw, n: int) -> int:
    """Images per packed GEMM for a direct (1x1) layer: 1 unless its planes are small, then
    as many as fill up to _PACKED_COLUMNS columns."""
    hw = out_hw[0] * out_hw[1]
    if not _is_direct(params, kernel_hw, in_hw, out_hw) or 2 * hw > _CHUNK_COLUMNS:
        return 1
    return max(1, min(n, _PACKED_COLUMNS // hw))


def _pointwise_gemms(a4, mat3, b2, out4, has_bias: bool, transpose: bool, per: int) -> None:
    """``_pointwise_packed`` over the batch, ``per`` images at a time, each chunk's rows cut
    so that every thread has a GEMM."""
    n, g = a4.shape[0], a4.shape[1]
    mblocks = max(1, -(-engine_threads() // g))
    for n0 in range(0, n, per):
        with parallel_region(g * max(mblocks, min(per, n - n0))):
            _pointwise_packed(a4, mat3, b2, out4, has_bias, transpose, n0, min(per, n - n0),
                              mblocks)


@parallel_kernel
def _sum_chunks(part, out):
    """out[g] = part[0, g] + part[1, g] + ... in chunk order (deterministic)."""
    chunks, groups = part.shape[0], part.shape[1]
    for g in prange(groups):
        o = out[g]
        o[:] = part[0, g]
        for p in range(1, chunks):
            o += part[p, g]


# Reassociation only, so LLVM splits each plane's float64 sum into vector lanes: one chain of
# dependent float64 adds ran one add per ~4 cycles. The lane order is fixed at compile time and
# a channel is one work item, so the bits do not depend on the thread count.
@parallel_kernel(fastmath={"reassoc"})
def _backward_bias(gy3, gb):
    n_img, c_out, hw = gy3.shape
    for c in prange(c_out):
        acc = 0.0  # float64 accumulator: the sum runs over N*Ho*Wo terms
        for n in range(n_img):
            row = gy3[n, c]
            t = 0.0
            for i in range(hw):
                t += row[i]
            acc += t
        gb[c] = acc


# ---- tiles: register-blocked (``_microkernel.tile_fma``) -------------------------------
# The forward of every layer that is neither depthwise nor Winograd: each tile is t output
# columns of one output row times v*L output channels (L = the vector lanes), summed over the
# group's C_in/G * kH * kW taps straight from the input (or from a copy of a few of its rows,
# zero-padded and split into column phases), with the tile's accumulators in registers. No
# im2col matrix and no GEMM call per chunk: on LeNet's 5x5 layer (16 x 150 x 100 per image)
# BLAS ran at 96 GFLOP/s and the im2col copies cost a third more; the tile kernel runs the
# layer at 172 GFLOP/s. Stride and dilation are only the tap offsets and the columns'
# spacing.
@njit(cache=True, nogil=True)
def _aligned_empty(n, dtype):
    """A 1-D array of ``n`` elements starting on a 64-byte boundary. Numba aligns arrays to
    32 bytes; a tile's weight vectors are 64-byte zmm loads, each split across two cache
    lines when the packed weights start mid-line."""
    buf = np.empty(n + 16, dtype=dtype)  # 16 elements: 64 bytes of either float
    skip = (-buf.ctypes.data) % 64 // buf.itemsize
    return buf[skip:skip + n]


@njit(cache=True, nogil=True)
def _tap_offsets(cin, kh, kw, sw, dh, dw, plane, row, wq):
    """offs[(c*kH + i)*kW + j]: where tap (c, i, j) of a window sits relative to the window's
    first element, in a buffer of ``plane``-element channels and ``row``-element rows, each
    row sW column phases of ``wq`` elements (phase r holding columns r, r + sW, ...)."""
    offs = np.empty(cin * kh * kw, dtype=np.int64)
    for c in range(cin):
        for i in range(kh):
            for j in range(kw):
                offs[(c * kh + i) * kw + j] = c * plane + i * dh * row + \
                    ((j * dw) % sw) * wq + (j * dw) // sw
    return offs


@njit(cache=True, nogil=True)
def _phase_rows(xflat, x0, cin, h, w, flat, plane, rows, ih0, pl, sw, wq):
    """Rows ih0 .. ih0 + rows - 1 of the (C, H, W) planes at xflat[x0:], zero-padded by pl
    columns on the left (and as needed on the right) and each split into sW column phases of
    Wq, into 1-D ``flat``: flat[c*plane + r*sW*Wq + p*Wq + m] = x[c, ih0 + r, m*sW + p - pl],
    zero outside x. The runs go by ``copy_run`` (whole vectors; these rows are short)."""
    # Each phase's columns inside x, [lo, hi): divisions hoisted out of the row loop.
    span = np.empty((sw, 2), dtype=np.int64)
    for p in range(sw):
        span[p, 0], span[p, 1] = col_range(pl - p, sw, w, wq)
    for c in range(cin):
        for r in range(rows):
            ih = ih0 + r
            for p in range(sw):
                d0 = c * plane + (r * sw + p) * wq
                if ih < 0 or ih >= h:
                    fill_at(flat, d0, wq, 0)
                    continue
                lo, hi = span[p, 0], span[p, 1]
                fill_at(flat, d0, lo, 0)
                copy_run(flat, d0 + lo, xflat, x0 + (c * h + ih) * w + lo * sw + p - pl,
                         hi - lo, sw)
                fill_at(flat, d0 + hi, wq - hi, 0)


@njit(cache=True, nogil=True)
def _pack_block(w5, transposed, g, cb, wpk, bpk, b1, lanes):
    """Block cb of group g's weights, tap-major: wpk[k, c] for output channel cb*LV + c, tap
    k = (a*kH + i)*kW + j over the group's input channels a; zero past the group's output
    channels. w5 (G, C_out/G, C_in/G, kH, kW) is the layer's weight; ``transposed`` packs the
    weight of the conv that is its input gradient instead (channels swapped, taps flipped).
    bpk[c] = b1[g*n + cb*LV + c] likewise (n = output channels per group). ``lanes``: L, the
    vector width (LV = v*L)."""
    groups, n_a, n_b, kh, kw = w5.shape
    taps = kh * kw
    n_out, n_in = (n_b, n_a) if transposed else (n_a, n_b)
    lv = wpk.shape[1]
    dst, src = wpk.reshape(-1), w5.reshape(-1)
    # Flat offsets and the two cases' loops apart: 5-D indexing with the case tested per
    # element packed ResNet's 512->2048 weights in 4.9 ms, against 0.36 ms for a run-copy.
    n_co = max(0, min(lv, n_out - cb * lv))
    for c in range(lv):
        bpk[c] = b1[g * n_out + cb * lv + c] if c < n_co else 0
    if transposed:
        # w5[g, a, co, kH-1-i, kW-1-j]: for each a, the block's channels are one run of
        # n_co*taps elements; read it in order, write each tap's lv channels in a row.
        for a in range(n_in):
            s0 = ((g * n_a + a) * n_b + cb * lv) * taps
            if taps == 1:  # a 1x1 layer's run is the tap's row: 2048->512's 4 MiB, 0.6 -> 0.1 ms
                copy_at(dst, a * lv, src, s0, n_co)
                fill_at(dst, a * lv + n_co, lv - n_co, 0)
                continue
            for r in range(taps):
                d0 = (a * taps + r) * lv
                for c in range(n_co):
                    dst[d0 + c] = src[s0 + c * taps + taps - 1 - r]
                for c in range(n_co, lv):
                    dst[d0 + c] = 0
        return
    # w5[g, co]: one run of K = n_in*taps per channel, so a block of L channels is an
    # (L, K) matrix to transpose, L x L at a time in registers (512->2048's 4 MiB: 0.36 ms
    # by element, writes lv apart, 2 threads; 0.07 ms by blocks); the K % L last taps and a
    # last block's partial channels by element.
    k_all = n_in * taps
    k_full = k_all - k_all % lanes
    for c0 in range(0, lv, lanes):
        s0 = (g * n_a + cb * lv + c0) * k_all
        if c0 + lanes <= n_co:
            for k0 in range(0, k_full, lanes):
                transpose_block(dst, k0 * lv + c0, lv, src, s0 + k0, k_all)
            k_rest = k_full
        else:
            k_rest = 0
        for c in range(c0, c0 + lanes):
            if c >= n_co:
                for kk in range(k_all):
                    dst[kk * lv + c] = 0
                continue
            s1 = (g * n_a + cb * lv + c) * k_all
            for kk in range(k_rest, k_all):
                dst[kk * lv + c] = src[s1 + kk]


@njit(cache=True, nogil=True)
def _run_end(r0, p1, run, tile):
    """End of the run of up to ``run`` pixels from r0 in [r0, p1): a rest shorter than a
    ``tile`` joins it, so every run holds a whole tile."""
    r1 = min(p1, r0 + run)
    return p1 if p1 - r1 < tile else r1


# 1x1 layers on small planes (ResNet's 7x7 stage, 49 pixels an image): per image, tiles of
# t = 14 columns cover 49 as 4 overlapping tiles (56 columns computed, 12.5% waste), and each
# image's run streams every block of packed weights from L3 again. The batch's pixels are
# one run of N*H*W columns instead, cut into a band per thread: each band copies its runs of
# pixels from every image side by side, each block of weights serves all of a run's tiles,
# and a block's output rows go through a small buffer back to their images. 512->2048 on
# 7x7, batch 8, 2 threads (AVX-512): 4.5 -> 4.0 ms (PyTorch 4.0-4.1).
@njit(cache=True, nogil=True)
def _pointwise_band(xflat, yflat, wpk, bpk, n_img, c_in, c_out, hw, groups, g, band, bands,
                    copy_bytes, t, v, lv):
    """Band ``band`` of ``bands`` of group g's N*HW output pixels (x flat (N, C_in, HW), y
    flat (N, C_out, HW)), by tiles of up to t columns over whole runs of the band's pixels:
    see above. wpk (G, NB, C_in/G, lv) and bpk (G, NB, lv): the packed weights and bias."""
    cin_g, cout_g = c_in // groups, c_out // groups
    nb = wpk.shape[1]
    total = n_img * hw
    tf = min(t, total)
    # Band edges on tile boundaries, so no tile but a band's last overlaps another.
    tiles = total // tf
    p0 = band * tiles // bands * tf
    p1 = total if band == bands - 1 else (band + 1) * tiles // bands * tf
    if p0 >= p1:
        return
    tb = min(tf, p1 - p0)
    run = max(1, copy_bytes // (cin_g * xflat.itemsize * tb)) * tb
    plane = run + tb  # a run may take up to tb - 1 more pixels (see below)
    src = np.empty(cin_g * plane, dtype=xflat.dtype)
    buf = np.empty(lv * plane, dtype=xflat.dtype)
    offs = np.arange(cin_g) * plane
    wflat, bflat = wpk[g].reshape(-1), bpk[g].reshape(-1)
    r0 = p0
    while r0 < p1:
        r1 = _run_end(r0, p1, run, tb)
        for c in range(cin_g):
            q = r0
            while q < r1:  # the pixels of one image at a time
                img, px = q // hw, q % hw
                m = min(r1 - q, hw - px)
                copy_at(src, c * plane + q - r0, xflat, (img * c_in + g * cin_g + c) * hw + px,
                        m)
                q += m
        for cb in range(nb):
            co0 = cb * lv
            n_co = min(lv, cout_g - co0)
            for q0 in range(r0, r1, tb):
                q = min(q0, r1 - tb)  # the last tile overlaps the one before
                tile_fma(src, q - r0, offs, cin_g, wflat, cb * cin_g * lv, bflat, co0, buf,
                         q - r0, plane, n_co, tb, v)
            for c in range(n_co):
                q = r0
                while q < r1:
                    img, px = q // hw, q % hw
                    m = min(r1 - q, hw - px)
                    copy_at(yflat, (img * c_out + g * cout_g + co0 + c) * hw + px, buf,
                            c * plane + q - r0, m)
                    q += m
        r0 = r1


@parallel_kernel
def _tile_forward(x4, w5, b1, transposed, y4, groups, bands, pointwise, copy_bytes, t, v, lv,
                  kh, kw, sh, sw, pt, pl, dh, dw):
    """y4 (N, C_out, Ho, Wo) = conv of x4 (N, C_in, H, W) with the weight w5 packs to (see
    _pack_block) plus b1 (C_out,). Work items are (image, group, band of output rows), or
    with ``pointwise`` (a 1x1 layer reading the input as it is) (group, band of the batch's
    pixels); up to t output columns per tile (t <= ``max_tile()``), output channels in blocks
    of lv = v*L; input copies of about ``copy_bytes``."""
    n_img, c_in, h, w = x4.shape
    c_out, ho, wo = y4.shape[1], y4.shape[2], y4.shape[3]
    cin_g, cout_g = c_in // groups, c_out // groups
    nb, k_taps = -(-cout_g // lv), cin_g * kh * kw
    # Packed weights and bias, (G, NB, K, lv) and (G, NB, lv), made here: one parallel
    # launch and no Python between the two loops (LeNet's 5x5 layer: 20 us less per call).
    wpk = _aligned_empty(groups * nb * k_taps * lv, x4.dtype).reshape((groups, nb, k_taps, lv))
    bpk = np.empty((groups, nb, lv), dtype=x4.dtype)
    for item in prange(groups * nb):
        _pack_block(w5, transposed, item // nb, item % nb, wpk[item // nb, item % nb],
                    bpk[item // nb, item % nb], b1, lv // v)
    yflat, xflat = y4.reshape(-1), x4.reshape(-1)
    if pointwise:
        for item in prange(groups * bands):
            _pointwise_band(xflat, yflat, wpk, bpk, n_img, c_in, c_out, h * w, groups,
                            item // bands, item % bands, bands, copy_bytes, t, v, lv)
        return
    wq = _phase_extent(ho, wo, kh, kw, sh, sw, dh, dw)[1]  # columns a row's windows read
    # The input rows of ``chunk`` output rows at a time are copied, zero-padded and split
    # into column phases, into a buffer that stays in L2 for their tiles (about copy_bytes),
    # unless the layer reads the input as it is (stride 1 along rows, no padding).
    copied = sw > 1 or pt != 0 or pl != 0 or (ho - 1) * sh + (kh - 1) * dh >= h or wq > w
    chunk = ho
    if copied:
        row_bytes = cin_g * sw * wq * x4.itemsize
        chunk = max(1, min(ho, (copy_bytes // row_bytes - (kh - 1) * dh) // sh))
    rows_max = _padded_extent(chunk, wo, kh, kw, sh, sw, dh, dw)[0]
    # Flat: output rows as wide as the input's, read unstrided and unpadded (1x1 and kx1
    # kernels, stride 1, no column padding): output pixel p reads input pixel p + tap, so
    # a band's rows are one long row and tiles run t wide across row ends. (Otherwise a 7x7
    # plane takes tiles of one row each: 512->2048, batch 8, Zen 3, 12.4-15.0 -> 8.6-8.7 ms.)
    flat = not copied and sh == 1 and wo == w
    tr = min(t, wo)  # columns per tile along one row
    for item in prange(n_img * groups * bands):
        img = item // (groups * bands)
        g = (item // bands) % groups
        band = item % bands
        oh0, oh1 = band * ho // bands, (band + 1) * ho // bands
        if oh0 == oh1:
            continue
        wflat, bflat = wpk[g].reshape(-1), bpk[g].reshape(-1)
        at = (img * c_in + g * cin_g) * h * w  # the group's planes in xflat
        # Flat: the band is one run of (oh1 - oh0)*Wo pixels (chunk == Ho: not copied).
        tf = min(t, (oh1 - oh0) * wo)  # pixels per flat tile
        halo = (kh - 1) * dh * w  # flat kx1 taps reach kh - 1 rows below
        run = max(1, copy_bytes // (cin_g * x4.itemsize * tf)) * tf  # pixels per flat copy
        if copied:
            plane, row = rows_max * sw * wq, sw * wq
            src = np.empty(cin_g * plane, dtype=x4.dtype)
        elif flat:
            plane, row = run + tf + halo, w  # a run may take up to tf - 1 more pixels
            src = np.empty(cin_g * plane, dtype=x4.dtype)
        else:
            plane, row = h * w, w
            src = x4[img].reshape(-1)
        offs = _tap_offsets(cin_g, kh, kw, sw, dh, dw, plane, row, wq)
        for c0 in range(oh0, oh1, chunk):
            c1 = min(oh1, c0 + chunk)
            if copied:
                _phase_rows(xflat, at, cin_g, h, w, src, plane,
                            _padded_extent(c1 - c0, wo, kh, kw, sh, sw, dh, dw)[0],
                            c0 * sh - pt, pl, sw, wq)
                base = -c0 * sh * row  # output row oh starts at (oh - c0)*sH rows
            else:
                base = g * cin_g * plane
            if flat:
                # Runs of about copy_bytes of every input channel's pixels (with the rows
                # their taps reach below) are copied side by side, and every block of output
                # channels runs its tiles on the copy. Read in place, a tile's taps read
                # C_in planes a whole plane apart, whose lines crowd a few L1 sets and too
                # many streams for the prefetchers, and each block streamed the input from
                # memory again: Xeon (AVX-512), 2 threads, batch 8, 256->64 on 56x56
                # 12.9-17.0 ms in place, 4.4-4.5 copied (PyTorch 5.1-5.4); 64->256 7.0 -> 4.8.
                p0, p1 = c0 * wo, c1 * wo
                r0 = p0
                while r0 < p1:
                    r1 = _run_end(r0, p1, run, tf)
                    for c in range(cin_g):
                        copy_at(src, c * plane, xflat, at + c * h * w + r0, r1 - r0 + halo)
                    for cb in range(nb):
                        co0 = cb * lv
                        y0 = (img * c_out + g * cout_g + co0) * ho * wo
                        for q0 in range(r0, r1, tf):
                            q = min(q0, r1 - tf)  # the last tile overlaps the one before
                            tile_fma(src, q - r0, offs, k_taps, wflat, cb * k_taps * lv,
                                     bflat, co0, yflat, y0 + q, ho * wo, cout_g - co0, tf, v)
                    r0 = r1
                continue
            # Blocks outside rows: a block's packed weights stay in L2 over the chunk's rows.
            for cb in range(nb):
                co0 = cb * lv
                y0 = (img * c_out + g * cout_g + co0) * ho * wo
                for oh in range(c0, c1):
                    x0 = base + oh * sh * row
                    for ow0 in range(0, wo, tr):
                        ow = min(ow0, wo - tr)  # the last tile overlaps the one before
                        tile_fma(src, x0 + ow, offs, k_taps, wflat, cb * k_taps * lv, bflat,
                                 co0, yflat, y0 + oh * wo + ow, ho * wo, cout_g - co0, tr, v)


# Least share of a vector's lanes a tile fills, forward and input gradient (measured on 5x5
# and 3x3 layers, float32): the forward's fallback GEMM has M = output channels and runs badly
# when they are few (6 of 16 lanes: tiles 0.42 ms, BLAS 0.51; 64->6 on 56x56 6.2 vs 12.2 ms),
# but the input gradient's GEMM has M = C_out*kH*kW and runs well (6 of 16: tiles 0.87 ms,
# BLAS 0.40; 16 of 16: 0.36 vs 0.66). The weight gradient's tiles lose to BLAS at 6 of 16
# on LeNet's first layer (3 -> 6, 5x5, 32x32, batch 64: 1.01 vs 0.66 ms).
FORWARD_MIN_FILL, INPUT_GRAD_MIN_FILL, WEIGHT_GRAD_MIN_FILL = 0.25, 1.0, 0.5

# 1x1 layers that read the input as it is run as BLAS GEMMs, not tiles, from this many bytes
# of weights per group: the tiles then stream each block's weights and the input from L2
# (and pack the weights on every call) and fall behind. Measured side by side on Zen 3
# (AVX2: 6 x 2 tiles of 8 lanes), 2 threads, batch 8, tiles / BLAS (PyTorch): 512->2048 on
# 7x7 10.0 / 7.1 (6.8) ms, at batch 1 6.1 / 0.97 (1.7); 2048->512 11.5 / 6.9 (6.9);
# 1024->256 on 14x14 10.7 / 9.6 (6.1); 256->1024 7.2 / 6.4 (6.2); 256->256 1.89 / 1.71
# (1.65); 128->512 on 28x28 7.8 / 7.0 (6.6). Below it the tiles mostly win: 256->64 on 56x56
# 7.5 / 8.3 (7.3); not 64->256 on 56x56, 8.7 / 7.5. Those tiles ran per image; on small
# planes they now run over the batch's pixels (_pointwise_band), and on Zen 4 (AVX-512, 14 x 2
# tiles of 16 lanes), 2 threads, batch 8, the autotuner measured 512->2048 on 7x7 forward
# 3.9-4.2 ms by tiles against 4.3-4.6 by BLAS (PyTorch 4.0), its input gradient 4.0-4.5
# against 4.4-4.7: the GEMM stays the rule's choice, the tiles the measured one.
_DIRECT_GEMM_BYTES = 256 * 1024

# Bytes of input rows per copy in _tile_forward: with the weights of a block of output
# channels, within L2. 256 KiB was set on 1 MiB L2s (and kept on Zen 3's 512 KiB); with 2 MiB
# (Xeon), a quarter of it: 3x3 stride 2 on 128 channels, forward tiles, 7.3-7.9 -> 6.9-7.3 ms
# (its chunks of 3 output rows copied 7 input rows; now 7 of 15), other layers unchanged.
_COPY_BYTES = max(256 * 1024, l2_bytes() // 4)


def _tiles_fill_lanes(n_out: int, dtype, fill: float) -> bool:
    """Whether tiles of ``n_out`` output channels per group are worth it: a tile computes a
    whole vector of L channels, so below ``fill``*L channels im2col and BLAS waste less."""
    return n_out >= fill * _microkernel.lanes(dtype)


def _tile_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, y: np.ndarray,
               params: Conv2dParams, transposed: bool = False) -> None:
    """y (N, C_out, Ho, Wo) = conv2d(x, w) + b by ``_tile_forward``. ``transposed``: w is the
    weight of the layer whose input gradient this conv is (see _pack_block)."""
    n = x.shape[0]
    g = params.groups
    kh, kw = w.shape[2], w.shape[3]
    ho, wo = y.shape[2], y.shape[3]
    n_out = y.shape[1] // g
    lanes = _microkernel.lanes(x.dtype)
    v = 1 if n_out <= lanes else 2  # one vector of output channels per tile, or two
    threads = engine_threads()
    pointwise = _pointwise_per(params, (kh, kw), x.shape[2:], (ho, wo), n) > 1
    if pointwise:  # bands of the batch's pixels (see _pointwise_band), a tile each at least
        bands = max(1, min(-(-threads // g), n * ho * wo // _microkernel.max_tile()))
        items = g * bands
    else:  # output-row bands when there are too few (image, group) items to share out evenly
        bands = 1 if n * g >= 2 * threads else min(ho, -(-2 * threads // (n * g)))
        items = n * g * bands
    top, _, left, _ = params.padding
    w5 = w.reshape(g, w.shape[0] // g, w.shape[1], kh, kw)
    with parallel_region(items):
        _tile_forward(x, w5, b, transposed, y, g, bands, pointwise, _COPY_BYTES,
                      _microkernel.max_tile(), v, v * lanes, kh, kw, *params.stride,
                      top, left, *params.dilation)


# Input gradients as tiles. At stride 1 the input gradient is a conv of grad_out with each
# group's filters transposed (C_in/G in <-> C_out/G out) and flipped, at padding
# (k-1)*dilation - pad (negative where the forward padded past the kernel's reach: the copy
# crops), so the forward's tiles compute it. With a stride, input row ih = r*sH + a only
# receives the taps i with (a + pad - i*dH) divisible by sH: i0, i0 + m, ... (m = sH /
# gcd(sH, dH)), from output rows r + c0 - t*dH', c0 = (a + pad - i0*dH) / sH, dH' = dH /
# gcd(sH, dH). So each of the sH*sW phases (a, b) is the stride-1 case with that sub-kernel
# (reach (T-1)*dH', padding reach - c0), computed into a plane of its own; the phase planes
# are then interleaved. Stride 1 is the one phase with every tap (c0 = pad, dH' = dH),
# computed straight into the gradient. Measured (2 threads, against im2col + BLAS): 5x5, 32
# -> 32 channels on 28x28 2.7 -> 1.6 ms; 3x3 stride 2, 128 channels on 56x56, batch 8,
# 16.0-16.6 -> 11.6-12.5 ms.
def _phase_taps(a: int, pad: int, k: int, s: int, d: int):
    """(taps, c0, d') of input phase ``a`` along one axis (see above); no taps: ([], 0, 1)."""
    taps = [i for i in range(k) if (a + pad - i * d) % s == 0]
    if not taps:
        return taps, 0, 1
    return taps, (a + pad - taps[0] * d) // s, d // math.gcd(s, d)


def _phase_conv(gy: np.ndarray, weight: np.ndarray, out: np.ndarray, row_taps, col_taps,
                groups: int) -> None:
    """out (N, C_in, Hq, Wq) = the input-gradient phase whose taps are ``row_taps`` x
    ``col_taps`` (``_phase_taps`` results): a stride-1 tile conv of gy with that sub-kernel of
    weight (C_out, C_in/G, kH, kW), transposed and flipped; 0 if no tap reaches it."""
    (taps_i, c0_h, dh), (taps_j, c0_w, dw) = row_taps, col_taps
    if not taps_i or not taps_j:
        out.fill(0)
        return
    sub = weight if (len(taps_i), len(taps_j)) == weight.shape[2:] else \
        np.ascontiguousarray(weight[:, :, taps_i][:, :, :, taps_j])
    pad_h, pad_w = (len(taps_i) - 1) * dh - c0_h, (len(taps_j) - 1) * dw - c0_w
    _tile_conv(gy, sub, np.zeros(out.shape[1], dtype=out.dtype), out,
               Conv2dParams((1, 1), (pad_h, pad_h, pad_w, pad_w), (dh, dw), groups),
               transposed=True)


@parallel_kernel
def _interleave_phases(buf, offsets, strides, gx4, n0, count, sh, sw):
    """gx4[n0 + m, c, r*sH + a, q*sW + b] = phase (a, b)'s plane element [m, c, r, q] for
    m < count: in ``buf`` at offsets[p] + m*strides[p, 0] + c*strides[p, 1] + r*strides[p, 2]
    + q, p = a*sW + b (a phase's rows are contiguous, its planes may lie anywhere)."""
    c_in, h, w = gx4.shape[1], gx4.shape[2], gx4.shape[3]
    gx = gx4.reshape(gx4.size)
    for item in prange(count * c_in):
        m, c = item // c_in, item % c_in
        for ih in range(h):
            a, r = ih % sh, ih // sh
            dst = (((n0 + m) * c_in + c) * h + ih) * w
            if sw == 2:
                # Two rows interleaved, the stride a literal (vectorised with shuffles).
                p0, p1 = a * 2, a * 2 + 1
                s0 = offsets[p0] + m * strides[p0, 0] + c * strides[p0, 1] + r * strides[p0, 2]
                s1 = offsets[p1] + m * strides[p1, 0] + c * strides[p1, 1] + r * strides[p1, 2]
                row, r0, r1 = gx[dst:dst + w], buf[s0:s0 + (w + 1) // 2], buf[s1:s1 + w // 2]
                for q in range(w // 2):
                    row[2 * q] = r0[q]
                    row[2 * q + 1] = r1[q]
                if w % 2:
                    row[w - 1] = r0[w // 2]
                continue
            for b in range(sw):
                p = a * sw + b
                src = offsets[p] + m * strides[p, 0] + c * strides[p, 1] + r * strides[p, 2]
                for q in range((w - b + sw - 1) // sw):
                    gx[dst + q * sw + b] = buf[src + q]


# Input gradients by pixel tiles (``_microkernel.tile_fma_pixels``), for layers with few
# input channels (an RGB or LeNet input: 3 or 6 of a vector's 16 lanes in the channel tiles).
# Phase (a, b) of the gradient (see "Input gradients as tiles" below) is a stride-1 conv of
# grad_out with its sub-kernel, computed here a vector of L output pixels at a time. Per work
# item (image, band of phase rows), grad_out's rows for the band are copied a chunk of
# channels at a time (an L2-sized buffer) into zero-padded rows of one pitch Wp that every
# phase's taps reach, so output pixel p = r*Wp + q of any phase reads tap (c, i, j) at a
# constant offset from p; every phase's tiles add that chunk's taps to the phase's band
# buffer, and the finished band is written into the gradient, phase pixels at their stride.
# grad_out is read once for all phases, and the copies stay in cache. Measured (2 threads,
# float32, ms, pixel tiles against im2col and BLAS; PyTorch): ResNet's 7x7 stride-2 stem (3
# channels, 224x224, batch 8) 10.9-11.1 against 16.1-16.5 (48-50); 3x3 3 -> 64 on 224x224,
# batch 4, 5.4-6.8 against 6.5-9.1 (40); 8 -> 32 on 56x56 0.68 against 0.92 (1.5). (Copied
# per phase in bands of 256 KiB, the stem took 17.5; in 2 MiB bands, 13.7.)
@parallel_kernel
def _pixel_phases(gy4, wpk, gx4, desc, t, rs, lanes_n, sh, sw, pt, pb, pl, wp, hq, band_rows,
                  chunk):
    """gx4 (N, C_in, H, W) = the input gradient, from gy4 (N, C_out, Ho, Wo), of a one-group
    conv given by its phases: desc[p] = (a, b, taps_i, taps_j, dh, dw, pad_h, pad_w, hq_p,
    wq_p, woff), phase p's stride-1 conv (padding pad_h, pad_w; a sub-kernel of taps_i x
    taps_j taps, dilation dh, dw) writing gx4[:, :, r*sh + a, q*sw + b] for r < hq_p, q <
    wq_p; its weights at wpk[woff:], per block of t input channels tap-major: [woff +
    (blk*K + k)*t + c], K = C_out*taps_i*taps_j, zero past C_in. pt, pb, pl: the rows above,
    below and columns left that the phases' taps reach; wp: the common row pitch; hq: the
    most rows of a phase; rs[t] = ``pixel_vectors(t)``."""
    n_img, c_g, ho, wo = gy4.shape
    c_x, h, w = gx4.shape[1], gx4.shape[2], gx4.shape[3]
    nph = desc.shape[0]
    nblk = -(-c_x // t)
    r = rs[t]
    whole = r * lanes_n
    bands = -(-hq // band_rows)
    gflat, xflat = gy4.reshape(-1), gx4.reshape(-1)
    taps_max = 0
    for p in range(nph):
        taps_max = max(taps_max, desc[p, 2] * desc[p, 3])
    for item in prange(n_img * bands):
        img, band = item // bands, item % bands
        r0 = band * band_rows
        rows = min(band_rows, hq - r0)
        rows_in = rows + pt + pb
        # Slack past the rows: a phase's last tile runs up to a tile past its band's pixels
        # (and past the columns its taps reach, a row more): reads and writes there are
        # thrown away, as are the columns past a phase's Wq in each row.
        plane = (rows_in + 1) * wp + whole
        xb = np.zeros(chunk * plane, dtype=gy4.dtype)
        ystride = rows * wp + whole
        yb = np.zeros(nph * nblk * t * ystride, dtype=gy4.dtype)
        offs = np.empty((nph, chunk * taps_max), dtype=np.int64)
        for p in range(nph):
            ti, tj, dh, dw, ph, pw = desc[p, 2], desc[p, 3], desc[p, 4], desc[p, 5], \
                desc[p, 6], desc[p, 7]
            for cl in range(chunk):
                for i in range(ti):
                    for j in range(tj):
                        offs[p, (cl * ti + i) * tj + j] = cl * plane + \
                            (pt - ph + i * dh) * wp + pl - pw + j * dw
        for c0 in range(0, c_g, chunk):
            cc = min(chunk, c_g - c0)
            _phase_rows(gflat, (img * c_g + c0) * ho * wo, cc, ho, wo, xb, plane, rows_in,
                        r0 - pt, pl, 1, wp)
            for p in range(nph):
                ti, tj = desc[p, 2], desc[p, 3]
                span = (min(rows, desc[p, 8] - r0)) * wp
                nk = cc * ti * tj
                if span <= 0 or nk == 0:
                    continue
                k_all = c_g * ti * tj
                for blk in range(nblk):
                    w0 = desc[p, 10] + (blk * k_all + c0 * ti * tj) * t
                    y0 = (p * nblk + blk) * t * ystride
                    for q in range(0, span, whole):
                        tile_fma_pixels(xb, q, offs[p], nk, wpk, w0, yb, y0 + q, ystride, t, r)
        for p in range(nph):
            a, b, hq_p, wq_p = desc[p, 0], desc[p, 1], desc[p, 8], desc[p, 9]
            for blk in range(nblk):
                for c in range(min(t, c_x - blk * t)):
                    src = ((p * nblk + blk) * t + c) * ystride
                    for rr in range(min(rows, hq_p - r0)):
                        d0 = ((img * c_x + blk * t + c) * h + (r0 + rr) * sh + a) * w + b
                        s0 = src + rr * wp
                        if sw == 1:
                            copy_at(xflat, d0, yb, s0, wq_p)
                        else:
                            for q in range(wq_p):
                                xflat[d0 + q * sw] = yb[s0 + q]


def _pixel_plan(c_in: int, kernel_hw, in_hw, params: Conv2dParams):
    """The phases and geometry ``_pixel_phases`` computes a one-group layer's input gradient
    with: (phases, pt, pb, pl, wp, t): each phase (a, b, row taps, column taps, dH', dW',
    pad_h, pad_w, Hq, Wq) (no taps: an empty list), then the rows above and below and the
    columns left that the phases' taps reach, the common row pitch, and t input channels a
    tile."""
    (kh, kw), (h, w) = kernel_hw, in_hw
    (sh, sw), (dh, dw) = params.stride, params.dilation
    top, _, left, _ = params.padding
    phases = []
    pt = pb = pl = pr = 0
    for a in range(sh):
        for b in range(sw):
            hq, wq = -(-(h - a) // sh), -(-(w - b) // sw)
            if hq <= 0 or wq <= 0:
                continue  # an input smaller than the stride: no such phase
            (ti, c0_h, dh_), (tj, c0_w, dw_) = _phase_taps(a, top, kh, sh, dh), \
                _phase_taps(b, left, kw, sw, dw)
            if not ti or not tj:
                phases.append((a, b, [], [], 1, 1, 0, 0, hq, wq))
                continue
            ph, pw = (len(ti) - 1) * dh_ - c0_h, (len(tj) - 1) * dw_ - c0_w
            pt, pb = max(pt, ph), max(pb, (len(ti) - 1) * dh_ - ph)
            pl, pr = max(pl, pw), max(pr, (len(tj) - 1) * dw_ - pw)
            phases.append((a, b, ti, tj, dh_, dw_, ph, pw, hq, wq))
    wp = max(ph[9] for ph in phases) + pl + pr
    return phases, pt, pb, pl, wp, min(c_in, _microkernel.pixel_channels())


@functools.lru_cache(maxsize=1024)  # every input gradient of such a layer asks (~5 us)
def _pixel_waste(n: int, c_out: int, c_in: int, kernel_hw, in_hw, out_hw,
                 params: Conv2dParams) -> float:
    """The multiply-adds pixel tiles make for a one-group layer's input gradient, over the
    layer's own: they also multiply grad_out's zero padding, the columns between a phase's
    rows and a last block's unused channels (LeNet's 5x5 layer, 10x10 grad_out padded by 4
    on every side: 2.5x)."""
    phases, _, _, _, wp, t = _pixel_plan(c_in, kernel_hw, in_hw, params)
    nblk = -(-c_in // t)
    made = n * nblk * t * c_out * sum(ph[8] * wp * len(ph[2]) * len(ph[3]) for ph in phases)
    own = n * c_out * out_hw[0] * out_hw[1] * c_in * kernel_hw[0] * kernel_hw[1]
    return made / max(1, own)


def _input_grad_pixels(gy: np.ndarray, weight: np.ndarray, gx: np.ndarray,
                       params: Conv2dParams) -> None:
    """gx (N, C_in, H, W) = the input gradient of a one-group conv from gy (N, C_out, Ho, Wo)
    and weight (C_out, C_in, kH, kW), by ``_pixel_phases`` (see above)."""
    n, c_in, h, w = gx.shape
    c_out, _, kh, kw = weight.shape
    phases, pt, pb, pl, wp, t = _pixel_plan(c_in, (kh, kw), (h, w), params)
    nblk = -(-c_in // t)
    desc, packs, woff = [], [], 0
    for a, b, ti, tj, dh_, dw_, ph, pw, hq, wq in phases:
        if ti:
            # The phase's conv weight: the sub-kernel transposed (C_in out, C_out in) and
            # flipped, packed per block of t input channels, tap-major.
            sub = weight[:, :, ti][:, :, :, tj][:, :, ::-1, ::-1]  # (C_out, C_in, Ti, Tj)
            k = sub.reshape(c_out, c_in, -1).transpose(0, 2, 1).reshape(-1, c_in)
            blocks = np.zeros((nblk, k.shape[0], t), dtype=gx.dtype)
            for blk in range(nblk):
                part = k[:, blk * t:(blk + 1) * t]
                blocks[blk, :, :part.shape[1]] = part
            packs.append(blocks.reshape(-1))
        desc.append((a, b, len(ti), len(tj), dh_, dw_, ph, pw, hq, wq, woff))
        woff += packs[-1].size if ti else 0
    desc = np.array(desc, dtype=np.int64)
    wpk = np.concatenate(packs) if packs else np.zeros(1, dtype=gx.dtype)
    hq_max = int(desc[:, 8].max())
    lanes = _microkernel.lanes(gx.dtype)
    rs = np.array([0] + [_microkernel.pixel_vectors(c) for c in range(1, t + 1)], np.int64)
    # A band's phase buffers about _PIXEL_BAND_BYTES; a chunk of channels' copied rows about
    # _COPY_BYTES; bands enough for every thread.
    per_row = len(desc) * nblk * t * wp * gx.itemsize
    band_rows = max(1, min(hq_max, _PIXEL_BAND_BYTES // per_row))
    threads = engine_threads()
    if n * -(-hq_max // band_rows) < 2 * threads:
        band_rows = max(1, -(-hq_max * n // (2 * threads)))
    plane = (band_rows + pt + pb + 1) * wp + rs[t] * lanes
    chunk = max(1, min(c_out, _COPY_BYTES // (plane * gx.itemsize)))
    with parallel_region(n * -(-hq_max // band_rows)):
        _pixel_phases(gy, wpk, gx, desc, t, rs, lanes, *params.stride, pt, pb, pl, wp, hq_max,
                      band_rows, chunk)


_PIXEL_BAND_BYTES = 160 * 1024
# See conv2d_backward_input: LeNet's 5x5 layer (6 <- 16 channels, 14x14, batch 64) 2.5 times,
# 0.47-0.50 ms by pixel tiles against 0.46-0.55 by BLAS; 6 <- 16 channels on 28x28, 5x5 padded
# by 2, 1.14 times, 0.76 against 0.80-1.34.
_PIXEL_MAX_WASTE = 1.5


def _input_grad_tiles(gy: np.ndarray, weight: np.ndarray, gx: np.ndarray,
                      params: Conv2dParams) -> None:
    """gx (N, C_in, H, W) = the input gradient of a conv from gy (N, C_out, Ho, Wo) and weight
    (C_out, C_in/G, kH, kW): one stride-1 tile conv per input phase (see above)."""
    n, c_in, h, w = gx.shape
    kh, kw = weight.shape[2], weight.shape[3]
    (sh, sw), (dh, dw) = params.stride, params.dilation
    top, _, left, _ = params.padding
    rows = [_phase_taps(a, top, kh, sh, dh) for a in range(sh)]
    cols = [_phase_taps(b, left, kw, sw, dw) for b in range(sw)]
    if (sh, sw) == (1, 1):
        _phase_conv(gy, weight, gx, rows[0], cols[0], params.groups)
        return
    hq = np.array([-(-(h - a) // sh) for a in range(sh)], dtype=np.int64)
    wq = np.array([-(-(w - b) // sw) for b in range(sw)], dtype=np.int64)
    sizes = [n * c_in * hq[a] * wq[b] for a in range(sh) for b in range(sw)]
    offsets = np.cumsum([0] + sizes[:-1]).astype(np.int64)
    buf = np.empty(sum(sizes), dtype=gx.dtype)
    for a in range(sh):
        for b in range(sw):
            o = offsets[a * sw + b]
            part = buf[o:o + sizes[a * sw + b]].reshape(n, c_in, hq[a], wq[b])
            if part.size:  # else an input smaller than the stride: no such phase
                _phase_conv(gy, weight, part, rows[a], cols[b], params.groups)
    # Phase (a, b)'s planes are (N, C_in, hq[a], wq[b]), one after another.
    strides = np.array([(c_in * hq[a] * wq[b], hq[a] * wq[b], wq[b]) for a in range(sh)
                        for b in range(sw)], dtype=np.int64)
    with parallel_region(n * c_in):
        _interleave_phases(buf, offsets, strides, gx, 0, n, sh, sw)


# Strided layers' input gradient as GEMMs over shifted views. Input row ih = r*sH + a (phase
# a) gets tap i of the kernel from output row oh = r + e_i where a + pt - i*dH = e_i*sH, so
# phase (a, b) of the gradient is a sum over its taps (i, j) of W[:, :, i, j]^T @ grad_out
# shifted by (e_i, f_j). grad_out is laid out once "wide", each image a zero-bordered
# (Hp, Wp) plane in one row per channel; every shift is then a contiguous column range of
# it, so each tap is one BLAS GEMM (K = C_out) straight on that view, added into the phase's
# wide plane (whose columns past the phase's own rows and columns are never read). BLAS
# runs those GEMMs near its peak where the per-phase tile convs of small K do not: 3x3
# stride 2, 128 channels on 56x56, batch 8, 2 threads, 9 GEMMs of 128x128x7200 at ~400
# GFLOP/s (15% of their columns the border) against tile convs at 205-304.
_PHASE_GEMM_BYTES = 32 << 20  # the wide planes of a chunk of images, at most (unless one)


def _wide_phase_geometry(in_hw, out_hw, kernel, stride, pad, dilation):
    """Per axis: (taps[a] = [(tap, e)] for each phase a, border, plane extent) for
    ``_input_grad_phase_gemm``: output index oh = r + e feeds phase a's row r, read at plane
    row r + e + border; the plane holds every phase's rows and grad_out's."""
    taps = [[(i, (a + pad - i * dilation) // stride)
             for i in _phase_taps(a, pad, kernel, stride, dilation)[0]] for a in range(stride)]
    shifts = [e for phase in taps for _, e in phase] or [0]
    border = max(0, -min(shifts))
    phases = [-(-(in_hw - a) // stride) for a in range(stride)]
    extent = max(max(phases) + max(shifts), out_hw) + border
    return taps, border, extent


@parallel_kernel
def _pack_wide(gy4, n0, count, gyp, top, left, hp, wp):
    """gyp[c, m*Hp*Wp + (oh + top)*Wp + ow + left] = gy4[n0 + m, c, oh, ow] for m < count,
    zero elsewhere (borders, and the tail past the last plane that shifted views read)."""
    c_out, ho, wo = gy4.shape[1], gy4.shape[2], gy4.shape[3]
    plane, cols = hp * wp, gyp.shape[1]
    for item in prange(c_out * count):
        c, m = item // count, item % count
        row, base = gyp[c], m * plane
        first = base + top * wp + left  # grad_out's first element
        fill_at(row, base, first - base, 0)
        _rows_to_wide(gy4[n0 + m, c].reshape(ho * wo), row[first:], 0, ho, wo, wp)
        end = first + (ho - 1) * wp + wo  # past its last
        fill_at(row, end, base + plane - end, 0)
        if m == count - 1:
            fill_at(row, count * plane, cols - count * plane, 0)


@njit(cache=True)
def _shifted_gemms(wt, gyp, outs, jobs, span):
    """outs[p] (=, or += after the first) wt[k] @ gyp[:, off:off + span], for each job
    (p, k, off, first) in order: BLAS threads share each GEMM."""
    for t in range(jobs.shape[0]):
        p, k, off, first = jobs[t, 0], jobs[t, 1], jobs[t, 2], jobs[t, 3]
        _blas.gemm(wt[k], gyp[:, off:off + span], outs[p][:, :span], accumulate=first == 0)


def _input_grad_phase_gemm(gy: np.ndarray, weight: np.ndarray, gx: np.ndarray,
                           params: Conv2dParams) -> None:
    """gx (N, C_in, H, W) = the input gradient of a one-group strided conv from gy (N, C_out,
    Ho, Wo) and weight (C_out, C_in, kH, kW): per input phase, one GEMM per tap on shifted
    views of the wide grad_out (see above), in chunks of images."""
    n, c_in, h, w = gx.shape
    c_out, _, kh, kw = weight.shape
    ho, wo = gy.shape[2], gy.shape[3]
    (sh, sw), (dh, dw) = params.stride, params.dilation
    top, _, left, _ = params.padding
    rows, border_h, hp = _wide_phase_geometry(h, ho, kh, sh, top, dh)
    cols, border_w, wp = _wide_phase_geometry(w, wo, kw, sw, left, dw)
    # (phase, tap, shift, first of its phase): the first GEMM of a phase overwrites its plane.
    jobs = [(a * sw + b, i * kw + j, (e + border_h) * wp + f + border_w, int(ti == tj == 0))
            for a in range(sh) for b in range(sw)
            for ti, (i, e) in enumerate(rows[a]) for tj, (j, f) in enumerate(cols[b])]
    if not jobs:  # no tap reaches any input element
        gx.fill(0)
        return
    jobs = np.array(jobs, dtype=np.int64)
    slack = int(jobs[:, 2].max())
    plane = hp * wp
    per = max(1, min(n, _PHASE_GEMM_BYTES // ((sh * sw * c_in + c_out) * plane
                                               * gx.itemsize)))
    # W[:, :, i, j]^T for each tap, contiguous: the GEMMs' left operands.
    wt = np.ascontiguousarray(weight.transpose(2, 3, 1, 0)).reshape(kh * kw, c_in, c_out)
    gyp = np.empty((c_out, per * plane + slack), dtype=gx.dtype)
    outs = np.empty((sh * sw, c_in, per * plane), dtype=gx.dtype)
    outs[np.setdiff1d(np.arange(sh * sw), jobs[:, 0])] = 0  # phases no tap reaches
    # Phase p's plane element (m, c, r, q) is outs[p, c, m*Hp*Wp + r*Wp + q].
    offsets = np.arange(sh * sw, dtype=np.int64) * c_in * per * plane
    strides = np.array([(plane, per * plane, wp)] * (sh * sw), dtype=np.int64)
    for n0 in range(0, n, per):
        count = min(per, n - n0)
        with parallel_region(c_out * count):
            _pack_wide(gy, n0, count, gyp[:, :count * plane + slack], border_h, border_w,
                       hp, wp)
        with parallel_region(1):  # BLAS shares each GEMM
            _shifted_gemms(wt, gyp, outs, jobs, count * plane)
        with parallel_region(count * c_in):
            _interleave_phases(outs.reshape(-1), offsets, strides, gx, n0, count, sh, sw)


# Weight gradients as tiles. gw[co, c, i, j] = sum over (n, oh, ow) of gy[n, co, oh, ow] *
# x[n, c, oh*sH + i*dH - pt, ow*sW + j - pl]: ``tile_fma`` with the roles turned, its taps k
# the batch's output pixels (offs[k]: where pixel k's window starts in x), its t columns a
# kernel row's taps j (consecutive in x when dW = 1), its vectors output channels, and
# grad_out, packed pixel-major, as its weights. A tile sums a whole chunk of pixels in
# registers, so there is no im2col matrix and no GEMM call per image. The pixels are cut into
# chunks whose packed grad_out stays in L2 while every (c, i) tile of a block reads it; the
# chunks' partial sums are added in order, so the bits do not depend on the thread count.
# Measured (2 threads) against im2col + BLAS: LeNet's 5x5 layer 0.44 -> 0.20 ms, 3x3 stride
# 2 with 128 channels on 56x56 (batch 8) 13.9 -> 9.3 ms (see the README for the rest). A tile
# takes up to WEIGHT_TILE_ROWS kernel rows of a channel (``tile_fma_rows``): 3x3 layers, one
# row -> three, same run, ms: 128 channels stride 2 10.1-10.8 -> 9.4-9.9, 64 channels
# stride 1 on 56x56 10.3 -> 9.7-9.8, the 7x7 stem 11.9-12.0 -> 11.6-11.7; bitwise the same.
@parallel_kernel
def _pack_grad_out(gy4, groups, lanes, gpk):
    """gpk[g, cb, n*P + q, c] = gy4[n, g*C_out/G + cb*LV + c, q] (P = Ho*Wo, q = oh*Wo + ow),
    zero past the group's channels: gy4 (N, C_out, Ho, Wo), gpk (G, NB, N*P, LV)."""
    n_img, c_out = gy4.shape[0], gy4.shape[1]
    p = gy4.shape[2] * gy4.shape[3]
    nb, lv = gpk.shape[1], gpk.shape[3]
    cout_g = c_out // groups
    src, dst = gy4.reshape(-1), gpk.reshape(-1)
    full = p - p % lanes
    for item in prange(groups * nb * n_img):
        g, cb, img = item // (nb * n_img), (item // n_img) % nb, item % n_img
        d0 = ((g * nb + cb) * n_img + img) * p * lv
        scratch = np.empty(lanes * lanes, dtype=gy4.dtype)
        for sub in range(0, lv, lanes):
            ch0 = cb * lv + sub  # the block's first channel in the group
            s0 = (img * c_out + g * cout_g + ch0) * p
            live = max(0, min(lanes, cout_g - ch0))
            if live == lanes:
                for q in range(0, full, lanes):
                    transpose_block(dst, d0 + q * lv + sub, lv, src, s0 + q, p)
            else:
                # Past the group's last channel: rows of zeros, by way of a scratch block.
                scratch[:] = 0
                for q in range(0, full, lanes):
                    for c in range(live):
                        copy_run(scratch, c * lanes, src, s0 + c * p + q, lanes, 1)
                    transpose_block(dst, d0 + q * lv + sub, lv, scratch, 0, lanes)
            for q in range(full, p):
                for c in range(lanes):
                    dst[d0 + q * lv + sub + c] = src[s0 + c * p + q] if c < live else 0


@parallel_kernel
def _tile_weight(xs4, gpk, part, kh, kw, sh, sw, dh, ho, wo, t, v, chunks, r):
    """part[chunk, g, co, (c*kH + i)*kW + j] = the weight gradient's sum over the chunk's
    output pixels; xs4 (N, C_in, Hs, Ws) holds every window whole from (0, 0) (the input, or
    its zero-padded copy), gpk the packed grad_out (see _pack_grad_out); dW = 1. A tile takes
    r kernel rows of a channel (r*kW <= max_tile; the last of a channel's row groups may have
    fewer), or with r = 1 t columns of one row."""
    n_img, c_in, hs, ws = xs4.shape
    groups, nb, npix, lv = gpk.shape
    cout_g, k_taps = part.shape[2], part.shape[3]
    cin_g = c_in // groups
    offs = np.empty(npix, dtype=np.int64)
    for k in range(npix):
        img, q = k // (ho * wo), k % (ho * wo)
        offs[k] = img * c_in * hs * ws + (q // wo) * sh * ws + (q % wo) * sw
    x, gflat, out = xs4.reshape(-1), gpk.reshape(-1), part.reshape(-1)
    zero = np.zeros(lv, dtype=xs4.dtype)
    per_c = -(-kh // r)  # row groups a channel has
    rows = cin_g * per_c
    for item in prange(chunks * groups * nb * rows):
        ch, rest = item // (groups * nb * rows), item % (groups * nb * rows)
        g, cb, row = rest // (nb * rows), (rest // rows) % nb, rest % rows
        c, i = row // per_c, (row % per_c) * r
        nr = min(r, kh - i)
        k0, k1 = ch * npix // chunks, (ch + 1) * npix // chunks
        x0 = (g * cin_g + c) * hs * ws + i * dh * ws
        o0 = ((ch * groups + g) * cout_g + cb * lv) * k_taps + (c * kh + i) * kw
        w0 = ((g * nb + cb) * npix + k0) * lv
        if nr > 1:
            tile_fma_rows(x, x0, dh * ws, offs[k0:], k1 - k0, gflat, w0, zero, 0, out, o0,
                          k_taps, cout_g - cb * lv, kw, nr, v)
        else:
            for j0 in range(0, kw, t):
                tile_fma(x, x0 + j0, offs[k0:], k1 - k0, gflat, w0, zero, 0, out, o0 + j0,
                         k_taps, cout_g - cb * lv, min(t, kw - j0), v)


@parallel_kernel
def _pad_planes(x4, xp4, pt, pl):
    """xp4 (N, C, Hp, Wp) = the windows of x4's planes zero-padded by (pt, pl) (_pad_plane)."""
    for item in prange(x4.shape[0] * x4.shape[1]):
        img, c = item // x4.shape[1], item % x4.shape[1]
        _pad_plane(x4[img, c], xp4[img, c], pt, pl)


# Kernel rows a weight-gradient tile takes (see _microkernel.tile_fma_rows); 1: one row.
WEIGHT_TILE_ROWS = _microkernel.ROW_TILES


# Bytes of packed grad_out a chunk of pixels holds: as _COPY_BYTES (2 MiB L2, weight-gradient
# tiles, ms: 64 channels on 56x56 9.7-10.1 -> 9.4-9.6, the stem 11.0-12.2 -> 10.5-11.3).
_WEIGHT_CHUNK_BYTES = max(256 * 1024, l2_bytes() // 4)


def _weight_grad_tiles(gy: np.ndarray, x: np.ndarray, gw: np.ndarray,
                       params: Conv2dParams) -> None:
    """gw (C_out, C_in/G, kH, kW) = the weight gradient of a conv with dW = 1 from gy
    (N, C_out, Ho, Wo) and x (N, C_in, H, W) by tiles (see above)."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = gw.shape
    g = params.groups
    _, _, ho, wo = gy.shape
    (sh, sw), (dh, _) = params.stride, params.dilation
    top, _, left, _ = params.padding
    lanes = _microkernel.lanes(x.dtype)
    v = 1 if c_out // g <= lanes else 2
    lv = v * lanes
    # The extent the windows read, from (-top, -left): the input itself when it holds them.
    hs, ws = (ho - 1) * sh + (kh - 1) * dh + 1, (wo - 1) * sw + kw
    xs = x
    if top or left or hs > h or ws > w:
        xs = np.empty((n, c_in, hs, ws), dtype=x.dtype)
        with parallel_region(n * c_in):
            _pad_planes(x, xs, top, left)
    npix = n * ho * wo
    nb = -(-(c_out // g) // lv)
    # The tiles' vector operand, aligned as _tile_forward's packed weights.
    gpk = _aligned_empty(g * nb * npix * lv, x.dtype).reshape(g, nb, npix, lv)
    with parallel_region(g * nb * n):
        _pack_grad_out(gy, g, lanes, gpk)
    chunks = max(1, min(npix, -(-npix * lv * x.itemsize // _WEIGHT_CHUNK_BYTES)))
    gw3 = gw.reshape(g, c_out // g, -1)
    part = gw3[None] if chunks == 1 else np.empty((chunks,) + gw3.shape, dtype=gw.dtype)
    t = min(kw, _microkernel.max_tile())
    r = max(1, min(WEIGHT_TILE_ROWS, kh, _microkernel.max_tile() // kw))
    with parallel_region(chunks * g * gpk.shape[1] * gw.shape[1] * -(-kh // r)):
        _tile_weight(xs, gpk, part, kh, kw, sh, sw, dh, ho, wo, t, v, chunks, r)
    if chunks > 1:
        with parallel_region(g):
            _sum_chunks(part, gw3)


# ---- depthwise: one input channel per group (C_in/groups == 1, C_out = mult * C_in) ------------
# A GEMM of one input channel per group is a 1 x kH*kW matrix: BLAS calls too small to pay.
# These kernels work on one zero-padded input plane at a time, held in L1: ``xp`` is the
# (Hp, Wp) window of the padded input that the convolution reads, Hp = (Ho-1)*sH + (kH-1)*dH + 1
# (likewise Wp), the input at offset (pt, pl). With stride 1, output (oh, ow) stored at
# q = oh*Wp + ow ("wide" rows, Wp - Wo unused columns between them) reads tap (i, j) at
# q + i*dH*Wp + j*dW: each tap is one flat, unit-stride, branch-free loop over the plane,
# which vectorises. Other strides loop per output row. Stride-1 layers whose output is as
# wide as the input skip the padded rows: see "flat planes" below.


# Plane copies are written as element loops: a slice assignment per 28-element row costs more
# in Numba's generic copy setup than the copy (measured: 0.9 ms of 1.5 per 2048 planes).
@njit(cache=True, nogil=True)
def _pad_plane(x, xp, pt, pl):
    """xp (Hp, Wp) = the window of x (H, W) zero-padded by (pt, pl) at the top left."""
    h, w = x.shape
    hp, wp = xp.shape
    r1, c1 = min(h, hp - pt), min(w, wp - pl)
    for r in range(hp):
        row = xp[r]
        ih = r - pt
        if ih < 0 or ih >= r1:
            for q in range(wp):
                row[q] = 0
            continue
        src = x[ih]
        for q in range(pl):
            row[q] = 0
        for iw in range(max(c1, 0)):
            row[iw + pl] = src[iw]
        for q in range(max(c1, 0) + pl, wp):
            row[q] = 0


@njit(cache=True, nogil=True)
def _depthwise_dims(in4, out4, kh, kw, sh, sw, dh, dw):
    """(N, C_in, C_out, Ho, Wo, mult, Hp, Wp) for an input-shaped and an output-shaped array;
    (Hp, Wp) is the extent of the padded input that the output reads."""
    n_img, c_in = in4.shape[0], in4.shape[1]
    c_out, ho, wo = out4.shape[1], out4.shape[2], out4.shape[3]
    hp, wp = _padded_extent(ho, wo, kh, kw, sh, sw, dh, dw)
    return n_img, c_in, c_out, ho, wo, c_out // c_in, hp, wp


@njit(cache=True, nogil=True)
def _crop_plane(xp, x, pt, pl):
    """The adjoint of ``_pad_plane``: x (H, W) = xp at offset (pt, pl); input rows and columns
    beyond the window (no output reads them) get 0."""
    h, w = x.shape
    hp, wp = xp.shape
    for ih in range(h):
        row = x[ih]
        r = ih + pt
        if r >= hp:
            for iw in range(w):
                row[iw] = 0
            continue
        src = xp[r]
        c1 = max(0, min(w, wp - pl))
        for iw in range(c1):
            row[iw] = src[iw + pl]
        for iw in range(c1, w):
            row[iw] = 0


@njit(cache=True, nogil=True)
def _add_taps(dst, flat, wk, kh, kw, dh, dw, wp, span):
    """dst[q] += sum over taps (i, j) of wk[i, j] * flat[q + i*dH*Wp + j*dW], q < span.

    Loops run over local slices (unit stride, no index arithmetic: they vectorise, ~4x the
    speed of indexing ``flat[q + s]``), and a row of three taps (the common 3x3) is summed in
    registers before ``dst`` is touched, a third of the loads and stores.
    """
    out = dst[:span]
    for i in range(kh):
        s = i * dh * wp
        if kw == 3:
            a, b, c = flat[s:s + span], flat[s + dw:s + dw + span], \
                flat[s + 2 * dw:s + 2 * dw + span]
            w0, w1, w2 = wk[i, 0], wk[i, 1], wk[i, 2]
            for q in range(span):
                out[q] += w0 * a[q] + w1 * b[q] + w2 * c[q]
            continue
        for j in range(kw):
            src = flat[s + j * dw:s + j * dw + span]
            wij = wk[i, j]
            for q in range(span):
                out[q] += wij * src[q]


@njit(cache=True, nogil=True)
def _depthwise_plane(xp, wk, y, bias, kh, kw, sh, sw, dh, dw, wide):
    """y (Ho, Wo) = bias + the taps wk (kH, kW) over the padded plane xp."""
    ho, wo = y.shape
    wp = xp.shape[1]
    flat = xp.ravel()
    if sh == 1 and sw == 1:
        span = (ho - 1) * wp + wo
        for q in range(span):
            wide[q] = bias
        _add_taps(wide, flat, wk, kh, kw, dh, dw, wp, span)
        _rows_from_wide(wide, y.reshape(ho * wo), 0, ho, wo, wp)
        return
    for oh in range(ho):
        row = y[oh]
        row[:] = bias
        for i in range(kh):
            base = (oh * sh + i * dh) * wp
            for j in range(kw):
                wij = wk[i, j]
                for ow in range(wo):
                    row[ow] += wij * flat[base + ow * sw + j * dw]


@parallel_kernel
def _depthwise_forward(x4, w3, b1, y4, kh, kw, sh, sw, pt, pl, dh, dw):
    """x4 (N, C_in, H, W), w3 (C_out, kH, kW), b1 (C_out,) -> y4 (N, C_out, Ho, Wo).
    One work item per input plane: padded once, used by its ``mult`` output channels."""
    n_img, c_in, c_out, ho, wo, mult, hp, wp = _depthwise_dims(x4, y4, kh, kw, sh, sw, dh, dw)
    for item in prange(n_img * c_in):
        n, c = item // c_in, item % c_in
        xp = np.empty((hp, wp), dtype=x4.dtype)
        wide = np.empty(ho * wp, dtype=x4.dtype)
        _pad_plane(x4[n, c], xp, pt, pl)
        for m in range(mult):
            co = c * mult + m
            _depthwise_plane(xp, w3[co], y4[n, co], b1[co], kh, kw, sh, sw, dh, dw, wide)


# Flat planes. Depthwise, stride 1, output as wide as the input (the usual 'same' layer):
# the plane is used flat. Output q = oh*W + ow reads the input at q + i*dH*W + j*dW -
# pad_left, rows above and below the plane being zero margins of one contiguous copy; a tap
# column that falls outside the row would read the neighbouring row, so each column's sum
# is selected away there (a select, not a multiply by 0: that neighbour may be Inf). One
# vectorised loop over the whole plane, no padded rows to build or crop. 256 channels,
# 28x28, batch 8, 3x3, 2 threads, padded -> flat planes: forward 0.80-0.91 -> 0.40-0.44 ms,
# input gradient (the forward with flipped filters) 0.81-0.89 -> 0.41-0.46 ms, weight
# gradient 1.17-1.30 -> 0.46-0.61 ms.
@njit(cache=True, nogil=True)
def _flat_setup(x4, out4, kh, kw, pt, pl, dh, dw):
    """For x4 (N, C_in, H, W) and an output-shaped out4 (N, C_out, Ho, W): (N, C_in, C_out,
    W, mult, H*W, Ho*W, the plane's offset in the flat margin buffer, its size, the offset of
    tap (0, 0), the ``_column_inside`` table, a 0 of the arrays' dtype). The buffer holds pt
    zero rows above the plane, enough below for the last output row, and max(pl,
    reach - pl) zero elements before and after for the tap columns."""
    n_img, c_in, h, w = x4.shape
    c_out, ho = out4.shape[1], out4.shape[2]
    g = max(pl, (kw - 1) * dw - pl)
    below = max(0, ho + (kh - 1) * dh - pt - h)
    return (n_img, c_in, c_out, w, c_out // c_in, h * w, ho * w, pt * w + g,
            (pt + h + below) * w + 2 * g, g - pl, _column_inside(w, ho * w, kw, pl, dw),
            np.zeros(1, dtype=x4.dtype)[0])


@njit(cache=True, nogil=True)
def _column_inside(w, span, kw, pl, dw):
    """inside[j, q]: tap column j of flat output q = oh*W + ow reads inside the row."""
    inside = np.empty((kw, span), dtype=np.bool_)
    for j in range(kw):
        for q in range(span):
            iw = q % w + j * dw - pl
            inside[j, q] = 0 <= iw < w
    return inside


@njit(cache=True, nogil=True, inline="always")
def _taps_3x3(xb, o, span, w, dh, dw):
    """The nine shifted views xb[o + i*dH*W + j*dW:][:span] of a 3x3 kernel, column by
    column (j = 0: i = 0, 1, 2; then j = 1, j = 2)."""
    r1, r2 = dh * w, 2 * dh * w
    o1, o2 = o + dw, o + 2 * dw
    return (xb[o:o + span], xb[o + r1:o + r1 + span], xb[o + r2:o + r2 + span],
            xb[o1:o1 + span], xb[o1 + r1:o1 + r1 + span], xb[o1 + r2:o1 + r2 + span],
            xb[o2:o2 + span], xb[o2 + r1:o2 + r1 + span], xb[o2 + r2:o2 + r2 + span])


# 5x5 (LeNet's layers, EfficientNet's depthwise ones) fused as 3x3 is: 25 taps per element in
# registers, a column's five summed and then masked, one pass over the plane where the tap by
# tap loop makes 25 read-modify-write passes (LeNet's first layer, 1 -> 6 channels on 28x28,
# batch 64, 2 threads, Xeon: engine 0.35 -> 0.17 ms). Offsets unsigned (see _window.U64)
# and the taps read from the buffer itself: 25 views per plane would each take and drop a
# reference.
@njit(cache=True, nogil=True, fastmath={"contract"})
def _flat_plane_5x5(xb, o, wk, bias, zero, out, inside, w, dh, dw):
    """_flat_plane for a 5x5 kernel: out[q] = bias + the sum over columns j of (the sum over
    rows i of wk[i, j] * xb[o + q + i*dH*W + j*dW]) where ``inside[j, q]``."""
    r1, r2, r3, r4 = U64(dh * w), U64(2 * dh * w), U64(3 * dh * w), U64(4 * dh * w)
    c = U64(dw)
    w00, w10, w20, w30, w40 = wk[0, 0], wk[1, 0], wk[2, 0], wk[3, 0], wk[4, 0]
    w01, w11, w21, w31, w41 = wk[0, 1], wk[1, 1], wk[2, 1], wk[3, 1], wk[4, 1]
    w02, w12, w22, w32, w42 = wk[0, 2], wk[1, 2], wk[2, 2], wk[3, 2], wk[4, 2]
    w03, w13, w23, w33, w43 = wk[0, 3], wk[1, 3], wk[2, 3], wk[3, 3], wk[4, 3]
    w04, w14, w24, w34, w44 = wk[0, 4], wk[1, 4], wk[2, 4], wk[3, 4], wk[4, 4]
    m0, m1, m2, m3, m4 = inside[0], inside[1], inside[2], inside[3], inside[4]
    base = U64(o)
    for q in range(U64(out.shape[0])):
        p0 = base + q
        p1 = p0 + c
        p2 = p1 + c
        p3 = p2 + c
        p4 = p3 + c
        s0 = w00 * xb[p0] + w10 * xb[p0 + r1] + w20 * xb[p0 + r2] + w30 * xb[p0 + r3] \
            + w40 * xb[p0 + r4]
        s1 = w01 * xb[p1] + w11 * xb[p1 + r1] + w21 * xb[p1 + r2] + w31 * xb[p1 + r3] \
            + w41 * xb[p1 + r4]
        s2 = w02 * xb[p2] + w12 * xb[p2 + r1] + w22 * xb[p2 + r2] + w32 * xb[p2 + r3] \
            + w42 * xb[p2 + r4]
        s3 = w03 * xb[p3] + w13 * xb[p3 + r1] + w23 * xb[p3 + r2] + w33 * xb[p3 + r3] \
            + w43 * xb[p3 + r4]
        s4 = w04 * xb[p4] + w14 * xb[p4 + r1] + w24 * xb[p4 + r2] + w34 * xb[p4 + r3] \
            + w44 * xb[p4 + r4]
        out[q] = bias + (s0 if m0[q] else zero) + (s1 if m1[q] else zero) \
            + (s2 if m2[q] else zero) + (s3 if m3[q] else zero) + (s4 if m4[q] else zero)


# FMA contraction only: no reassociation, so the sums' order (and bits) stay fixed.
@njit(cache=True, nogil=True, fastmath={"contract"})
def _flat_plane(xb, o, wk, bias, zero, out, inside, w, kh, kw, dh, dw):
    """out[q] = bias + sum over taps of wk[i, j] * xb[o + q + i*dH*W + j*dW], each tap
    column's sum kept only where ``inside`` says so (else ``zero``, of the arrays' dtype);
    q < len(out)."""
    span = out.shape[0]
    if kh == 3 and kw == 3:
        # Fused: nine taps per element in registers, one pass over the plane.
        a0, a1, a2, b0, b1, b2, c0, c1, c2 = _taps_3x3(xb, o, span, w, dh, dw)
        m0, m1, m2 = inside[0], inside[1], inside[2]
        w00, w01, w02 = wk[0, 0], wk[0, 1], wk[0, 2]
        w10, w11, w12 = wk[1, 0], wk[1, 1], wk[1, 2]
        w20, w21, w22 = wk[2, 0], wk[2, 1], wk[2, 2]
        for q in range(span):
            s0 = w00 * a0[q] + w10 * a1[q] + w20 * a2[q]
            s1 = w01 * b0[q] + w11 * b1[q] + w21 * b2[q]
            s2 = w02 * c0[q] + w12 * c1[q] + w22 * c2[q]
            out[q] = bias + (s0 if m0[q] else zero) + (s1 if m1[q] else zero) \
                + (s2 if m2[q] else zero)
        return
    if kh == 5 and kw == 5:
        _flat_plane_5x5(xb, o, wk, bias, zero, out, inside, w, dh, dw)
        return
    for q in range(span):
        out[q] = bias
    for j in range(kw):
        m = inside[j]
        for i in range(kh):
            s = o + i * dh * w + j * dw
            src = xb[s:s + span]
            wij = wk[i, j]
            for q in range(span):
                out[q] += wij * src[q] if m[q] else zero


@parallel_kernel
def _depthwise_flat(x4, w3, b1, y4, kh, kw, pt, pl, dh, dw, chunks):
    """Stride 1, Wo == W: x4 (N, C_in, H, W), w3 (C_out, kH, kW), b1 (C_out,) -> y4 (N,
    C_out, Ho, W). Contiguous runs of planes per work item, so each item fills its margin
    buffer's zeros once; each plane is copied in once and read by its ``mult`` outputs."""
    n_img, c_in, c_out, w, mult, hw, span, at, size, o, inside, zero = _flat_setup(
        x4, y4, kh, kw, pt, pl, dh, dw)
    items = n_img * c_in
    chunks = min(items, chunks)
    xf = x4.reshape(items * hw)
    yf = y4.reshape(n_img * c_out * span)
    for chunk in prange(chunks):
        xb = np.zeros(size, dtype=x4.dtype)
        for item in range(chunk * items // chunks, (chunk + 1) * items // chunks):
            copy_at(xb, at, xf, item * hw, hw)
            for m in range(mult):
                co = (item % c_in) * mult + m
                y0 = ((item // c_in) * c_out + co) * span
                _flat_plane(xb, o, w3[co], b1[co], zero, yf[y0:y0 + span], inside, w, kh,
                            kw, dh, dw)


# Reassociation (and contraction) only, so LLVM may split the sums into vector lanes (see
# _tap_dots); the lane order is fixed at compile time. A tap outside the row adds nothing
# (``t = t + g*x if inside else t``, still an FMA): a zeroed factor instead would make an
# Inf of x read across a row end a 0 * Inf = NaN where PyTorch has an Inf.
@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _flat_tap_dots(gy, xb, o, inside, zero, acc, w, kh, kw, dh, dw):
    """acc[i, j] += sum over q of gy[q] * xb[o + q + i*dH*W + j*dW] where tap column j is
    inside the row (the adjoint of ``_flat_plane``): one plane's sums in the arrays' dtype,
    added to the float64 totals."""
    span = gy.shape[0]
    if kh == 3 and kw == 3:
        # Fused: the nine sums in one pass over the plane.
        a0, a1, a2, b0, b1, b2, c0, c1, c2 = _taps_3x3(xb, o, span, w, dh, dw)
        m0, m1, m2 = inside[0], inside[1], inside[2]
        t00 = t10 = t20 = t01 = t11 = t21 = t02 = t12 = t22 = zero
        for q in range(span):
            g, in0, in1, in2 = gy[q], m0[q], m1[q], m2[q]
            t00 = t00 + g * a0[q] if in0 else t00
            t10 = t10 + g * a1[q] if in0 else t10
            t20 = t20 + g * a2[q] if in0 else t20
            t01 = t01 + g * b0[q] if in1 else t01
            t11 = t11 + g * b1[q] if in1 else t11
            t21 = t21 + g * b2[q] if in1 else t21
            t02 = t02 + g * c0[q] if in2 else t02
            t12 = t12 + g * c1[q] if in2 else t12
            t22 = t22 + g * c2[q] if in2 else t22
        acc[0, 0] += t00
        acc[1, 0] += t10
        acc[2, 0] += t20
        acc[0, 1] += t01
        acc[1, 1] += t11
        acc[2, 1] += t21
        acc[0, 2] += t02
        acc[1, 2] += t12
        acc[2, 2] += t22
        return
    if kh == 5 and kw == 5:
        _flat_tap_dots_5x5(gy, xb, o, inside, zero, acc, w, dh, dw)
        return
    for j in range(kw):
        m = inside[j]
        for i in range(kh):
            s = o + i * dh * w + j * dw
            src = xb[s:s + span]
            t = zero
            for q in range(span):
                t += gy[q] * src[q] if m[q] else zero
            acc[i, j] += t


# 5x5 a column at a time: each pass reads gy and its column's mask once for five rows' taps,
# where the tap by tap loop reads both once per tap (LeNet's first layer, 1 -> 6 channels on
# 28x28, batch 64, 2 threads, Xeon: the weight gradient 0.30-0.31 -> 0.17 ms). All 25 sums
# in one pass ran slower: 25 accumulators crowd the registers.
@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _flat_tap_dots_5x5(gy, xb, o, inside, zero, acc, w, dh, dw):
    """_flat_tap_dots for a 5x5 kernel."""
    r1, r2, r3, r4 = U64(dh * w), U64(2 * dh * w), U64(3 * dh * w), U64(4 * dh * w)
    for j in range(5):
        m = inside[j]
        base = U64(o + j * dw)
        t0 = t1 = t2 = t3 = t4 = zero
        for q in range(U64(gy.shape[0])):
            g, inside_q = gy[q], m[q]
            p = base + q
            t0 = t0 + g * xb[p] if inside_q else t0
            t1 = t1 + g * xb[p + r1] if inside_q else t1
            t2 = t2 + g * xb[p + r2] if inside_q else t2
            t3 = t3 + g * xb[p + r3] if inside_q else t3
            t4 = t4 + g * xb[p + r4] if inside_q else t4
        acc[0, j] += t0
        acc[1, j] += t1
        acc[2, j] += t2
        acc[3, j] += t3
        acc[4, j] += t4


@parallel_kernel
def _depthwise_flat_weight(gy4, x4, gw3, kh, kw, pt, pl, dh, dw):
    """gw3 (C_out, kH, kW) for stride 1, Wo == W (the flat planes of ``_depthwise_flat``):
    per output channel, over the batch in order, accumulated in float64. One work item per
    output channel, so the result does not depend on the thread count."""
    n_img, c_in, c_out, w, mult, hw, span, at, size, o, inside, zero = _flat_setup(
        x4, gy4, kh, kw, pt, pl, dh, dw)
    xf = x4.reshape(n_img * c_in * hw)
    gf = gy4.reshape(n_img * c_out * span)
    for co in prange(c_out):
        c = co // mult
        xb = np.zeros(size, dtype=x4.dtype)
        acc = np.zeros((kh, kw), dtype=np.float64)
        for n in range(n_img):
            copy_at(xb, at, xf, (n * c_in + c) * hw, hw)
            g0 = (n * c_out + co) * span
            _flat_tap_dots(gf[g0:g0 + span], xb, o, inside, zero, acc, w, kh, kw, dh, dw)
        for i in range(kh):
            for j in range(kw):
                gw3[co, i, j] = acc[i, j]


@parallel_kernel
def _depthwise_backward_input(gy4, w3, gx4, kh, kw, sh, sw, pt, pl, dh, dw):
    """The adjoint of ``_depthwise_forward``: each tap scatters gy into the padded plane
    (which only the item's thread owns), then the interior is cropped into gx4."""
    n_img, c_in, c_out, ho, wo, mult, hp, wp = _depthwise_dims(gx4, gy4, kh, kw, sh, sw, dh,
                                                               dw)
    for item in prange(n_img * c_in):
        n, c = item // c_in, item % c_in
        gxp = np.zeros(hp * wp, dtype=gx4.dtype)
        wide = np.empty(ho * wp, dtype=gx4.dtype)
        span = (ho - 1) * wp + wo
        for m in range(mult):
            co = c * mult + m
            gy, wk = gy4[n, co], w3[co]
            if sh == 1 and sw == 1:
                _rows_to_wide(gy.reshape(ho * wo), wide, 0, ho, wo, wp)
                src = wide[:span]
                for i in range(kh):
                    for j in range(kw):
                        s = i * dh * wp + j * dw
                        dst = gxp[s:s + span]  # a local slice: the loop vectorises
                        wij = wk[i, j]
                        for q in range(span):
                            dst[q] += wij * src[q]
                continue
            for oh in range(ho):
                row = gy[oh]
                for i in range(kh):
                    base = (oh * sh + i * dh) * wp
                    for j in range(kw):
                        wij = wk[i, j]
                        for ow in range(wo):
                            gxp[base + ow * sw + j * dw] += wij * row[ow]
        _crop_plane(gxp.reshape(hp, wp), gx4[n, c], pt, pl)


# Reassociation (and FMA contraction) only, so LLVM may split these sums into vector lanes;
# no NaN/Inf assumptions. The lane order is fixed at compile time: same machine, same bits.
@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _tap_dots(src, flat, acc, kh, kw, dh, dw, wp, span):
    """acc[i, j] += sum_q src[q] * flat[q + i*dH*Wp + j*dW] (float32 lanes per call, a
    float64 total across calls)."""
    for i in range(kh):
        s = i * dh * wp
        for j in range(kw):
            shifted = flat[s + j * dw:s + j * dw + span]
            t = src[0] * 0  # the operands' dtype
            for q in range(span):
                t += src[q] * shifted[q]
            acc[i, j] += t


@parallel_kernel
def _depthwise_backward_weight(gy4, x4, gw3, kh, kw, sh, sw, pt, pl, dh, dw):
    """gw3 (C_out, kH, kW): per output channel, over the batch in order, each tap's sum of
    gy times the shifted padded input, accumulated in float64. One work item per output
    channel, so the result does not depend on the thread count."""
    n_img, c_in, c_out, ho, wo, mult, hp, wp = _depthwise_dims(x4, gy4, kh, kw, sh, sw, dh, dw)
    span = (ho - 1) * wp + wo
    for co in prange(c_out):
        c = co // mult
        xp = np.empty((hp, wp), dtype=x4.dtype)
        wide = np.empty(ho * wp, dtype=x4.dtype)
        acc = np.zeros((kh, kw), dtype=np.float64)
        flat = xp.ravel()
        for n in range(n_img):
            _pad_plane(x4[n, c], xp, pt, pl)
            gy = gy4[n, co]
            if sh == 1 and sw == 1:
                _rows_to_wide(gy.reshape(ho * wo), wide, 0, ho, wo, wp)
                _tap_dots(wide[:span], flat, acc, kh, kw, dh, dw, wp, span)
                continue
            for oh in range(ho):
                row = gy[oh]
                for i in range(kh):
                    base = (oh * sh + i * dh) * wp
                    for j in range(kw):
                        t = 0.0
                        for ow in range(wo):
                            t += row[ow] * flat[base + ow * sw + j * dw]
                        acc[i, j] += t
        for i in range(kh):
            for j in range(kw):
                gw3[co, i, j] = acc[i, j]


# ---- Winograd F(2x2, 3x3): 3x3, stride 1 (any dilation: one phase at a time), one group -------
# Y = A^T [ (G g G^T) . (B^T d B) ] A per 2x2 output tile: 16 multiplies where direct
# convolution does 36, so 2.25x fewer flops, spent as 16 GEMMs U[k] (C_out, C_in) @ V[k]
# (C_in, tiles) per chunk of tile rows (or of whole images, on small planes). The transforms
# add and subtract (B, A) or halve (G), so float32 results differ from direct convolution by
# a few more roundings: on the bench's 3x3 layers the worst error against a float64 result
# was 1-3x PyTorch's own (see README).
# F(4x4, 3x3) (``_microkernel.WINOGRAD4_*``) is the other candidate for the forward and input
# gradient: 36 GEMMs per chunk over 4x4 output tiles, 1.78x fewer multiplies than F(2x2) on
# planes that are whole tiles of both. Its float32 error is larger, 5-10x PyTorch's against
# float64 (6x6 transforms with entries up to 8), within the tests' bound (8 ulp of the
# largest condition scale, sum |x||w|); the autotuner takes it where it is measured faster,
# the rule-based choice stays F(2x2). Engine calls, 2 threads, ms, F(2x2) / F(4x4): 64 on
# 56x56 forward 3.42 / 2.45, input gradient 3.26 / 2.45; VGG's 128 on 112x112 10.6 / 7.9,
# 10.7 / 7.8; 256 on 14x14 (4x4 tiles cover 16x16) 3.43 / 3.45, 3.82 / 3.60.
# Tiles per work item: V and M (16 x channels x tiles each) in about this many bytes. Half a
# 1 MiB L2 (512 KiB) when OpenBLAS ran the 16 GEMMs; MKL runs wider GEMMs (more tiles) better
# than it loses to V and M spilling out of L2: Xeon, 2 MiB L2, 2 threads, ms at 512 KiB / 4
# MiB: forward 64 channels on 56x56 6.7-7.0 / 5.5-5.7, 128 on 112x112 (batch 2) 19.4-20.4 /
# 15.9-16.1; input gradient 7.3-7.9 / 5.8-6.0 and 21.4 / 18.3-18.7; 256 on 14x14 (a whole
# image already) unchanged.
_WINOGRAD_BYTES = 4 << 20
# Fewer tiles than this in an image: whole images per work item instead, so each chunk's 16
# GEMMs have about this many columns and each pass over U (16 C_out x C_in matrices, 16 MiB
# for 512 channels) serves them all (measured, 2 threads: 512x512 on 7x7, batch 8, 24 ->
# 11.3 ms; 16 and 32 channels on 8x8 and 4x4, batch 32, 0.35 -> 0.19 ms; 128 tiles was worse
# for 256 channels on 14x14, 7 -> 10 ms, its V and M then far past L2). (7x7 planes have run
# as tiles since, faster still: see _WINOGRAD_MIN_PLANE.)
_WINOGRAD_MIN_TILES = 64
# Tiles per chunk of the weight gradient, whose GEMMs run over tiles. It beats im2col on every
# plane measured (2 threads, ms, Winograd vs im2col: 128x112x112 batch 2 29 vs 43, 16x224x224
# 4.2 vs 5.0, 8->32 160x160 2.4 vs 2.4, 256->64 100x100 25.7 vs 24.7; earlier 64x56x56 batch
# 8 9.3 vs 16.6, 256x14x14 11.6 vs 13.1). (Large planes once lost, 62 vs 48 ms, before the
# transform planes were spaced apart: see _plane_stride.)
# 256: with MKL's GEMM adding into the partial sums (no product matrix added after each GEMM),
# shorter chunks keep V and U nearer L2 and win (engine call, 2 threads, in-process A/B,
# medians, 512 -> 256 tiles: 64 channels on 56x56 4.21 -> 4.02 ms, VGG's 128 on 112x112 15.5
# -> 14.8). (512 while each GEMM wrote a product matrix to add: 64 on 56x56 7.3-7.4 ms against
# 7.8-7.9 at 256, VGG's 23.2-23.5 against 23.6-24.0.)
_WINOGRAD_WGRAD_TILES = 256
# Planes of few tiles instead take whole images per chunk, up to about this many tiles: the
# 16 tiles of a 7x7 plane made 16-deep GEMMs (measured, one thread, batch 8: 512x512 on 7x7
# 40 -> 23 ms; 256x256 on 14x14, 49 tiles, 17.5 -> 15.5 ms at 98 tiles a chunk but 19.5 ms
# at 245, its transform planes then far larger than L2).
_WINOGRAD_WGRAD_IMAGE_TILES = 256  # 128 with OpenBLAS. With MKL, engine calls, 2 threads, ms:
# 256 channels on 14x14 8.6-8.7 -> 7.5-7.6 (batch 8), 22.8-23.0 -> 21.6-21.7 (batch 32); 512
# on 14x14 35-41 -> 29-34; 128 on 12x12 1.69-1.72 -> 1.54-1.59


# The 16 transform planes of a chunk (V, M, the weight gradient's U) are written or read as 16
# streams, the same tiles' elements from each. Planes a multiple of 4 KiB apart put all 16 in the
# same L1 set (8 ways): vgg's 128 channels x 56 tiles are 28 KiB, and its input transform took
# 46 ns a tile instead of 5. Planes an odd number of 64-byte lines apart fall in 16 sets.
@njit(cache=True, nogil=True)
def _plane_stride(n, itemsize):
    """Elements from one transform plane of ``n`` elements to the next: ``n`` rounded up to
    an odd number of 64-byte cache lines."""
    per_line = 64 // itemsize
    lines = (n + per_line - 1) // per_line
    return (lines | 1) * per_line


@njit(cache=True, nogil=True)
def _plane(buf, k, stride, rows, cols):
    """Plane k of a flat transform buffer as a C-contiguous (rows, cols) matrix."""
    return buf[k * stride:k * stride + rows * cols].reshape(rows, cols)


@njit(cache=True, nogil=True, inline="always")
def _g_row(a, g0, g1, g2):
    """Row a of G (see _winograd_filter_kernel) times the column (g0, g1, g2), in float64."""
    g0, g1, g2 = float(g0), float(g1), float(g2)
    if a == 0:
        return g0
    if a == 1:
        return 0.5 * (g0 + g1 + g2)
    if a == 2:
        return 0.5 * (g0 - g1 + g2)
    return g2


@njit(cache=True, nogil=True, inline="always")
def _gather_taps(src, o, n_out, n_in, ls, transposed, g):
    """g[m*ls + i] = tap m (of 9) of filter (o, i): w4[o, i] as ``src`` (w4 flattened), or
    with ``transposed`` w4[i, o] flipped (tap m is its tap 8 - m)."""
    step = -1 if transposed else 1
    for i in range(n_in):
        at = ((i * n_out + o) * 9 + 8) if transposed else (o * n_in + i) * 9
        for m in range(9):
            g[m * ls + i] = src[at + step * m]


@parallel_kernel
def _winograd_filter_kernel(w4, U, transposed):
    """U[:, o, i] = G g G^T flattened (16,), G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2],
    [0, 0, 1]], in float64 and rounded once; g = w4[o, i], or with ``transposed`` w4[i, o]
    flipped (the filter of the layer's input gradient, see conv2d_backward_input)."""
    n_out, n_in = U.shape[1], U.shape[2]
    src = w4.reshape(-1)
    # Per output channel, its n_in filters' 9 taps are gathered into 9 rows (a scalar copy,
    # flipped and transposed on the way where asked), then the transform runs along the rows
    # in vectors, and each of U's 16 rows for the channel is written as one run. Per (o, i)
    # in scalar float64 code (with a flip-and-transpose copy by numpy before it for the input
    # gradient) it took 0.76 ms (+0.82) for 256 x 256 filters: a fifth of the conv's forward
    # on 14x14, batch 8.
    ls = _plane_stride(n_in, 8)
    for o in prange(n_out):
        g = np.empty(9 * ls, dtype=w4.dtype)
        _gather_taps(src, o, n_out, n_in, ls, transposed, g)
        for a in range(4):  # row a of t = G g, then U[4a + b] = (t G^T)[a, b]
            out0, out1, out2, out3 = U[4 * a, o], U[4 * a + 1, o], U[4 * a + 2, o], \
                U[4 * a + 3, o]
            for i in range(n_in):  # a is fixed here: LLVM unswitches _g_row's branches
                t0 = _g_row(a, g[i], g[3 * ls + i], g[6 * ls + i])
                t1 = _g_row(a, g[ls + i], g[4 * ls + i], g[7 * ls + i])
                t2 = _g_row(a, g[2 * ls + i], g[5 * ls + i], g[8 * ls + i])
                out0[i] = t0
                out1[i] = 0.5 * (t0 + t1 + t2)
                out2[i] = 0.5 * (t0 - t1 + t2)
                out3[i] = t2


_G4 = np.array(WINOGRAD4_G)


@njit(cache=True, nogil=True, inline="always")
def _g4_row(a, g0, g1, g2):
    """Row a of F(4x4, 3x3)'s G (``WINOGRAD4_G``) times the column (g0, g1, g2), in float64."""
    return _G4[a, 0] * float(g0) + _G4[a, 1] * float(g1) + _G4[a, 2] * float(g2)


@parallel_kernel
def _winograd4_filter_kernel(w4, U, transposed):
    """U[:, o, i] = G g G^T flattened (36,) for F(4x4, 3x3), as ``_winograd_filter_kernel``
    (the same gather into 9 tap rows, the same flip for ``transposed``)."""
    n_out, n_in = U.shape[1], U.shape[2]
    src = w4.reshape(-1)
    ls = _plane_stride(n_in, 8)
    for o in prange(n_out):
        g = np.empty(9 * ls, dtype=w4.dtype)
        _gather_taps(src, o, n_out, n_in, ls, transposed, g)
        for a in range(6):  # row a of t = G g, then U[6a + b] = (t G^T)[a, b]
            for i in range(n_in):
                t0 = _g4_row(a, g[i], g[3 * ls + i], g[6 * ls + i])
                t1 = _g4_row(a, g[ls + i], g[4 * ls + i], g[7 * ls + i])
                t2 = _g4_row(a, g[2 * ls + i], g[5 * ls + i], g[8 * ls + i])
                for b in range(6):
                    U[6 * a + b, o, i] = _g4_row(b, t0, t1, t2)


def _winograd_filter(w: np.ndarray, transposed: bool = False, m: int = 2) -> np.ndarray:
    """w (C_out, C_in, 3, 3) -> U ((m+2)^2, C_out, C_in) = G w G^T for F(m x m, 3x3), m = 2
    or 4; ``transposed``: U (.., C_in, C_out) for w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3),
    the input gradient's filters."""
    n_out, n_in = (w.shape[1], w.shape[0]) if transposed else w.shape[:2]
    U = np.empty(((m + 2) ** 2, n_out, n_in), dtype=w.dtype)
    kernel = _winograd_filter_kernel if m == 2 else _winograd4_filter_kernel
    with parallel_region(n_out):
        kernel(np.ascontiguousarray(w), U, transposed)
    return U


@njit(cache=True, nogil=True, inline="always")
def _row_at(c, ih, h, w):
    """Flat offset of row ih of channel c in a (C, h, w) array; -1 outside it."""
    return (c * h + ih) * w if 0 <= ih < h else -1


@njit(cache=True, nogil=True)
def _winograd_input(x3, vf, stride, tiles, top, left, dh, th0, th1, tw_n, t_off=0, m=2):
    """Plane k of vf (element c*tiles + t at k*stride + c*tiles + t, see ``_plane_stride``)
    = element k of B^T d B for tile t = t_off + (th - th0)*tw_n + tw of tile rows [th0, th1)
    of F(m x m, 3x3), m = 2 (16 planes) or 4 (36); d is the (m+2)x(m+2) patch of input rows
    top + dh*(m*th + a), columns left + m*tw + b, zeros outside the input. (A dilated layer's
    columns come split into phases: see ``_column_phases``.) Whole vectors of tiles at a
    time, read straight from the input: see ``winograd_input_band``, ``winograd4_input_band``."""
    c_in, h, w = x3.shape
    xf = x3.reshape(-1)
    for c in range(c_in):
        for th in range(th0, th1):
            ih = top + dh * m * th
            first = c * tiles + t_off + (th - th0) * tw_n
            if m == 2:
                winograd_input_band(xf, _row_at(c, ih, h, w), _row_at(c, ih + dh, h, w),
                                    _row_at(c, ih + 2 * dh, h, w), _row_at(c, ih + 3 * dh, h, w),
                                    left, w, vf, first, stride, tw_n)
            else:
                winograd4_input_band(xf, _row_at(c, ih, h, w), _row_at(c, ih + dh, h, w),
                                     _row_at(c, ih + 2 * dh, h, w),
                                     _row_at(c, ih + 3 * dh, h, w),
                                     _row_at(c, ih + 4 * dh, h, w),
                                     _row_at(c, ih + 5 * dh, h, w), left, w, vf, first, stride,
                                     tw_n)


@njit(cache=True, nogil=True)
def _winograd_output(mf, stride, tiles, y3, b1, ph, dh, wv, th0, th1, tw_n, t_off=0, m=2):
    """Tile rows [th0, th1) of row phase ph = b1 + A^T M A, M's planes in mf as in
    ``_winograd_input`` (from tile t_off, m x m tiles): tile (th, tw) holds outputs
    (ph + dh*u, v) for u in [m*th, m*th + m) with ph + dh*u < Ho, and v in [m*tw, m*tw + m)
    below wv (a dilated layer's column phase is an (Ho, Wo/dW) plane of its own: see
    ``_column_phases``). See ``winograd_output_band``, ``winograd4_output_band``."""
    c_out, ho, wo = y3.shape
    yf = y3.reshape(-1)
    for co in range(c_out):
        for th in range(th0, th1):
            # A last tile's rows past the plane: _row_at gives -1, not written.
            oh = ph + dh * m * th
            first = co * tiles + t_off + (th - th0) * tw_n
            if m == 2:
                winograd_output_band(mf, first, stride, yf, _row_at(co, oh, ho, wo),
                                     _row_at(co, oh + dh, ho, wo), wv, b1[co], tw_n)
            else:
                winograd4_output_band(mf, first, stride, yf, _row_at(co, oh, ho, wo),
                                      _row_at(co, oh + dh, ho, wo),
                                      _row_at(co, oh + 2 * dh, ho, wo),
                                      _row_at(co, oh + 3 * dh, ho, wo), wv, b1[co], tw_n)


@njit(cache=True, nogil=True)
def _phase(ho, wo, dh, dw, phase, m):
    """Phase ``phase`` of a dilated output: (ph, pw, hu, wv, tile rows, tile columns) for m x m
    output tiles. Outputs (ph + dh*u, pw + dw*v) read input rows ph - pt + dh*(u + i): an
    undilated 3x3 conv on that sub-lattice, which Winograd tiles as usual."""
    ph, pw = phase // dw, phase % dw
    hu, wv = max(0, (ho - ph + dh - 1) // dh), max(0, (wo - pw + dw - 1) // dw)
    return ph, pw, hu, wv, (hu + m - 1) // m, (wv + m - 1) // m


@njit(cache=True, nogil=True)
def _image_tiles(ho, wo, dh, dw, m):
    """m x m output tiles of one (Ho, Wo) output image, over all its dilation phases."""
    tiles = 0
    for phase in range(dh * dw):
        _, _, _, _, th_n, tw_n = _phase(ho, wo, dh, dw, phase, m)
        tiles += th_n * tw_n
    return tiles


@njit(cache=True, nogil=True, inline="always")
def _column_phase(pw, pl, dw):
    """(input column phase, first column in it) that output column phase pw reads: input
    columns pw - pl + dW*q, which are phase (pw - pl) mod dW (see ``_column_phases``)."""
    left = pw - pl
    r = left % dw
    return r, (left - r) // dw


@parallel_kernel
def _winograd_forward(xs5, U, b1, ys5, ho, wo, pt, pl, dh, dw, rows, per):
    """ys5 = b1 + xs5 convolved with the 3x3 filters whose transform is U (16, C_out, C_in),
    at padding (pt, pl) (any sign: a negative pad crops) and dilation (dh, dw), for an
    (Ho, Wo) output; xs5 (N, dW, C_in, H, W/dW) and ys5 (N, dW, C_out, Ho, Wo/dW) hold the
    input's and output's column phases (``_column_phases``). Work items: (image, dilation
    phase, chunk of ``rows`` tile rows), or with ``per`` > 1 groups of ``per`` whole images
    (small planes). F(2x2, 3x3) or F(4x4, 3x3), as U has 16 or 36 planes."""
    n_img, c_in, c_out = xs5.shape[0], xs5.shape[2], ys5.shape[2]
    phases = dh * dw
    planes = U.shape[0]
    m = 2 if planes == 16 else 4
    if per > 1:
        tiles_img = _image_tiles(ho, wo, dh, dw, m)
        for grp in prange((n_img + per - 1) // per):
            n0, n1 = grp * per, min(n_img, grp * per + per)
            tiles = (n1 - n0) * tiles_img
            _winograd_images(xs5, U, b1, ys5, ho, wo, pt, pl, dh, dw, n0, n1, tiles)
        return
    chunks = ((-(-ho // dh) + m - 1) // m + rows - 1) // rows  # phase 0 has the most tile rows
    for item in prange(n_img * phases * chunks):
        n, rest = item // (phases * chunks), item % (phases * chunks)
        ph, pw, hu, wv, th_n, tw_n = _phase(ho, wo, dh, dw, rest // chunks, m)
        th0 = (rest % chunks) * rows
        if th0 >= th_n or tw_n == 0:
            continue
        th1 = min(th_n, th0 + rows)
        tiles = (th1 - th0) * tw_n
        vs, ms = _plane_stride(c_in * tiles, xs5.itemsize), _plane_stride(c_out * tiles,
                                                                          xs5.itemsize)
        V = np.empty(planes * vs, dtype=xs5.dtype)
        M = np.empty(planes * ms, dtype=xs5.dtype)
        r, left = _column_phase(pw, pl, dw)
        _winograd_input(xs5[n, r], V, vs, tiles, ph - pt, left, dh, th0, th1, tw_n, 0, m)
        for k in range(planes):
            _blas.gemm(U[k], _plane(V, k, vs, c_in, tiles), _plane(M, k, ms, c_out, tiles))
        _winograd_output(M, ms, tiles, ys5[n, pw], b1, ph, dh, wv, th0, th1, tw_n, 0, m)


@njit(cache=True, nogil=True)
def _winograd_images(xs5, U, b1, ys5, ho, wo, pt, pl, dh, dw, n0, n1, tiles):
    """Images [n0, n1) as one chunk of ``tiles`` tiles, every phase and tile row: one set of
    GEMMs (one per transform plane) for them all."""
    c_in, c_out = xs5.shape[2], ys5.shape[2]
    planes = U.shape[0]
    m = 2 if planes == 16 else 4
    vs, ms = _plane_stride(c_in * tiles, xs5.itemsize), _plane_stride(c_out * tiles,
                                                                      xs5.itemsize)
    V = np.empty(planes * vs, dtype=xs5.dtype)
    M = np.empty(planes * ms, dtype=xs5.dtype)
    t_off = 0
    for n in range(n0, n1):
        for phase in range(dh * dw):
            ph, pw, hu, wv, th_n, tw_n = _phase(ho, wo, dh, dw, phase, m)
            if tw_n > 0:
                r, left = _column_phase(pw, pl, dw)
                _winograd_input(xs5[n, r], V, vs, tiles, ph - pt, left, dh, 0, th_n, tw_n,
                                t_off, m)
                t_off += th_n * tw_n
    for k in range(planes):
        _blas.gemm(U[k], _plane(V, k, vs, c_in, tiles), _plane(M, k, ms, c_out, tiles))
    t_off = 0
    for n in range(n0, n1):
        for phase in range(dh * dw):
            ph, pw, hu, wv, th_n, tw_n = _phase(ho, wo, dh, dw, phase, m)
            if tw_n > 0:
                _winograd_output(M, ms, tiles, ys5[n, pw], b1, ph, dh, wv, 0, th_n, tw_n,
                                 t_off, m)
                t_off += th_n * tw_n


# A dilated layer's column phases, each an undilated plane for the transforms (which read and
# write unit-step columns only): split once per pass, and the output merged back.
@parallel_kernel
def _split_columns(a4, out5):
    """out5 (N, d, C, H, Wp) = the column phases of a4 (N, C, H, W): out5[n, r, c, h, q] =
    a4[n, c, h, r + d*q], zero past the row."""
    n_img, c, h, w = a4.shape
    d, wp = out5.shape[1], out5.shape[4]
    src, dst = a4.reshape(-1), out5.reshape(-1)
    plen = c * h * wp  # from one phase to the next
    for item in prange(n_img * c):
        n, ch = item // c, item % c
        for ih in range(h):
            d0 = (n * d * c + ch) * h * wp + ih * wp
            phase_split(src, ((n * c + ch) * h + ih) * w, w, dst[d0:], plen, d)
            for r in range(d):
                filled = (w - r + d - 1) // d
                fill_at(dst, d0 + r * plen + filled, wp - filled, 0)


@parallel_kernel
def _merge_columns(in5, a4):
    """The inverse of ``_split_columns``: a4[n, c, h, r + d*q] = in5[n, r, c, h, q]."""
    n_img, c, h, w = a4.shape
    d, wp = in5.shape[1], in5.shape[4]
    src, dst = in5.reshape(-1), a4.reshape(-1)
    plen = c * h * wp
    for item in prange(n_img * c):
        n, ch = item // c, item % c
        for ih in range(h):
            phase_merge(src[(n * d * c + ch) * h * wp + ih * wp:], plen, dst,
                        ((n * c + ch) * h + ih) * w, w, d)


def _column_phases(a: np.ndarray, d: int) -> np.ndarray:
    """(N, d, C, H, ceil(W/d)): the columns of a (N, C, H, W) split into d phases, phase r
    holding columns r, r + d, ... (zero past the row); a view of a when d == 1."""
    if d == 1:
        return a[:, None]
    n, c, h, w = a.shape
    out = np.empty((n, d, c, h, -(-w // d)), dtype=a.dtype)
    with parallel_region(n * c):
        _split_columns(a, out)
    return out


# The weight gradient is Winograd F(3x3, 2x2), the dual of F(2x2, 3x3) (transposition
# principle): gw = G^T [ sum over tiles (A H A^T) . (B^T D B) ] G, H a 2x2 tile of grad_out,
# D the forward's 4x4 input patch, A = [[1, 0], [1, 1], [1, -1], [0, -1]]. The sum over tiles
# is 16 GEMMs (C_out, tiles) @ (tiles, C_in): tiles are the long, inner dimension. Or the dual
# of F(4x4, 3x3): 4x4 grad_out tiles, 6x6 input patches, A^T and G as ``WINOGRAD4_AT`` and
# ``WINOGRAD4_G``, 36 GEMMs over a quarter as many tiles (0.56x the GEMM flops, and 0.56x the
# transformed input per output).
@njit(cache=True, nogil=True)
def _winograd_grad_tiles(gy3, uf, stride, tiles, ph, dh, wv, th0, th1, tw_n, t_off=0, m=2):
    """Plane k of uf (as in ``_winograd_input``) = element k of A H A^T for the m x m
    grad_out tile H of row phase ph (see ``_winograd_output``), zero past the phase's last row
    or column. See ``winograd_grad_band``, ``winograd4_grad_band``."""
    c_out, ho, wo = gy3.shape
    gf = gy3.reshape(-1)
    for co in range(c_out):
        for th in range(th0, th1):
            # A last tile's rows past the plane: _row_at gives -1, read as zeros.
            oh = ph + dh * m * th
            first = co * tiles + t_off + (th - th0) * tw_n
            if m == 2:
                winograd_grad_band(gf, _row_at(co, oh, ho, wo), _row_at(co, oh + dh, ho, wo),
                                   wv, uf, first, stride, tw_n)
            else:
                winograd4_grad_band(gf, _row_at(co, oh, ho, wo), _row_at(co, oh + dh, ho, wo),
                                    _row_at(co, oh + 2 * dh, ho, wo),
                                    _row_at(co, oh + 3 * dh, ho, wo), wv, uf, first, stride,
                                    tw_n)


@parallel_kernel
def _winograd_backward_weight(gys5, xs5, part, ho, wo, pt, pl, dh, dw, rows, per):
    """part (P, (m+2)^2, C_out, C_in): chunk p's sum over its images (a fixed split of the
    batch, so the sum order depends only on P) of the transformed tile products, every
    dilation phase and tile in order, for F(m x m, 3x3)'s dual, m = 2 (16 planes) or 4 (36);
    gys5 and xs5 hold grad_out's (Ho, Wo) and the input's column phases
    (``_column_phases``). The products are taken ``per`` whole images at a time (small
    planes), or else ``rows`` tile rows of one phase at a time."""
    n_img, c_in, c_out = xs5.shape[0], xs5.shape[2], gys5.shape[2]
    chunks_p, planes = part.shape[0], part.shape[1]
    m = 2 if planes == 16 else 4
    tw_max = (-(-wo // dw) + m - 1) // m
    tiles_img = _image_tiles(ho, wo, dh, dw, m)
    tiles_max = max(rows * tw_max, per * tiles_img)
    for p in prange(chunks_p):
        acc = part[p]
        acc[:] = 0
        V = np.empty(planes * _plane_stride(c_in * tiles_max, xs5.itemsize), dtype=xs5.dtype)
        U = np.empty(planes * _plane_stride(c_out * tiles_max, xs5.itemsize), dtype=xs5.dtype)
        n0, n1 = p * n_img // chunks_p, (p + 1) * n_img // chunks_p
        if per > 1:
            for g0 in range(n0, n1, per):
                g1 = min(n1, g0 + per)
                tiles = (g1 - g0) * tiles_img
                vs = _plane_stride(c_in * tiles, xs5.itemsize)
                us = _plane_stride(c_out * tiles, xs5.itemsize)
                t_off = 0
                for n in range(g0, g1):
                    for phase in range(dh * dw):
                        ph, pw, hu, wv, th_n, tw_n = _phase(ho, wo, dh, dw, phase, m)
                        if tw_n == 0:
                            continue
                        r, left = _column_phase(pw, pl, dw)
                        _winograd_input(xs5[n, r], V, vs, tiles, ph - pt, left, dh, 0, th_n,
                                        tw_n, t_off, m)
                        _winograd_grad_tiles(gys5[n, pw], U, us, tiles, ph, dh, wv, 0, th_n,
                                             tw_n, t_off, m)
                        t_off += th_n * tw_n
                _winograd_products(V, U, vs, us, tiles, acc)
            continue
        for n in range(n0, n1):
            for phase in range(dh * dw):
                ph, pw, hu, wv, th_n, tw_n = _phase(ho, wo, dh, dw, phase, m)
                if tw_n == 0:
                    continue
                r, left = _column_phase(pw, pl, dw)
                for th0 in range(0, th_n, rows):
                    th1 = min(th_n, th0 + rows)
                    tiles = (th1 - th0) * tw_n
                    # Planes packed for this chunk's tile count (a chunk may be short): gemm
                    # needs each C-contiguous.
                    vs = _plane_stride(c_in * tiles, xs5.itemsize)
                    us = _plane_stride(c_out * tiles, xs5.itemsize)
                    _winograd_input(xs5[n, r], V, vs, tiles, ph - pt, left, dh, th0, th1, tw_n,
                                    0, m)
                    _winograd_grad_tiles(gys5[n, pw], U, us, tiles, ph, dh, wv, th0, th1,
                                         tw_n, 0, m)
                    _winograd_products(V, U, vs, us, tiles, acc)


@njit(cache=True, nogil=True)
def _winograd_products(V, U, vs, us, tiles, acc):
    """acc[k] += U[k] @ V[k]^T over a chunk's tiles (planes as in ``_winograd_input``)."""
    c_out, c_in = acc.shape[1], acc.shape[2]
    for k in range(acc.shape[0]):
        # The GEMM adds into acc itself (beta = 1): a product matrix added afterwards cost a
        # pass over 16 C_out x C_in matrices per chunk (GEMMs alone, 2 threads, 128 channels,
        # 256 tiles: 279 -> 338 GFLOP/s; 256 channels, 196 tiles: 276 -> 355).
        _blas.gemm(_plane(U, k, us, c_out, tiles), _plane(V, k, vs, c_in, tiles).T, acc[k],
                   accumulate=True)


@parallel_kernel
def _winograd_weight_output(part, gw4):
    """gw4 (C_out, C_in, 3, 3) = G^T M G, M the chunks' sum in chunk order (16 planes:
    F(2x2)'s G; 36: ``WINOGRAD4_G``), in float64."""
    chunks_p, planes, c_out, c_in = part.shape
    s = 4 if planes == 16 else 6
    # The chunks' sums for one output channel are taken a row of part at a time into a local
    # buffer (rows spaced as in _plane_stride), not planes * P loads C_out*C_in apart per
    # (co, ci).
    ls = _plane_stride(c_in, 8)
    for co in prange(c_out):
        m = np.empty(planes)
        t = np.empty((3, s))
        sums = np.zeros(planes * ls)
        for p in range(chunks_p):
            for k in range(planes):
                add_at(sums, k * ls, part[p, k, co], 0, c_in)
        for ci in range(c_in):
            for k in range(planes):
                m[k] = sums[k * ls + ci]
            if s == 4:
                for c in range(4):  # t = G^T m
                    m0, m1, m2, m3 = m[c], m[4 + c], m[8 + c], m[12 + c]
                    t[0, c] = m0 + 0.5 * (m1 + m2)
                    t[1, c] = 0.5 * (m1 - m2)
                    t[2, c] = 0.5 * (m1 + m2) + m3
                for r in range(3):  # gw = t G
                    t0, t1, t2, t3 = t[r, 0], t[r, 1], t[r, 2], t[r, 3]
                    gw4[co, ci, r, 0] = t0 + 0.5 * (t1 + t2)
                    gw4[co, ci, r, 1] = 0.5 * (t1 - t2)
                    gw4[co, ci, r, 2] = 0.5 * (t1 + t2) + t3
                continue
            for r in range(3):
                for c in range(6):
                    acc = 0.0
                    for a in range(6):
                        acc += _G4[a, r] * m[6 * a + c]
                    t[r, c] = acc
            for r in range(3):
                for c in range(3):
                    acc = 0.0
                    for b in range(6):
                        acc += t[r, b] * _G4[b, c]
                    gw4[co, ci, r, c] = acc


# Output planes (per dilation phase) smaller than this in either dimension run as direct
# tiles: a plane of few tiles makes Winograd's 16 GEMMs small and its transforms' edges a large
# share. Measured (2 threads, fwd / grad_input / grad_weight, Winograd vs tiles): 512->512 on
# 7x7, batch 8, 10.2 / 12.1 / 15.4 vs 9.8 / 10.1 / 10.0 ms; 256->256 on 7x7 2.3 / 2.8-5.6 / 3.2
# vs 2.4 / 2.5 / 2.6 ms; 128->128 on 10x10 1.49 / 1.60 / 1.17 vs 1.22 / 1.25 / 1.29 ms; the
# demo's 16->32 on 4x4, batch 45, 0.14 / 0.18 / 0.13 vs 0.10 / 0.15 / 0.11 ms. From 12x12 on
# Winograd wins every pass (128->128: 1.36 / 1.45 / 1.65 vs 1.68 / 1.71 / 1.76 ms; 256->256
# on 14x14: 5.7 / 6.3 / 7.1 vs 8.6 / 8.7 / 8.9 ms).
_WINOGRAD_MIN_PLANE = 12


def _is_winograd(params: Conv2dParams, weight_shape, out_hw) -> bool:
    """3x3, stride 1 (any dilation), one group, enough channels for the GEMMs to pay, and
    output planes (``out_hw``, per dilation phase) of enough tiles."""
    c_out, cin_g, kh, kw = weight_shape
    (dh, dw), (ho, wo) = params.dilation, out_hw
    return (kh, kw) == (3, 3) and params.stride == (1, 1) and \
        params.groups == 1 and cin_g >= 8 and c_out >= 8 and \
        min(-(-ho // dh), -(-wo // dw)) >= _WINOGRAD_MIN_PLANE


def _winograd_rows(c_in: int, c_out: int, out_hw, dilation, itemsize: int, m: int = 2) -> int:
    """Tile rows (of m x m tiles) per work item: V and M within _WINOGRAD_BYTES."""
    th_n = (-(-out_hw[0] // dilation[0]) + m - 1) // m
    tw_n = (-(-out_hw[1] // dilation[1]) + m - 1) // m
    tiles = _WINOGRAD_BYTES // ((m + 2) ** 2 * (c_in + c_out) * itemsize)
    return max(1, min(th_n, tiles // tw_n))


def _winograd(x: np.ndarray, U: np.ndarray, bias: np.ndarray, y: np.ndarray, pt: int,
              pl: int, dilation) -> None:
    n, c_in = x.shape[:2]
    c_out, ho, wo = y.shape[1:]
    dh, dw = dilation
    m = 2 if U.shape[0] == 16 else 4
    rows = _winograd_rows(c_in, c_out, (ho, wo), dilation, x.itemsize, m)
    tiles_img = _image_tiles(ho, wo, dh, dw, m)
    per = 1
    if tiles_img < _WINOGRAD_MIN_TILES:
        per = min(-(-_WINOGRAD_MIN_TILES // tiles_img), -(-n // engine_threads()))
    xs = _column_phases(x, dw)
    ys = y[:, None] if dw == 1 else np.empty((n, dw, c_out, ho, -(-wo // dw)), dtype=y.dtype)
    if per > 1:
        with parallel_region(-(-n // per)):
            _winograd_forward(xs, U, bias, ys, ho, wo, pt, pl, dh, dw, rows, per)
    else:
        with parallel_region(n * dh * dw * -(-((-(-ho // dh) + m - 1) // m) // rows)):
            _winograd_forward(xs, U, bias, ys, ho, wo, pt, pl, dh, dw, rows, 1)
    if dw > 1:
        with parallel_region(n * c_out):
            _merge_columns(ys, y)


def _geometry(params: Conv2dParams, kernel_hw, out_hw):
    top, _, left, _ = params.padding
    return (kernel_hw[0], kernel_hw[1], params.stride[0], params.stride[1], top, left,
            params.dilation[0], params.dilation[1], out_hw[0], out_hw[1])


def _depthwise_geometry(params: Conv2dParams, kernel_hw):
    top, _, left, _ = params.padding
    return (kernel_hw[0], kernel_hw[1], params.stride[0], params.stride[1], top, left,
            params.dilation[0], params.dilation[1])


def _is_flat(stride, in_w: int, out_w: int) -> bool:
    """Whether a depthwise conv runs on flat planes: stride 1, output as wide as the input."""
    return tuple(stride) == (1, 1) and out_w == in_w


def _depthwise(x4, w3, b1, y4, kh, kw, sh, sw, pt, pl, dh, dw):
    """y4 = the depthwise conv of x4 (N, C_in, H, W) with w3 (C_out, kH, kW) plus b1: flat
    planes for stride 1 with the output as wide as the input, else padded planes."""
    n, c_in = x4.shape[:2]
    with parallel_region(n * c_in) as threads:
        if _is_flat((sh, sw), x4.shape[3], y4.shape[3]):
            _depthwise_flat(x4, w3, b1, y4, kh, kw, pt, pl, dh, dw, 8 * threads)
        else:
            _depthwise_forward(x4, w3, b1, y4, kh, kw, sh, sw, pt, pl, dh, dw)


def _is_direct(params: Conv2dParams, kernel_hw, in_hw, out_hw) -> bool:
    """1x1, stride 1, no padding, and the output as large as the input: the input is its own
    im2col matrix. (conv_transpose2d's output_padding can make the input of its gradient
    passes a row or column larger than the output; those take the im2col path.)"""
    return tuple(kernel_hw) == (1, 1) and params.stride == (1, 1) and \
        not any(params.padding) and tuple(in_hw) == tuple(out_hw)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


@float32_for_half
def conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   params: Conv2dParams) -> torch.Tensor:
    """x (N, C_in, H, W), weight (C_out, C_in/G, kH, kW), bias (C_out,) -> (N, C_out, Ho, Wo)."""
    n, c_in, h, w = x.shape
    c_out, cin_g, kh, kw = weight.shape
    ho, wo = params.output_hw((h, w), (kh, kw))
    y = _runtime.empty((n, c_out, ho, wo), x.dtype)
    if y.numel() == 0:
        return y
    xn, wn, yn = _np(x), _np(weight), y.numpy()
    b1 = _np(bias) if bias is not None else np.zeros(c_out, dtype=xn.dtype)
    if cin_g == 1:
        _depthwise(xn, wn.reshape(c_out, kh, kw), b1, yn, *_depthwise_geometry(params, (kh, kw)))
        return y
    g = params.groups
    direct = _is_direct(params, (kh, kw), (h, w), (ho, wo))

    def winograd(m=2):
        top, _, left, _ = params.padding
        _winograd(xn, _winograd_filter(wn, m=m), b1, yn, top, left, params.dilation)

    def tiles():
        _tile_conv(xn, wn, b1, yn, params)

    def gemm():  # im2col (or the 1x1 input as is) and BLAS
        b2 = b1.reshape(g, -1)
        per = _pointwise_per(params, (kh, kw), (h, w), (ho, wo), n)
        if per > 1:
            _pointwise_gemms(xn.reshape(n, g, cin_g, h * w), wn.reshape(g, c_out // g, -1),
                             b2, yn.reshape(n, g, c_out // g, ho * wo), bias is not None,
                             False, per)
            return
        with parallel_region(n * g):
            _forward(xn.reshape(n, g, cin_g, h, w), wn.reshape(g, c_out // g, -1), b2,
                     yn.reshape(n, g, c_out // g, ho * wo), bias is not None, direct,
                     *_geometry(params, (kh, kw), (ho, wo)))

    # The rule's choice first (see _autotune): Winograd where it applies; tiles unless too few
    # output channels a group fill their vectors, or a 1x1 layer has large weights.
    candidates = {}
    if _is_winograd(params, weight.shape, (ho, wo)):
        candidates["winograd"] = winograd
        candidates["winograd4"] = functools.partial(winograd, 4)
    tiles_ok = _tiles_fill_lanes(c_out // g, xn.dtype, FORWARD_MIN_FILL)
    if not tiles_ok or (direct and cin_g * (c_out // g) * xn.itemsize >= _DIRECT_GEMM_BYTES):
        candidates["gemm"] = gemm
    if tiles_ok:
        candidates["tiles"] = tiles
    if direct:  # the GEMM on the input as is: the other choice for 1x1 layers
        candidates.setdefault("gemm", gemm)
    _autotune.run(_choice_key("conv2d_forward", x, weight, params), candidates,
                2 * y.numel() * cin_g * kh * kw)
    return y


def _choice_key(pass_name: str, a: torch.Tensor, b: torch.Tensor, params: Conv2dParams):
    """What a pass's algorithm choice is measured for (see _autotune)."""
    return (pass_name, tuple(a.shape), tuple(b.shape), params, a.dtype, engine_threads())


@float32_for_half
def conv2d_backward_input(grad_out: torch.Tensor, weight: torch.Tensor, input_shape,
                          params: Conv2dParams) -> torch.Tensor:
    """grad_out (N, C_out, Ho, Wo), weight (C_out, C_in/G, kH, kW) -> grad_input (N, C_in, H, W)."""
    n, c_in, h, w = input_shape
    c_out, cin_g, kh, kw = weight.shape
    g = params.groups
    _, _, ho, wo = grad_out.shape
    gx = _runtime.empty((n, c_in, h, w), grad_out.dtype)
    if gx.numel() == 0:
        return gx
    gyn, wn, gxn = _np(grad_out), _np(weight), gx.numpy()
    if cin_g == 1:
        top, _, left, _ = params.padding
        dh, dw = params.dilation
        if c_out == c_in and params.stride == (1, 1) and top <= (kh - 1) * dh \
                and left <= (kw - 1) * dw:
            # Stride 1, one output channel per input one: the input gradient is a depthwise
            # conv of grad_out with each filter flipped, at padding (k-1)*dilation - pad, so
            # the forward kernel computes it, three taps a pass over the plane, where the
            # scatter below makes a read-modify-write pass per tap (256 channels, 28x28,
            # batch 8: 1.2-1.4 -> 0.8-0.9 ms).
            flipped = np.ascontiguousarray(wn.reshape(c_out, kh, kw)[:, ::-1, ::-1])
            _depthwise(gyn, flipped, np.zeros(c_in, flipped.dtype), gxn, kh, kw, 1, 1,
                       (kh - 1) * dh - top, (kw - 1) * dw - left, dh, dw)
            return gx
        with parallel_region(n * c_in):
            _depthwise_backward_input(gyn, wn.reshape(c_out, kh, kw), gxn,
                                      *_depthwise_geometry(params, (kh, kw)))
        return gx
    direct = _is_direct(params, (kh, kw), (h, w), (ho, wo))

    def winograd(m=2):
        # The input gradient of a 3x3 stride-1 conv is a 3x3 stride-1 conv of grad_out with
        # the filters flipped and transposed, at padding 2*dilation - pad.
        top, _, left, _ = params.padding
        dh, dw = params.dilation
        _winograd(gyn, _winograd_filter(wn, transposed=True, m=m), np.zeros(c_in, wn.dtype),
                  gxn, 2 * dh - top, 2 * dw - left, params.dilation)

    def tiles():  # one stride-1 conv per input phase (see _input_grad_tiles)
        _input_grad_tiles(gyn, wn, gxn, params)

    def pixels():  # pixel tiles, phase by phase (see _pixel_phases)
        _input_grad_pixels(gyn, wn, gxn, params)

    def gemm():
        per = _pointwise_per(params, (kh, kw), (h, w), (ho, wo), n)
        if per > 1:
            _pointwise_gemms(gyn.reshape(n, g, c_out // g, ho * wo),
                             wn.reshape(g, c_out // g, -1), np.zeros((g, cin_g), dtype=gxn.dtype),
                             gxn.reshape(n, g, cin_g, h * w), False, True, per)
            return
        with parallel_region(n * g):
            _backward_input(gyn.reshape(n, g, c_out // g, ho * wo), wn.reshape(g, c_out // g, -1),
                            gxn.reshape(n, g, cin_g, h, w), direct,
                            *_geometry(params, (kh, kw), (ho, wo)))

    # The rule's choice first: Winograd where it applies; tiles where the input channels of a
    # group fill their vectors, except 1x1 layers read as they are, or strided 1x1 ones: for
    # those BLAS on the input as is measured faster (2048 -> 512 on 7x7: 5.0 ms against 6.0),
    # and tiles are only the alternative for the read-as-is ones. One-group layers with too
    # few input channels for the tiles: pixel tiles, BLAS the alternative; BLAS first where
    # the pixel tiles would make more than _PIXEL_MAX_WASTE times the layer's multiply-adds
    # (small grad_out planes padded wide), or the layer is 1x1 and read as it is.
    candidates = {}
    if _is_winograd(params, weight.shape, (ho, wo)):
        candidates["winograd"] = winograd
        candidates["winograd4"] = functools.partial(winograd, 4)
    tiles_ok = _tiles_fill_lanes(cin_g, gxn.dtype, INPUT_GRAD_MIN_FILL)
    pixels_ok = g == 1 and not tiles_ok
    if pixels_ok and not direct and _pixel_waste(n, c_out, c_in, (kh, kw), (h, w), (ho, wo),
                                                 params) <= _PIXEL_MAX_WASTE:
        candidates["pixels"] = pixels
    if tiles_ok and not direct and (params.stride == (1, 1) or (kh, kw) != (1, 1)):
        candidates["tiles"] = tiles
    else:
        candidates["gemm"] = gemm
    if tiles_ok and direct:
        candidates["tiles"] = tiles
    if pixels_ok:
        candidates.setdefault("pixels", pixels)
    if g == 1 and params.stride != (1, 1) and (kh, kw) != (1, 1) and tiles_ok:
        candidates["phase-gemm"] = lambda: _input_grad_phase_gemm(gyn, wn, gxn, params)
    _autotune.run(_choice_key("conv2d_backward_input", grad_out, weight, params), candidates,
                2 * grad_out.numel() * cin_g * kh * kw)
    return gx


@float32_for_half
def conv2d_backward_weight(grad_out: torch.Tensor, x: torch.Tensor, weight_shape,
                           params: Conv2dParams) -> torch.Tensor:
    """grad_out (N, C_out, Ho, Wo), x (N, C_in, H, W) -> grad_weight (C_out, C_in/G, kH, kW)."""
    n, c_in, h, w = x.shape
    c_out, cin_g, kh, kw = weight_shape
    g = params.groups
    _, _, ho, wo = grad_out.shape
    gw = _runtime.empty(tuple(weight_shape), x.dtype)
    if n == 0:
        return gw.zero_()
    xn, gyn, gwn = _np(x), _np(grad_out), gw.numpy()
    if cin_g == 1:
        geometry = _depthwise_geometry(params, (kh, kw))
        with parallel_region(c_out):
            if _is_flat(params.stride, w, wo):
                _depthwise_flat_weight(gyn, xn, gwn.reshape(c_out, kh, kw), kh, kw,
                                       *geometry[4:])
            else:
                _depthwise_backward_weight(gyn, xn, gwn.reshape(c_out, kh, kw), *geometry)
        return gw
    gw3 = gwn.reshape(g, c_out // g, -1)

    def winograd(m=2):
        top, _, left, _ = params.padding
        dh, dw = params.dilation
        gys, xs = _column_phases(gyn, dw), _column_phases(xn, dw)
        chunks = min(n, engine_threads())
        part = np.empty((chunks, (m + 2) ** 2, c_out, c_in), dtype=xn.dtype)
        with parallel_region(chunks):
            # Tiles are the GEMMs' inner dimension here, and each chunk's products are added
            # into the partial sums: long chunks amortise that (not the L2 budget above).
            # F(4x4)'s budgets are in tiles of F(2x2)'s transformed size (16 / 36 as many).
            budget, image_budget = _WINOGRAD_WGRAD_TILES, _WINOGRAD_WGRAD_IMAGE_TILES
            if m == 4:
                budget, image_budget = budget * 16 // 36, image_budget * 16 // 36
            tw_n = (-(-wo // dw) + m - 1) // m  # tile columns of the widest dilation phase
            rows = max(1, min((-(-ho // dh) + m - 1) // m, budget // tw_n))
            # Small planes: whole images per chunk (see _WINOGRAD_WGRAD_IMAGE_TILES).
            per = max(1, min(-(-n // chunks), image_budget // _image_tiles(ho, wo, dh, dw, m)))
            _winograd_backward_weight(gys, xs, part, ho, wo, top, left, dh, dw, rows, per)
        with parallel_region(c_out):
            _winograd_weight_output(part, gwn)

    def tiles():
        _weight_grad_tiles(gyn, xn, gwn, params)

    def gemm():
        if _pointwise_per(params, (kh, kw), (h, w), (ho, wo), max(n, 2)) > 1:
            # Small 1x1 planes: the images' pixels side by side as one deep GEMM per block of
            # output channels (see _pointwise_weight_rows). A batch of one too: _backward_weight
            # would transpose its (C_in, C_out) sum element by element (512 -> 2048 on 7x7:
            # 3.8 ms against 0.6).
            gy4 = gyn.reshape(n, g, c_out // g, ho * wo)
            x4 = xn.reshape(n, g, cin_g, h * w)
            blocks = max(1, min(-(-engine_threads() // g), c_out // g // 16))
            per = max(1, _WEIGHT_GEMM_DEPTH // (ho * wo))
            for n0 in range(0, n, per):
                with parallel_region(g * max(blocks, min(per, n - n0))):
                    _pointwise_weight_rows(gy4, x4, gw3, n0, min(per, n - n0), blocks, n0 == 0)
            return
        # Enough chunks to keep every thread busy; fixed for a given thread count.
        chunks = min(n, -(-engine_threads() // g))
        part = gw3[None] if chunks == 1 else np.empty((chunks,) + gw3.shape, dtype=gw3.dtype)
        with parallel_region(chunks * g):
            _backward_weight(gyn.reshape(n, g, c_out // g, ho * wo),
                             xn.reshape(n, g, cin_g, h, w), part,
                             _is_direct(params, (kh, kw), (h, w), (ho, wo)),
                             *_geometry(params, (kh, kw), (ho, wo)))
        if chunks > 1:
            with parallel_region(g):
                _sum_chunks(part, gw3)

    # The rule's choice first: Winograd where it applies, else tiles (not for 1x1 layers or
    # column dilation, nor too few output channels a group), else im2col and BLAS. BLAS is
    # always a candidate: with MKL's GEMM it beat the tiles on some layers (Xeon, AVX-512, 2
    # threads, batch 8, ms, tiles / im2col + MKL: ResNet's stem 12.4 / 10.3, 3x3 stride 2 on
    # 128 channels 12.4 / 9.9; but 256->256 on 14x14 9.9 / 11.6, LeNet's 5x5 0.25 / 0.35).
    candidates = {}
    if _is_winograd(params, weight_shape, (ho, wo)):
        candidates["winograd"] = winograd
        candidates["winograd4"] = functools.partial(winograd, 4)
    if (kh, kw) != (1, 1) and params.dilation[1] == 1 \
            and _tiles_fill_lanes(c_out // g, gwn.dtype, WEIGHT_GRAD_MIN_FILL):
        candidates["tiles"] = tiles
    candidates["gemm"] = gemm
    _autotune.run(_choice_key("conv2d_backward_weight", grad_out, x, params), candidates,
                2 * grad_out.numel() * cin_g * kh * kw)
    return gw


@float32_for_half
def conv2d_backward_bias(grad_out: torch.Tensor) -> torch.Tensor:
    """grad_out (N, C_out, Ho, Wo) -> grad_bias (C_out,)."""
    n, c_out, ho, wo = grad_out.shape
    gb = _runtime.empty(c_out, grad_out.dtype)
    with parallel_region(c_out):
        _backward_bias(_np(grad_out).reshape(n, c_out, ho * wo), gb.numpy())
    return gb
