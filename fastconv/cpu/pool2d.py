"""max_pool2d and avg_pool2d on the CPU: Numba kernels, forward and backward.

Layout: planes x (P = N*C, H, W), contiguous. Results are bitwise equal to PyTorch's CPU
kernels and do not depend on the thread count:

* Forward: work items are (plane, output row), split into a fixed number of blocks so each
  block allocates its scratch once. Each window is scanned row-major (kernel row outer, column
  inner), tap by tap over the whole output row: for a strided pooling the input row is first
  split into ``stride`` phase rows (``phase[r][m] = row[m*stride + r]``), so every tap reads a
  contiguous slice and the loop vectorises. Max: start from the dtype's lowest value at the
  window's first valid tap; a value wins if it is greater, or NaN (so NaN propagates and the
  index is the last NaN's). Avg: sum in that order, then divide.
* Max backward: each element's gradient is the sum, in output order (the order of PyTorch's
  own kernels), of the gradients of the windows whose argmax it is. The argmax the gradient
  uses is the winning tap's number within its window (one byte, not PyTorch's 8-byte flat
  index). Stride 1, and 2- or 3-wide windows at column stride 2, gather it per input row
  (vectorised, each element written once); other poolings, and flat indices, scatter it: one
  thread owns a whole plane and adds each output's gradient at its argmax, in output order.
* Avg backward: work items are (plane, input row); each gathers its gradient from the
  windows covering it, in output order, tap by tap over whole phase rows (vectorised), then
  merges the phases.
* 2x2/stride-2 average pooling has kernels of its own: each window summed and divided in
  registers; its gradient written once per input element (no fill, no accumulation).
* Max pooling with 2- or 3-wide windows at column stride 1 or 2, without indices or with
  window codes (the gradient's), is computed separably: each input row's window maxima once, then
  their max over the window's rows, in the same order (``_max_forward_pairs``).

No element is written by two threads (no races, no atomics), and every summation order is
fixed.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from .._args import Pool2dParams, bad_pool_indices
from . import _runtime
from ._microkernel import (prefer_wide_vectors, prefetch_run, stream_fence, stream_run,
                           window_max3_s2)
from ._runtime import (engine_threads, float32_for_half, llc_bytes, parallel_kernel,
                       parallel_region)
from ._window import (U1, U2, U64, add_at, copy_at, cover_table, covering_rows, fill_at, first_tap,
                      phase_merge, phase_split, tap_table)

# Forward work is split into at most this many blocks per thread: enough to balance
# uneven blocks, few enough that per-block scratch allocation is negligible.
_BLOCKS_PER_THREAD = 64


@njit(cache=True, nogil=True, inline="always")
def _max_into(src, y):
    for k in range(y.shape[0]):
        v = src[k]
        c = y[k]
        y[k] = v if (v > c) | (v != v) else c


@njit(cache=True, nogil=True, inline="always")
def _max_into_indexed(src, y, idx, first, step):
    """As _max_into; a winning tap also records its flat index ``first + k*step``."""
    for k in range(y.shape[0]):
        v = src[k]
        c = y[k]
        take = (v > c) | (v != v)
        y[k] = v if take else c
        idx[k] = first + k * step if take else idx[k]


@njit(cache=True, nogil=True, inline="always")
def _max_into_coded(src, y, code, tap):
    """As _max_into; a winning tap also records its number ``tap`` within the window."""
    # The code as arithmetic on 0 or 1, not a select of two codes: LLVM left the select of
    # uint8 codes under a float compare's mask scalar at 256 bits and vectorises this (AVX2,
    # Zen 3, window codes of 8x64x56x56, in _max_forward: 3x3/s1/p1 29.9 -> 11.7 ms, 2x2/s1
    # 13.9 -> 4.0, 4x4/s4 6.0 -> 4.6). The same form for the int64 flat indices measured
    # slower, so _max_into_indexed keeps its select.
    for k in range(y.shape[0]):
        v = src[k]
        c = y[k]
        take = (v > c) | (v != v)
        y[k] = v if take else c
        m = code.dtype.type(take)
        code[k] = code[k] + m * (tap - code[k])


@njit(cache=True, nogil=True)
def _first_taps(idx, ih0, w, wo, sw, pw, dw):
    """idx[ow] = flat index of the first valid tap of window ow in row ih0."""
    base = ih0 * w - pw
    for ow in range(wo):
        idx[ow] = base + ow * sw
    for ow in range(min(wo, (pw + sw - 1) // sw)):  # windows starting in the left padding
        idx[ow] = ih0 * w + first_tap(ow * sw - pw, dw)


@njit(cache=True, nogil=True)
def _first_codes(code, i0, kw, wo, sw, pw, dw):
    """code[ow] = window number of the first valid tap of window ow, in kernel row i0."""
    code[:] = i0 * kw
    for ow in range(min(wo, (pw + sw - 1) // sw)):  # windows starting in the left padding
        ws = ow * sw - pw
        code[ow] = i0 * kw + (first_tap(ws, dw) - ws) // dw


# What max_pool2d_forward records besides the maximum: nothing, the flat argmax in H*W (what
# return_indices gives), or the argmax's tap number within its window (what the gradient
# needs: 1 byte instead of 8).
NO_INDICES, FLAT_INDICES, WINDOW_INDICES = 0, 1, 2


# Average pooling's 2- and 3-wide windows at stride 2 (2x2/s2 and 3x3/s2/p1): a loop over the
# windows with their taps written out reads both elements of each input pair, which LLVM
# vectorises as interleaved loads, without first splitting the row into phases. Only the
# interior windows, whose taps all lie inside the row, take it; the few at the edges go tap
# by tap. Taps keep their order per window, so results stay bitwise PyTorch's.
@njit(cache=True, nogil=True)
def _pair_taps(kw, sw, pw, dw, w, wo):
    """(usable, c0, c1): whether a row's windows take the pair loops, and the output columns
    [c0, c1) whose taps all lie inside the row."""
    if sw != 2 or dw != 1 or kw not in (2, 3):
        return False, 0, 0
    c0, c1 = _inside_windows(kw, 2, pw, w, wo)
    return True, c0, c1


@njit(cache=True, nogil=True)
def _inside_windows(kw, sw, pw, w, wo):
    """(c0, c1): the windows [c0, c1) of a row of w columns (kw wide, column stride sw, left
    padding pw, no dilation) whose taps all lie inside it: k*sw - pw >= 0 and
    k*sw - pw + kw - 1 < w."""
    c0 = min(wo, (pw + sw - 1) // sw)
    return c0, max(c0, min(wo, (w - kw + pw) // sw + 1))


# Offsets into whole 1-D arrays, not a view per row (each Numba view takes and drops a
# reference), and inlined: a call passes each array as seven arguments, which on pooling's
# short rows is not free either.
@njit(cache=True, nogil=True, inline="always")
def _add_pair_taps(x, r0, w, y, y0, wo, kw, pw, c0, c1):
    """y[y0 + k] += the taps of window k (k < wo) in the input row x[r0 : r0 + w], in tap order:
    interior columns [c0, c1) by the pair loop, edge columns tap by tap (taps outside the row
    skipped)."""
    for part in range(2):  # the edge columns, left then right
        for k in range(0, c0) if part == 0 else range(c1, wo):
            for j in range(kw):
                c = 2 * k - pw + j
                if 0 <= c < w:
                    y[y0 + k] += x[r0 + c]
    if c1 <= c0:
        return
    src, dst, n = U64(r0 + 2 * c0 - pw), U64(y0 + c0), U64(c1 - c0)  # interior windows
    # A loop per width: a test of kw inside makes the third tap a masked gather. (The third
    # tap, the next pair's first element, is still an unmasked gather: outside the pair.)
    if kw == 2:
        _pair_sums(x, src, y, dst, n)
    else:
        for t in range(n):
            u = src + U2 * t
            s = y[dst + t]
            s += x[u]
            s += x[u + U1]
            s += x[u + U2]
            y[dst + t] = s


@njit(cache=True, nogil=True, inline="always")
def _pair_sums(x, src, y, dst, n):
    """y[dst + t] += x[src + 2t] then += x[src + 2t + 1], for t < n (uint64 offsets)."""
    for t in range(n):
        u = src + U2 * t
        s = y[dst + t]
        s += x[u]
        s += x[u + U1]
        y[dst + t] = s


@njit(cache=True, nogil=True, inline="always")
def _wins(v, best):
    """Does tap value v replace the running max? Greater, or NaN (NaN propagates)."""
    return (v > best) | (v != v)


@parallel_kernel
def _max_forward(x3, y3, idx3, mode, lowest, blocks, kh, kw, sh, sw, ph, pw, dh, dw):
    """Max over each window; idx3 gets the argmax as ``mode`` says (unused for NO_INDICES)."""
    planes, h, w = x3.shape
    ho, wo = y3.shape[1], y3.shape[2]
    items = planes * ho
    taps = tap_table(kw, sw, pw, dw, w, wo)
    plen = (w + sw - 1) // sw
    for b in prange(blocks):
        prefer_wide_vectors()
        phases = np.empty(sw * plen, dtype=x3.dtype)
        for item in range(b * items // blocks, (b + 1) * items // blocks):
            p = item // ho
            oh = item % ho
            y = y3[p, oh]
            y[:] = lowest
            hs = oh * sh - ph
            idx = idx3[p if mode != NO_INDICES else 0, oh]
            if mode == FLAT_INDICES:
                _first_taps(idx, first_tap(hs, dh), w, wo, sw, pw, dw)
            elif mode == WINDOW_INDICES:
                _first_codes(idx, (first_tap(hs, dh) - hs) // dh, kw, wo, sw, pw, dw)
            for i in range(kh):
                ih = hs + i * dh
                if ih < 0 or ih >= h:
                    continue
                row = x3[p, ih]
                if sw > 1:
                    phase_split(row, 0, w, phases, plen, sw)
                for j in range(kw):
                    lo, hi, start = taps[j, 0], taps[j, 1], taps[j, 2]
                    src = row if sw == 1 else phases[taps[j, 3] * plen:]
                    src = src[start:start + hi - lo]
                    if mode == FLAT_INDICES:
                        _max_into_indexed(src, y[lo:hi], idx[lo:hi],
                                          ih * w + lo * sw - pw + j * dw, sw)
                    elif mode == WINDOW_INDICES:
                        _max_into_coded(src, y[lo:hi], idx[lo:hi], idx.dtype.type(i * kw + j))
                    else:
                        _max_into(src, y[lo:hi])


# Max pooling with 2- or 3-wide windows at column stride 2 (2x2/s2, 3x3/s2/p1: most CNNs'
# pooling) is separable: the max over a window is the max over its rows of each row's max, and
# scanning rows in order and each row's taps in order keeps the tap-by-tap kernel's ties, NaN
# and codes. Each input row's window maxima are computed once and reused by every output row
# whose window holds that row (3x3/s2: 2 new rows per output row instead of 3). 32x64x112x112,
# 3x3/s2/p1, window codes: 13.0 ms tap by tap, 7.3-7.7 separable; no indices: 9.6 -> 6.2 (Zen
# 3, the taps then read from the row split into phase rows in scratch). At column stride 1
# (3x3/s1/p1, Inception's pooling branches) each row's maxima serve three output rows:
# 32x64x56x56 without indices 39.9 -> 8.4 ms on Zen 3 (fastconv bench, maxpool-3x3s1-64x56).
# The taps now read the row itself, stride-2 loads that LLVM deinterleaves in registers, in
# 512-bit vectors where there are (prefer_wide_vectors): on the Xeon, with the prefetching
# below, fastconv bench's 3x3/s2/p1 forward 9.6-11.0 -> 8.9-9.1 ms, forward+backward
# 19.7-19.8 -> 18.2-19.2.
# Loops over a row's windows run past its end where the junk written there is harmless
# (``_padded``): LLVM's main vector loop (16 lanes x 4 with AVX-512) takes 64 iterations at a
# time, and the 3x3/s2 case's 55-window rows left to the loop's epilogue ran ~1.3x slower end
# to end. Rows under 41 windows are padded only to a multiple of 8 instead: 2x2/s2 pooling's
# 28-window rows padded to 64 ran 1.5x slower.
_PAD = 64
# Elements of a gradient stage (_max_backward_pairs): rows of it stay in L1 until they leave
# for memory together, so streaming stores write whole lines (rows of 112 one at a time:
# 7.1 -> 6.1 ms for a 100 MB pair-loop write, 1024 at a time 4.2 ms).
_STAGE = 1024
# The separable max pooling kernels prefetch the rows they will read about this far ahead:
# working a short row at a time, with compute between rows, they outran the hardware
# prefetchers. 32x64x112x112 3x3/s2/p1 (fastconv bench, Xeon): forward 11.8-12.0 -> 9.7-9.9
# ms, forward+backward 22.4-23.1 -> 19.6-20.9.
_AHEAD_BYTES = 4096


@njit(cache=True, nogil=True, inline="always")
def _padded(n):
    """Iterations a loop over n windows runs (at most n + _PAD - 1)."""
    return (n + _PAD - 1) & ~(_PAD - 1) if n > 40 else (n + 7) & ~7


@njit(cache=True, nogil=True, inline="always")
def _max_of_runs(src, a0, a1, a2, step, three, dst, d, n):
    """dst[d + t] = the max of src[a0 + step*t], src[a1 + step*t] and (if ``three``)
    src[a2 + step*t], in that order, for t < n (uint64 offsets; ``step`` a constant, so the
    loads vectorise). A loop per case: a load under a condition is not vectorised."""
    if three:
        for t in range(n):
            best = src[a0 + step * t]
            v = src[a1 + step * t]
            best = v if _wins(v, best) else best
            v = src[a2 + step * t]
            dst[d + t] = v if _wins(v, best) else best
    else:
        for t in range(n):
            best = src[a0 + step * t]
            v = src[a1 + step * t]
            dst[d + t] = v if _wins(v, best) else best


@njit(cache=True, nogil=True, inline="always")
def _row_maxima(x, r0, hv, hc, h0, kw, sw, pw, c0, c1, coded, edges):
    """hv[h0 + k] = max over window k's taps in the input row at x[r0] (kw in (2, 3), stride
    sw in (1, 2), pw <= 1), hc[h0 + k] = the winning tap (0..kw-1); taps in order. The
    interior loop runs ``_padded`` iterations into padded scratch (junk past the row's end),
    so the edge windows (``edges``: see _edge_windows) are computed after it."""
    if c1 > c0:
        _interior_maxima(x, r0, hv, hc, h0, kw, sw, pw, c0, c1, coded)
    # Straight-line code, not a loop over the taps with a test for each: 3x3/s2/p1 forward,
    # in cache, one thread, 0.47-0.51 -> 0.46-0.48 ns an input element with window codes,
    # 0.38-0.41 -> 0.36-0.39 without.
    for e in range(edges.shape[0]):
        k, j0, j1 = edges[e, 0], edges[e, 1], edges[e, 2]
        if j1 > j0:
            a = r0 + k * sw - pw
            best, tap = x[a + j0], j0
            if j1 > j0 + 1:
                v = x[a + j0 + 1]
                take = _wins(v, best)
                best, tap = (v if take else best), (j0 + 1 if take else tap)
            if j1 > j0 + 2:
                v = x[a + j0 + 2]
                take = _wins(v, best)
                best, tap = (v if take else best), (j0 + 2 if take else tap)
            hv[h0 + k], hc[h0 + k] = best, tap


@njit(cache=True, nogil=True)
def _edge_windows(kw, sw, pw, w, wo):
    """Rows (k, j0, j1): the windows k outside _inside_windows' [c0, c1) and their taps
    [j0, j1) inside a row of w columns (the others fall in the padding or past the row's
    end)."""
    c0, c1 = _inside_windows(kw, sw, pw, w, wo)
    edges = np.empty((c0 + wo - c1, 3), dtype=np.int64)
    e = 0
    for part in range(2):
        for k in range(0, c0) if part == 0 else range(c1, wo):
            start = k * sw - pw
            edges[e, 0], edges[e, 1] = k, max(0, -start)
            edges[e, 2] = max(edges[e, 1], min(kw, w - start))
            e += 1
    return edges


@njit(cache=True, nogil=True, inline="always")
def _interior_maxima(x, r0, hv, hc, h0, kw, sw, pw, c0, c1, coded):
    # Tap j of window t reads column t*sw - pw + j, straight from x (512-bit vectors
    # deinterleave a stride-2 row in registers). The padded loop's reads past the row's end
    # stay in x (the next rows), but on the last rows.
    a = U64(r0 + c0 * sw - pw)
    d = U64(h0 + c0)
    if sw == 2 and kw == 3:
        # Three taps at stride 2 (3x3/s2/p1, ResNet's pooling): plain loads, no gathers,
        # and masked at the row's end (see window_max3_s2).
        window_max3_s2(x, a, hv, hc, d, U64(c1 - c0), coded)
        return
    n = _padded(c1 - c0)
    if r0 + (c0 + n) * sw + kw > x.size:
        n = c1 - c0
    if sw == 2:
        _window_maxima(x, a, U2, hv, hc, d, U64(n), kw, coded)
    else:
        _window_maxima(x, a, U1, hv, hc, d, U64(n), kw, coded)


@njit(cache=True, nogil=True, inline="always")
def _window_maxima(x, a, step, hv, hc, d, n, kw, coded):
    """hv[d + t] = the max of x[a + step*t + j], j < kw (2 or 3), in order, and hc[d + t] its
    j if ``coded``, for t < n (uint64 offsets; ``step`` a constant, so the loads vectorise)."""
    zero, one, two = hc.dtype.type(0), hc.dtype.type(1), hc.dtype.type(2)
    if coded and kw == 3:
        for t in range(n):
            best = x[a + step * t]
            code = zero
            v = x[a + step * t + U1]
            if _wins(v, best):
                best, code = v, one
            v = x[a + step * t + U2]
            if _wins(v, best):
                best, code = v, two
            hv[d + t], hc[d + t] = best, code
    elif coded:
        for t in range(n):
            best = x[a + step * t]
            v = x[a + step * t + U1]
            take = _wins(v, best)
            hv[d + t], hc[d + t] = (v if take else best), (one if take else zero)
    else:
        _max_of_runs(x, a, a + U1, a + U2, step, kw == 3, hv, d, n)


@njit(cache=True, nogil=True, inline="always")
def _column_maxima(hv, hc, a, b, a2, y, code, o, n, kh, kw, coded):
    """y[o + t] = the max of hv[a + t], hv[b + t] and (kh == 3) hv[a2 + t], in that order;
    code[o + t] its tap in the window (every load unconditional: see _max_of_runs)."""
    a, b, a2, o = U64(a), U64(b), U64(a2), U64(o)
    # The codes in hc's float lanes, as wide as the values' (integer codes were widened to
    # 64-bit lanes by Numba's integer arithmetic: two vectors per 16 codes)
    row1, row2 = hc.dtype.type(kw), hc.dtype.type(2 * kw)
    if coded and kh == 3:
        for t in range(U64(n)):
            best, c = hv[a + t], hc[a + t]
            v, cv = hv[b + t], hc[b + t] + row1
            take = _wins(v, best)
            best, c = (v if take else best), (cv if take else c)
            v, cv = hv[a2 + t], hc[a2 + t] + row2
            take = _wins(v, best)
            y[o + t], code[o + t] = (v if take else best), (cv if take else c)
    elif coded:
        for t in range(U64(n)):
            best, c = hv[a + t], hc[a + t]
            v, cv = hv[b + t], hc[b + t] + row1
            take = _wins(v, best)
            y[o + t], code[o + t] = (v if take else best), (cv if take else c)
    else:
        _max_of_runs(hv, a, b, a2, U1, kh == 3, y, o, U64(n))


@parallel_kernel
def _max_forward_pairs(x3, y3, code3, mode, blocks, kh, kw, sh, sw, ph, pw, dh, edges):
    """Max pooling, separable, for 2- or 3-wide windows at column stride sw = 1 or 2 (no
    column dilation), without indices or with window codes (``mode``): the max of each window's
    taps in each input row once (``_row_maxima``), kept in a ring of scratch rows while later
    output rows reuse it, then the max of those over each window's rows. Rows outer, columns
    inner, as the tap-by-tap kernel scans, so ties, NaN and the codes come out the same.
    Work items: (plane, output row), as in _max_forward. ``edges``: _edge_windows."""
    planes, h, w = x3.shape
    ho, wo = y3.shape[1], y3.shape[2]
    x, y = x3.reshape(-1), y3.reshape(-1)
    coded = mode == WINDOW_INDICES
    code = code3.reshape(-1)
    items = planes * ho
    c0, c1 = _inside_windows(kw, sw, pw, w, wo)
    span = wo + _PAD  # one ring slot: a row's window maxima and the padded loop's junk
    ring = kh * dh  # a window's rows hs + i*dh (i < kh) fall in distinct slots ih % ring
    ahead = max(1, _AHEAD_BYTES // (w * x.itemsize))  # rows
    for b in prange(blocks):
        prefer_wide_vectors()
        hv = np.empty(ring * span, dtype=x3.dtype)
        hc = np.empty(ring * span, dtype=np.float32)  # a tap number beside each value
        slot = np.empty(kh, dtype=np.int64)  # where window row i's maxima start in hv
        tag = np.full(ring, -1, dtype=np.int64)  # the input row (p*h + ih) each slot holds
        first, last = b * items // blocks, (b + 1) * items // blocks
        p, oh = first // ho, first % ho  # then counted, not divided, per item
        for item in range(first, last):
            o = item * wo
            hs = oh * sh - ph
            inside = 0
            for i in range(kh):
                ih = hs + i * dh
                if ih < 0 or ih >= h:
                    continue
                s = ih % ring
                if tag[s] != p * h + ih:
                    if (p * h + ih + ahead + 1) * w <= x.size:
                        prefetch_run(x, (p * h + ih + ahead) * w, w)
                    _row_maxima(x, (p * h + ih) * w, hv, hc, s * span, kw, sw, pw, c0, c1,
                                coded, edges)
                    tag[s] = p * h + ih
                slot[i] = s * span
                inside += 1
            if inside == kh and 2 <= kh <= 3:
                # The row's outputs in one pass; padded like the row maxima where the junk
                # lands in this block's own later rows, which overwrite it.
                n = _padded(wo) if o + _padded(wo) <= last * wo else wo
                _column_maxima(hv, hc, slot[0], slot[1], slot[kh - 1], y, code, o, n, kh, kw,
                               coded)
            else:  # window rows in the padding, or kh > 3: row by row, in order
                started = False
                for i in range(kh):
                    ih = hs + i * dh
                    if ih < 0 or ih >= h:
                        continue
                    r = slot[i]
                    for t in range(wo):
                        v = hv[r + t]
                        if not started or _wins(v, y[o + t]):
                            y[o + t] = v
                            if coded:
                                code[o + t] = i * kw + hc[r + t]
                    started = True
            oh += 1
            if oh == ho:
                p, oh = p + 1, 0


@njit(cache=True, nogil=True, inline="always")
def _argmax_at(idx, ow, oh, window, tap_rows, tap_cols, h, w, sh, sw, ph, pw):
    """Flat index in the plane of window (oh, ow)'s argmax: ``idx[ow]`` itself (flat indices)
    or tap ``idx[ow]`` of the window (window indices); -1 if that names no input element
    (indices not made by max_pool2d)."""
    t = idx[ow]
    if not window:
        return t if 0 <= t < h * w else -1
    if t < 0 or t >= tap_rows.shape[0]:
        return -1
    ih = oh * sh - ph + tap_rows[t]
    iw = ow * sw - pw + tap_cols[t]
    if ih < 0 or ih >= h or iw < 0 or iw >= w:
        return -1
    return ih * w + iw


@parallel_kernel
def _max_backward(gy3, idx3, gx3, window, tap_rows, tap_cols, sh, sw, ph, pw, row_ok, col_ok,
                  bad):
    """Per plane, in output order: gx[argmax] += gy[oh, ow] (see ``_argmax_at``), for the
    windows that hold at least one input element (``row_ok[oh] and col_ok[ow]``; a window
    wholly in the padding has no input element to send its gradient to). An index naming no
    input element is skipped and flagged in ``bad[plane]``, never written through."""
    planes, h, w = gx3.shape
    ho, wo = gy3.shape[1], gy3.shape[2]
    for p in prange(planes):
        prefer_wide_vectors()
        gx = gx3[p].reshape(h * w)
        gx[:] = 0
        for oh in range(ho):
            if not row_ok[oh]:
                continue
            gy = gy3[p, oh]
            idx = idx3[p, oh]
            for ow in range(wo):
                if col_ok[ow]:
                    i = _argmax_at(idx, ow, oh, window, tap_rows, tap_cols, h, w, sh, sw, ph, pw)
                    if i < 0:
                        bad[p] = 1
                    else:
                        gx[i] += gy[ow]


# Max pooling's gradient for 2- or 3-wide windows at column stride 2 (3x3/s2/p1, 2x2/s2)
# with window codes (what the autograd formula keeps) is gathered per input row instead: each
# element sums, in output order, the gradients of the windows whose winning tap it is, in a
# loop over column pairs that reads both covering output rows (vectorised, masked adds), and
# each element is written once: no zero fill, no scattered 4-byte writes. Same sums in the
# same order as the scatter, so the same bits. 32x64x112x112 3x3/s2/p1: scatter 9.0-9.25 ms,
# gather 5.1-6.0 plus 0.7 for checking the codes first (a code naming no input element would
# otherwise just be skipped, silently).
@njit(cache=True, nogil=True, inline="always")
def _pair_gradients(gy, code, gx, g0, g1, two, t0, t1, kw, s0, d0, n):
    """The gradient of input columns d0 + 2t (even) and d0 + 2t + 1 (odd), t < n, from output
    rows at g0 and (if ``two``) g1 of gy/code, whose windows hold this row as kernel row with
    first tap number t0 (t1): with q = s0 + t, the even column is tap 2 of window q - 1
    (kw == 3) then tap 0 of window q, the odd one tap 1 of window q; rows in order. A window
    not won by that tap adds +0.0 (no change: a sum from +0.0 is never -0.0)."""
    zero = gx.dtype.type(0)
    a0, a1, a2 = code.dtype.type(t0), code.dtype.type(t0 + 1), code.dtype.type(t0 + 2)
    b0, b1, b2 = code.dtype.type(t1), code.dtype.type(t1 + 1), code.dtype.type(t1 + 2)
    u, v, d = U64(g0 + s0), U64(g1 + s0), U64(d0)
    if kw == 3 and two:
        for t in range(U64(n)):
            e = zero + (gy[u + t - U1] if code[u + t - U1] == a2 else zero)
            e += gy[u + t] if code[u + t] == a0 else zero
            o = zero + (gy[u + t] if code[u + t] == a1 else zero)
            e += gy[v + t - U1] if code[v + t - U1] == b2 else zero
            e += gy[v + t] if code[v + t] == b0 else zero
            o += gy[v + t] if code[v + t] == b1 else zero
            gx[d + U2 * t], gx[d + U2 * t + U1] = e, o
    elif kw == 3:
        for t in range(U64(n)):
            e = zero + (gy[u + t - U1] if code[u + t - U1] == a2 else zero)
            e += gy[u + t] if code[u + t] == a0 else zero
            o = zero + (gy[u + t] if code[u + t] == a1 else zero)
            gx[d + U2 * t], gx[d + U2 * t + U1] = e, o
    elif two:
        for t in range(U64(n)):
            e = zero + (gy[u + t] if code[u + t] == a0 else zero)
            o = zero + (gy[u + t] if code[u + t] == a1 else zero)
            e += gy[v + t] if code[v + t] == b0 else zero
            o += gy[v + t] if code[v + t] == b1 else zero
            gx[d + U2 * t], gx[d + U2 * t + U1] = e, o
    else:
        for t in range(U64(n)):
            e = zero + (gy[u + t] if code[u + t] == a0 else zero)
            o = zero + (gy[u + t] if code[u + t] == a1 else zero)
            gx[d + U2 * t], gx[d + U2 * t + U1] = e, o


@njit(cache=True, nogil=True, inline="always")
def _stage_row_made(gx, stage, item, last, held, rows, w, stream):
    """Input row ``item`` (of w columns) is made in the stage, after ``held`` others: when
    the stage holds ``rows`` rows or the block ends at ``last``, they leave for gx, by
    streaming stores if ``stream``, else by plain copies. Returns the rows the stage holds."""
    held += 1
    if held < rows and item + 1 < last:
        return held
    if stream:
        stream_run(gx, (item + 1 - held) * w, stage, 0, held * w)
    else:
        copy_at(gx, (item + 1 - held) * w, stage, 0, held * w)
    return 0


@parallel_kernel(error_model="numpy")
def _max_backward_pairs(gy3, code3, gx3, blocks, kh, kw, sh, ph, pw, dh, stream):
    """gx3 (P, H, W) = the gradient of the window codes code3 (P, Ho, Wo), for 2- or 3-wide
    windows at column stride 2 (no column dilation) whose input rows each lie in at most two
    windows' rows (kh <= 2*sh with dh == 1): gathered per input row, each element summing
    the gradients of the windows it won in output order, as the scatter adds them. Codes
    naming no input element add nothing (_bad_window_codes flags them). A block's rows are
    made in an L1 stage of about _STAGE elements and leave it by ``stream_run`` (streaming
    stores) if ``stream``, else by plain copies."""
    planes, h, w = gx3.shape
    ho, wo = gy3.shape[1], gy3.shape[2]
    gy, code, gx = gy3.reshape(-1), code3.reshape(-1), gx3.reshape(-1)
    items = planes * h
    count, cover_rows, cover_taps = cover_table(h, kh, sh, ph, dh, ho)
    zero = gx.dtype.type(0)
    # Interior pairs q in [m0, m1): columns 2q - pw and 2q + 1 - pw, in the row, whose
    # windows (q - 1 for kw == 3, and q) exist.
    m0 = 1 if kw == 3 else pw
    m1 = max(m0, min(wo, (w - 2 + pw) // 2 + 1))
    lo, hi = 2 * m0 - pw, 2 * m1 - pw
    # The columns outside [lo, hi), and the windows [ow0, ow1) holding each
    edges = np.empty((max(0, lo) + max(0, w - hi), 3), dtype=np.int64)
    e = 0
    for part in range(2):
        for c in range(0, lo) if part == 0 else range(hi, w):
            u = c + pw
            edges[e, 0], edges[e, 1] = c, max(0, (u - kw + 2) // 2)
            edges[e, 2] = max(edges[e, 1], min(wo, u // 2 + 1))
            e += 1
    rows = max(1, _STAGE // w)  # rows a stage holds
    ahead = max(1, _AHEAD_BYTES // (wo * gy.itemsize)) * wo  # elements of gy and code
    for b in prange(blocks):
        prefer_wide_vectors()
        # The padded loop's junk (see _padded) may run 2 * _PAD past a row's end: into the
        # stage's next row, which overwrites it, or its spare end.
        stage = np.empty(rows * w + 2 * _PAD, dtype=gx.dtype)
        first, last = b * items // blocks, (b + 1) * items // blocks
        p, ih = first // h, first % h  # then counted, not divided, per item
        held = 0  # rows in the stage (counted, not divided: a division per row cost 5-10%)
        for item in range(first, last):
            r0 = held * w  # the row's place in the stage
            nk = count[ih]
            if nk == 0:
                fill_at(stage, r0, w, 0)
            else:
                g0 = (p * ho + cover_rows[ih, 0]) * wo
                g1 = (p * ho + cover_rows[ih, nk - 1]) * wo
                t0, t1 = cover_taps[ih, 0] * kw, cover_taps[ih, nk - 1] * kw
                if g1 + ahead + wo <= gy.size:
                    prefetch_run(gy, g1 + ahead, wo)
                    prefetch_run(code, g1 + ahead, wo)
                n = m1 - m0
                if n > 0:
                    # Padded where the reads stay in gy and code.
                    m = _padded(n)
                    if max(g0, g1) + m1 + m - n > gy.size:
                        m = n
                    _pair_gradients(gy, code, stage, g0, g1, nk == 2, t0, t1, kw, m0, r0 + lo,
                                    m)
                # The other columns after the interior's junk, window by window, their
                # windows from a table made once (not found by divisions per row) and
                # summed in straight-line code, not loops (at most two windows a column,
                # kw <= 3, and two window rows; a window not won adds +0.0, which changes
                # no bit): 32x64x112x112 3x3/s2 gradient 5.4-5.8 -> 4.8-5.2 ms.
                for e in range(edges.shape[0]):
                    c, ow, cnt = edges[e, 0], edges[e, 1], edges[e, 2] - edges[e, 1]
                    tap = c + pw - 2 * ow  # its tap in window ow; in ow + 1, tap - 2
                    v = zero
                    if cnt > 0:
                        v += gy[g0 + ow] if code[g0 + ow] == t0 + tap else zero
                    if cnt > 1:
                        v += gy[g0 + ow + 1] if code[g0 + ow + 1] == t0 + tap - 2 else zero
                    if nk == 2 and cnt > 0:
                        v += gy[g1 + ow] if code[g1 + ow] == t1 + tap else zero
                    if nk == 2 and cnt > 1:
                        v += gy[g1 + ow + 1] if code[g1 + ow + 1] == t1 + tap - 2 else zero
                    stage[r0 + c] = v
            held = _stage_row_made(gx, stage, item, last, held, rows, w, stream)
            ih += 1
            if ih == h:
                p, ih = p + 1, 0
        if stream:
            stream_fence()


# Max pooling's gradient at stride 1 (Inception's pooling branches) with window codes,
# gathered per input row: each element sums, in output order, the gradients of the windows
# whose winning tap it is, so each is written by one thread and the bits are the scatter's.
# Tap c of window ow is column ow - pw + c*dw, a constant shift, so a kernel row's taps are
# read along a whole row at once (vectorised masked adds over shifted slices), up to three in
# registers per pass; passes rewrite the row at the same addresses (one tap per pass reread
# just-stored data one element off, which stalls store forwarding: 10 ms on 32x64x56x56
# 3x3/s1/p1). 3x3/s1/p1 itself, where windows and elements are the same grid, takes all nine
# taps in registers along whole runs of a plane's rows at once (see _flat_gradients_3x3).
# 32x64x56x56 3x3/s1/p1: the scatter 10.6 ms, this 2.3-3.3 plus 0.7 for checking the codes;
# fastconv bench's forward+backward 18.5-22.2 -> 12.4-13.2 ms.
@njit(cache=True, nogil=True, inline="always")
def _flat_gradients_3x3(gy, code, gx, u, d, n, w):
    """3x3/s1/p1, where window (oh, ow) and element (oh, ow) share a flat index: gx[d + t] =
    the gradients of windows u + t + i*w + j (i, j < 3, in that order: the windows' order) for
    t < n, each where its code names its tap 8 - 3i - j (the one on the element). A window
    one row up or down that a shift reaches across a row's end names, as a valid code, no tap
    on this element (that tap lies in the padding), so it adds nothing: the codes are checked
    (_bad_window_codes) before. (A window not won by the tap adds +0.0: no change, as a sum
    from +0.0 is never -0.0.)"""
    zero = gx.dtype.type(0)
    k = code.dtype.type
    a8, a7, a6, a5, a4, a3, a2, a1, a0 = k(8), k(7), k(6), k(5), k(4), k(3), k(2), k(1), k(0)
    u2, d0 = U64(u), U64(d)
    u1, u0 = u2 + U64(w), u2 + U64(2 * w)
    for t in range(U64(n)):
        v = zero + (gy[u2 + t] if code[u2 + t] == a8 else zero)
        v += gy[u2 + t + U1] if code[u2 + t + U1] == a7 else zero
        v += gy[u2 + t + U2] if code[u2 + t + U2] == a6 else zero
        v += gy[u1 + t] if code[u1 + t] == a5 else zero
        v += gy[u1 + t + U1] if code[u1 + t + U1] == a4 else zero
        v += gy[u1 + t + U2] if code[u1 + t + U2] == a3 else zero
        v += gy[u0 + t] if code[u0 + t] == a2 else zero
        v += gy[u0 + t + U1] if code[u0 + t + U1] == a1 else zero
        gx[d0 + t] = v + (gy[u0 + t + U2] if code[u0 + t + U2] == a0 else zero)


@njit(cache=True, nogil=True, inline="always")
def _row_tap_gradients(gy, code, gx, g, d, n, k, tap, dw):
    """gx[d + t] += the gradients of k taps (k <= 3) for t < n: tap ``tap - j`` of the window
    at g + t + j*dw in gy/code, j in order, where the code names it."""
    zero = gx.dtype.type(0)
    a0, a1, a2 = code.dtype.type(tap), code.dtype.type(tap - 1), code.dtype.type(tap - 2)
    u0, d0 = U64(g), U64(d)
    u1, u2 = u0 + U64(dw), u0 + U64(2 * dw)
    if k == 3:
        for t in range(U64(n)):
            v = gx[d0 + t] + (gy[u0 + t] if code[u0 + t] == a0 else zero)
            v += gy[u1 + t] if code[u1 + t] == a1 else zero
            gx[d0 + t] = v + (gy[u2 + t] if code[u2 + t] == a2 else zero)
    elif k == 2:
        for t in range(U64(n)):
            v = gx[d0 + t] + (gy[u0 + t] if code[u0 + t] == a0 else zero)
            gx[d0 + t] = v + (gy[u1 + t] if code[u1 + t] == a1 else zero)
    else:
        for t in range(U64(n)):
            gx[d0 + t] += gy[u0 + t] if code[u0 + t] == a0 else zero


@njit(cache=True, nogil=True)
def _element_gradient(gy, code, p, ih, iw, ho, wo, kh, kw, ph, pw, dh, dw):
    """The gradient of element (ih, iw) of plane p, window by window in output order."""
    v = gy.dtype.type(0)
    for r in range(kh - 1, -1, -1):
        oh = ih + ph - r * dh
        if 0 <= oh < ho:
            for c in range(kw - 1, -1, -1):
                ow = iw + pw - c * dw
                if 0 <= ow < wo:
                    o = (p * ho + oh) * wo + ow
                    if code[o] == r * kw + c:
                        v += gy[o]
    return v


@parallel_kernel(error_model="numpy")
def _max_backward_s1(gy3, code3, gx3, blocks, kh, kw, ph, pw, dh, dw):
    """gx3 (P, H, W) = the gradient of the window codes code3 (P, Ho, Wo) at stride 1 (any
    kernel, padding, dilation; codes checked by _bad_window_codes), per input row: its
    windows' rows in order (kernel rows bottom-up), in each the taps right to left (for a
    fixed element, its windows left to right), as the scatter adds them."""
    planes, h, w = gx3.shape
    ho, wo = gy3.shape[1], gy3.shape[2]
    gy, code, gx = gy3.reshape(-1), code3.reshape(-1), gx3.reshape(-1)
    items = planes * h
    flat = kh == kw == 3 and ph == pw == dh == dw == 1 and h > 2 and w > 1
    for b in prange(blocks):
        prefer_wide_vectors()
        first, last = b * items // blocks, (b + 1) * items // blocks
        item = first
        while item < last:
            p, ih = item // h, item % h
            r0 = item * w
            if flat and 0 < ih < h - 1:
                # Rows [ih, end) of the plane at once, but for the elements whose first or
                # last window lies outside the plane: row 1's first, row h - 2's last.
                end = min(h - 1, ih + last - item)
                a = r0 + (1 if ih == 1 else 0)
                z = (p * h + end) * w - (1 if end == h - 1 else 0)
                _flat_gradients_3x3(gy, code, gx, a - w - 1, a, z - a, w)
                if ih == 1:
                    gx[r0] = _element_gradient(gy, code, p, 1, 0, ho, wo, 3, 3, 1, 1, 1, 1)
                if end == h - 1:
                    gx[z] = _element_gradient(gy, code, p, h - 2, w - 1, ho, wo, 3, 3, 1, 1,
                                              1, 1)
                item += end - ih
                continue
            fill_at(gx, r0, w, 0)
            for r in range(kh - 1, -1, -1):
                oh = ih + ph - r * dh
                if oh < 0 or oh >= ho:
                    continue
                g = (p * ho + oh) * wo
                for top in range(kw - 1, -1, -3):  # taps top, top - 1, top - 2 (those >= 0)
                    k = min(3, top + 1)
                    # Column iw is tap top - j of window iw + base + j*dw; all k windows
                    # exist for iw in [a, z); the columns outside, element by element.
                    base = pw - top * dw
                    a = min(w, max(0, -base))
                    z = max(a, min(w, wo - base - (k - 1) * dw))
                    if z > a:
                        _row_tap_gradients(gy, code, gx, g + a + base, r0 + a, z - a, k,
                                           r * kw + top, dw)
                    for part in range(2):
                        for iw in range(0, a) if part == 0 else range(z, w):
                            v = gx[r0 + iw]
                            for j in range(k):
                                ow = iw + base + j * dw
                                if 0 <= ow < wo and code[g + ow] == r * kw + top - j:
                                    v += gy[g + ow]
                            gx[r0 + iw] = v
            item += 1


@parallel_kernel
def _bad_window_codes(code3, h, w, kh, kw, sh, sw, ph, pw, dh, dw, tap_rows, tap_cols, row_ok,
                      col_ok, bad):
    """bad[p] = 1 where plane p holds a window code naming no input element: not in
    [0, kh*kw), or a tap in the padding. Windows holding no input element at all
    (``row_ok[oh] and col_ok[ow]`` false) send no gradient and are not checked. Every code is
    range-checked in one pass over the plane (vectorised); the taps of only the windows that
    reach into the padding are then checked one by one (tap_rows, tap_cols: see _window_taps;
    a table, not two divisions per window)."""
    planes, ho, wo = code3.shape
    taps = kh * kw
    c0 = min(wo, (pw + sw - 1) // sw)  # windows [c0, c1) have every tap inside the row
    c1 = max(c0, min(wo, (w - 1 - (kw - 1) * dw + pw) // sw + 1))
    for p in prange(planes):
        prefer_wide_vectors()
        plane = code3[p].reshape(-1)
        # The plane's smallest and largest code, in the codes' own type (a max of bytes is
        # 64 lanes wide; a count of bad ones widened each compare to 64 bits: 3x slower).
        least = most = plane.dtype.type(0)
        for t in range(plane.shape[0]):
            least, most = min(least, plane[t]), max(most, plane[t])
        wrong = least < 0 or most >= taps
        for oh in range(ho):
            hs = oh * sh - ph
            inside = hs >= 0 and hs + (kh - 1) * dh < h
            for part in range(2):
                for ow in range(0, c0 if inside else wo) if part == 0 else \
                        range(c1 if inside else wo, wo):
                    t = plane[oh * wo + ow]
                    if not (row_ok[oh] and col_ok[ow]) or t < 0 or t >= taps:
                        continue
                    ih, iw = hs + tap_rows[t], ow * sw - pw + tap_cols[t]
                    wrong |= ih < 0 or ih >= h or iw < 0 or iw >= w
        bad[p] = wrong


@parallel_kernel
def _max_double_backward(ggx3, idx3, ggy3, window, tap_rows, tap_cols, sh, sw, ph, pw, row_ok,
                         col_ok, bad):
    """The adjoint of ``_max_backward``: ggy[oh, ow] = ggx[argmax] for the windows that hold
    an input element, else 0."""
    planes, h, w = ggx3.shape
    ho, wo = ggy3.shape[1], ggy3.shape[2]
    for p in prange(planes):
        prefer_wide_vectors()
        ggx = ggx3[p].reshape(h * w)
        for oh in range(ho):
            out = ggy3[p, oh]
            idx = idx3[p, oh]
            for ow in range(wo):
                out[ow] = 0
                if row_ok[oh] and col_ok[ow]:
                    i = _argmax_at(idx, ow, oh, window, tap_rows, tap_cols, h, w, sh, sw, ph, pw)
                    if i < 0:
                        bad[p] = 1
                    else:
                        out[ow] = ggx[i]


@njit(cache=True, nogil=True, inline="always")
def _divisor(y, row_factor, col_factor):
    """Window (row, column)'s divisor for data y: PyTorch's divisor is the product of a row and
    a column factor, made in the data's dtype (float32 data divides in float32, as PyTorch's
    does). The column factors come in that dtype (see _avg_divisor_factors) and the product is
    taken there: both factors are exact small integers, or the row factor is divisor_override
    and the column factor 1, so it rounds the integer product just as converting it would."""
    return y.dtype.type(row_factor) * col_factor


@njit(cache=True, nogil=True, inline="always")
def _divide_row(y, y0, n, row_factor, col_factors):
    """y[y0 + k] /= _divisor(y, row_factor, col_factors[k]) for k < n."""
    for k in range(n):
        y[y0 + k] = y[y0 + k] / _divisor(y, row_factor, col_factors[k])


@parallel_kernel(error_model="numpy")
def _avg_forward(x3, y3, blocks, kh, kw, sh, sw, ph, pw, row_factors, col_factors):
    planes, h, w = x3.shape
    ho, wo = y3.shape[1], y3.shape[2]
    x, y = x3.reshape(-1), y3.reshape(-1)
    items = planes * ho
    taps = tap_table(kw, sw, pw, 1, w, wo)
    pair, c0, c1 = _pair_taps(kw, sw, pw, 1, w, wo)
    plen = (w + sw - 1) // sw
    for b in prange(blocks):
        prefer_wide_vectors()
        phases = np.empty(sw * plen, dtype=x3.dtype)
        for item in range(b * items // blocks, (b + 1) * items // blocks):
            p = item // ho
            oh = item % ho
            y0 = item * wo
            fill_at(y, y0, wo, 0)
            hs = oh * sh - ph
            for i in range(kh):
                ih = hs + i
                if ih < 0 or ih >= h:
                    continue
                r0 = (p * h + ih) * w
                if pair:
                    _add_pair_taps(x, r0, w, y, y0, wo, kw, pw, c0, c1)
                    continue
                if sw > 1:
                    phase_split(x, r0, w, phases, plen, sw)
                for j in range(kw):
                    lo, hi, start = taps[j, 0], taps[j, 1], taps[j, 2]
                    if sw == 1:
                        add_at(y, y0 + lo, x, r0 + start, hi - lo)
                    else:
                        add_at(y, y0 + lo, phases, taps[j, 3] * plen + start, hi - lo)
            _divide_row(y, U64(y0), U64(wo), row_factors[oh], col_factors)


@parallel_kernel(error_model="numpy")
def _avg_backward(gy3, gx3, blocks, kh, kw, sh, sw, ph, pw, row_factors, col_factors):
    """Per input row, gathered in output order: every input element of window (oh, ow) gets
    gy[oh, ow] / divisor added, the windows taken row by row and, within a row, left to right
    (for a fixed element a later tap means an earlier window, so taps run right to left).
    Each tap adds a contiguous run of outputs into one phase of the row (see phase_split)."""
    planes, h, w = gx3.shape
    ho, wo = gy3.shape[1], gy3.shape[2]
    gy, gx = gy3.reshape(-1), gx3.reshape(-1)
    items = planes * h
    taps = tap_table(kw, sw, pw, 1, w, wo)
    # Non-overlapping 2-wide windows at stride 2 (2x2/s2): each element of a row gets one
    # term per window row, so the pair loop's writes are independent and vectorise.
    pair, c0, c1 = _pair_taps(kw, sw, pw, 1, w, wo)
    pair = pair and kw == 2
    plen = (w + sw - 1) // sw
    for b in prange(blocks):
        prefer_wide_vectors()
        phases = np.empty(sw * plen, dtype=gx3.dtype)
        g = np.empty(wo, dtype=gx3.dtype)
        for item in range(b * items // blocks, (b + 1) * items // blocks):
            p = item // h
            ih = item % h
            r0 = item * w  # input row (p, ih)
            if sw == 1 or pair:
                fill_at(gx, r0, w, 0)
            else:
                fill_at(phases, 0, sw * plen, 0)
            oh0, oh1 = covering_rows(ih, kh, sh, ph, 1, ho)
            for oh in range(oh0, oh1):
                copy_at(g, 0, gy, (p * ho + oh) * wo, wo)
                _divide_row(g, U64(0), U64(wo), row_factors[oh], col_factors)
                if pair:
                    _spread_pairs(g, gx, r0, w, pw, c0, c1)
                    continue
                for j in range(kw - 1, -1, -1):
                    lo, hi, start = taps[j, 0], taps[j, 1], taps[j, 2]
                    if sw == 1:
                        add_at(gx, r0 + start, g, lo, hi - lo)
                    else:
                        add_at(phases, taps[j, 3] * plen + start, g, lo, hi - lo)
            if sw > 1 and not pair:
                phase_merge(phases, plen, gx, r0, w, sw)


@njit(cache=True, nogil=True, inline="always")
def _spread_pairs(g, gx, r0, w, pw, c0, c1):
    """gx[r0 + 2k - pw + j] += g[k] for j = 0, 1 (2-wide windows at stride 2, which do not
    overlap; gx[r0 : r0 + w] is the input row): the interior by a pair loop, the edge windows
    tap by tap."""
    wo = g.shape[0]
    for part in range(2):  # the edge windows, left then right
        for k in range(0, c0) if part == 0 else range(c1, wo):
            for j in range(2):
                c = 2 * k - pw + j
                if 0 <= c < w:
                    gx[r0 + c] += g[k]
    if c1 <= c0:
        return
    dst = U64(r0 + 2 * c0 - pw)  # the first interior window's first tap
    for t in range(U64(c1 - c0)):
        v = g[U64(c0) + t]
        gx[dst + U2 * t] += v
        gx[dst + U2 * t + U1] += v


# 2x2/s2 average pooling (most CNNs' downsampling) has kernels of its own. Forward: the four
# taps of a window summed in registers and divided there, one pass per output row, where
# _avg_forward fills the row, adds each input row's taps into it and divides, three more
# passes over it. Backward: each input element lies in at most one window, so it is written
# once, 0 + gy / divisor as PyTorch's zero-filled accumulation makes it, where _avg_backward
# fills the row and adds into it. Kernels apart, not branches of the general ones: a branch
# there changed the general paths' code and made 3x3 pooling 5-10% slower. Taps in the same
# order: bitwise the same results as the general kernels.
@njit(cache=True, nogil=True)
def _quad_edges(x, r0, w, y, y0, wo, top, bottom, pw, c0, c1, row_factor, col_factors):
    """The windows of output row y[y0 : y0 + wo] that reach past the input: columns outside
    [c0, c1) (``top``/``bottom``: whether its upper/lower input row, starting at r0 and
    r0 + w, lies inside). Taps outside the input are skipped."""
    for k in range(wo):
        if c0 <= k < c1 and top and bottom:
            continue
        s = y.dtype.type(0)
        for i in range(2):
            if (top, bottom)[i]:
                for j in range(2):
                    c = 2 * k - pw + j
                    if 0 <= c < w:
                        s += x[r0 + i * w + c]
        y[y0 + k] = s / _divisor(y, row_factor, col_factors[k])


@parallel_kernel(error_model="numpy")
def _avg_forward_2x2(x3, y3, blocks, ph, pw, row_factors, col_factors):
    """avg_pool2d with kernel_size=2, stride=2; x3 (P, H, W) -> y3 (P, Ho, Wo)."""
    planes, h, w = x3.shape
    ho, wo = y3.shape[1], y3.shape[2]
    x, y = x3.reshape(-1), y3.reshape(-1)
    items = planes * ho
    _, c0, c1 = _pair_taps(2, 2, pw, 1, w, wo)
    edges = c0 > 0 or c1 < wo
    for b in prange(blocks):
        prefer_wide_vectors()
        first = b * items // blocks
        p, oh = first // ho, first % ho - 1  # then counted, not divided, per row
        for item in range(first, (b + 1) * items // blocks):
            oh += 1
            if oh == ho:
                p, oh = p + 1, 0
            hs = oh * 2 - ph
            r0, y0 = (p * h + hs) * w, item * wo  # r0: the window's top row, maybe padding
            top, bottom = hs >= 0, hs + 1 < h
            if edges or not (top and bottom):
                _quad_edges(x, r0, w, y, y0, wo, top, bottom, pw, c0, c1, row_factors[oh],
                            col_factors)
            if not (top and bottom) or c1 <= c0:
                continue
            src, below, dst = U64(r0 + 2 * c0 - pw), U64(r0 + w + 2 * c0 - pw), U64(y0 + c0)
            row_factor = row_factors[oh]
            for t in range(U64(c1 - c0)):
                s = y.dtype.type(0)
                s += x[src + U2 * t]
                s += x[src + U2 * t + U1]
                s += x[below + U2 * t]
                s += x[below + U2 * t + U1]
                y[dst + t] = s / _divisor(y, row_factor, col_factors[U64(c0) + t])


@parallel_kernel(error_model="numpy")
def _avg_backward_2x2(gy3, gx3, blocks, ph, pw, row_factors, col_factors, stream):
    """The gradient of _avg_forward_2x2: gy3 (P, Ho, Wo) -> gx3 (P, H, W), written once:
    straight into gx3, or if ``stream`` into an L1 stage of about _STAGE elements that leaves
    by streaming stores (as in _max_backward_pairs)."""
    planes, h, w = gx3.shape
    ho, wo = gy3.shape[1], gy3.shape[2]
    gy, gx = gy3.reshape(-1), gx3.reshape(-1)
    items = planes * h
    _, c0, c1 = _pair_taps(2, 2, pw, 1, w, wo)
    lo, hi = max(0, 2 * c0 - pw), max(0, 2 * c1 - pw)  # the interior windows' columns
    zero = gx.dtype.type(0)
    rows = max(1, _STAGE // w) if stream else 1  # rows a stage holds
    for b in prange(blocks):
        prefer_wide_vectors()
        stage = np.empty(rows * w if stream else 0, dtype=gx.dtype)
        out = stage if stream else gx
        first, last = b * items // blocks, (b + 1) * items // blocks
        p, ih = first // h, first % h - 1  # then counted, not divided, per row
        held = 0  # rows in the stage
        for item in range(first, last):
            ih += 1
            if ih == h:
                p, ih = p + 1, 0
            r0 = held * w if stream else item * w
            oh = (ih + ph) // 2
            if oh >= ho:  # below the last window
                fill_at(out, r0, w, 0)
            else:
                g0, row_factor = (p * ho + oh) * wo, row_factors[oh]
                if lo > 0 or hi < w:  # edge windows, and columns in no window
                    # (Left of lo every column is in window 0: padding is at most 1.)
                    fill_at(out, r0 + hi, w - hi, 0)
                    for k in range(wo):
                        if c0 <= k < c1:
                            continue
                        v = gy[g0 + k] / _divisor(gx, row_factor, col_factors[k])
                        for j in range(2):
                            c = 2 * k - pw + j
                            if 0 <= c < w:
                                out[r0 + c] = zero + v
                dst, src = U64(r0 + lo), U64(g0 + c0)
                for t in range(U64(c1 - c0)):
                    v = zero + gy[src + t] / _divisor(gx, row_factor, col_factors[U64(c0) + t])
                    out[dst + U2 * t] = v
                    out[dst + U2 * t + U1] = v
            if stream:
                held = _stage_row_made(gx, stage, item, last, held, rows, w, True)
        if stream:
            stream_fence()


def _avg_factors(out: int, size: int, k: int, s: int, pad: int, count_include_pad: bool):
    """Per output position along one axis, its share of PyTorch's divisor: the window clipped
    to the padded input (count_include_pad) or to the input."""
    start = np.arange(out, dtype=np.int64) * s - pad
    end = np.minimum(start + k, size + pad)
    if count_include_pad:
        return end - start
    return np.minimum(end, size) - np.maximum(start, 0)


def _avg_divisor_factors(input_shape, out_hw, params: Pool2dParams, count_include_pad: bool,
                         divisor_override: int | None, col_dtype: np.dtype):
    """(row_factors (int64), col_factors (col_dtype, the data's)): window (oh, ow) divides by
    row[oh] * col[ow]. Column factors in the data's dtype keep the inner loops free of int64
    conversions, which on 256-bit targets (AVX2, and AVX-512 hosts LLVM tunes for 256-bit
    vectors) left 2x2 average pooling's interior loop scalar."""
    if divisor_override:
        return (np.full(out_hw[0], divisor_override, dtype=np.int64),
                np.ones(out_hw[1], dtype=col_dtype))
    h, w = input_shape[-2:]
    rows, cols = (_avg_factors(out_hw[a], (h, w)[a], params.kernel[a], params.stride[a],
                               params.padding[a], count_include_pad) for a in (0, 1))
    return rows, cols.astype(col_dtype)


# Gradients from this many bytes leave the kernels by streaming stores: far larger than the
# caches, they would only evict what is there (the forward's input, the next layer's operands)
# on their way to memory, after reading every line in first. Measured on the Xeon (2 MiB L2),
# forward+backward and then a sum over the gradient (a consumer reading it), plain / streamed,
# ms: 2x2/s2 average pooling 64x56x56 at batch 4 (3 MiB of gradient) 0.70-0.76 / 0.84-0.85,
# batch 8 (6 MiB) 1.05 / 1.34-1.35, batch 16 (12 MiB) 2.33-2.41 / 2.35-2.37, batch 32 (25 MiB)
# 5.9-6.3 / 4.5-4.6; 3x3/s2 max pooling's gradient of 12 MiB 4.1-4.3 / 3.5, 49 MiB 15.6-15.8 /
# 11.8. (Not the stride-1 max pooling gradient, _max_backward_s1: compute-bound, it lost more
# to a stage's copy than the stores saved, 64x56x56 3x3/s1 at batch 32 4.5-4.8 -> 4.9-5.3 ms.)
# Where the last-level cache is far larger, a gradient a tenth of its size stays there for its
# consumer, and streaming it out to memory costs more than it saves. On a later host, same
# measure, whose sysfs lists a 480 MiB L3: average pooling, batch 16 (12 MiB) 1.36 / 1.75-1.81,
# 32 (24 MiB) 2.44-2.48 / 3.05, 48 (37 MiB) 3.88-3.93 / 4.21-4.28, 80 (61 MiB) 7.64-7.77 /
# 7.83-7.89, 128 (98 MiB) 13.5-14.0 / 12.6-12.7; max pooling 3x3/s2 on 112x112, batch 4
# (12 MiB) 2.06-2.10 / 2.39-2.41, 8 (24 MiB) 3.62-3.91 / 4.14, 12 (37 MiB) 5.26-5.35 /
# 5.66-5.72, 16 (49 MiB) 8.45-8.94 / 7.56-7.67. (glibc's memcpy picks streaming stores by the
# shared cache's size likewise.) So the switch is at a tenth of the last-level cache, and at
# 12 MiB where that is less or unknown.
_STREAM_BYTES = max(12 << 20, llc_bytes() // 10)


def _streamed(gx: torch.Tensor) -> bool:
    """Does gradient ``gx`` leave its kernel by streaming stores (see _STREAM_BYTES)?"""
    return gx.numel() * gx.element_size() >= _STREAM_BYTES


def _blocks(items: int) -> int:
    return max(1, min(items, _BLOCKS_PER_THREAD * engine_threads()))


def _window_ok(out: int, size: int, k: int, s: int, pad: int, dil: int) -> np.ndarray:
    """Per output position along one axis: does its window hold an input element?"""
    taps = np.arange(out)[:, None] * s - pad + np.arange(k)[None, :] * dil
    return ((taps >= 0) & (taps < size)).any(axis=1)


def _planes(t: torch.Tensor) -> np.ndarray:
    h, w = t.shape[-2:]
    return t.detach().contiguous().numpy().reshape(-1, h, w)


_MODES = {"none": NO_INDICES, "flat": FLAT_INDICES, "window": WINDOW_INDICES}


@float32_for_half
def max_pool2d_forward(x: torch.Tensor, params: Pool2dParams, indices: str = "flat"):
    """x (N, C, H, W) -> (output (N, C, Ho, Wo), indices (N, C, Ho, Wo) or None).

    ``indices``: "flat" gives the argmax as int64 into H*W (``return_indices``); "window" as
    its tap number in the window, row-major (``params.window_index_dtype``: what the gradient
    needs, at an eighth of the memory traffic); "none" computes no indices.
    """
    mode = _MODES[indices]
    n, c, h, w = x.shape
    ho, wo = params.output_hw((h, w))
    y = _runtime.empty((n, c, ho, wo), x.dtype)
    idx_dtype = params.window_index_dtype if mode == WINDOW_INDICES else torch.int64
    # Without indices, a (1, 1, Ho, Wo) dummy keeps the kernel's row views valid; never read.
    idx = _runtime.empty((n, c, ho, wo) if mode != NO_INDICES else (1, 1, ho, wo), idx_dtype)
    if y.numel():
        with parallel_region(n * c * ho):
            xn = _planes(x)
            lowest = -np.inf if x.dtype.is_floating_point else np.iinfo(xn.dtype).min
            y3, idx3 = y.numpy().reshape(-1, ho, wo), idx.numpy().reshape(-1, *idx.shape[2:])
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (params.kernel, params.stride,
                                                      params.padding, params.dilation)
            if mode != FLAT_INDICES and kw in (2, 3) and sw in (1, 2) and dw == 1:
                _max_forward_pairs(xn, y3, idx3, mode, _blocks(n * c * ho), kh, kw, sh, sw, ph,
                                   pw, dh, _edge_windows(kw, sw, pw, w, wo))
            else:
                _max_forward(xn, y3, idx3, mode, xn.dtype.type(lowest), _blocks(n * c * ho),
                             kh, kw, sh, sw, ph, pw, dh, dw)
    return y, idx if mode != NO_INDICES else None


def _windows_ok(input_shape, out_hw, params: Pool2dParams):
    h, w = input_shape[-2:]
    return (_window_ok(out_hw[0], h, params.kernel[0], params.stride[0], params.padding[0],
                       params.dilation[0]),
            _window_ok(out_hw[1], w, params.kernel[1], params.stride[1], params.padding[1],
                       params.dilation[1]))


def _window_taps(params: Pool2dParams):
    """(tap_rows, tap_cols): tap t of a window sits this many rows and columns from its
    window's top-left corner."""
    kh, kw = params.kernel
    t = np.arange(kh * kw, dtype=np.int64)
    return (t // kw) * params.dilation[0], (t % kw) * params.dilation[1]


def _check_indices(bad: np.ndarray, op: str, window: bool) -> None:
    if bad.any():
        raise bad_pool_indices(op, window)


@float32_for_half
def max_pool2d_backward(grad_out: torch.Tensor, indices: torch.Tensor, input_shape,
                        params: Pool2dParams, check_indices: bool = True) -> torch.Tensor:
    """grad_out (N, C, Ho, Wo) and indices (N, C, Ho, Wo), flat (int64) or window ones ->
    grad_input (N, C, H, W). Indices naming no input element raise, but for window indices
    with ``check_indices`` False (for the forward's own): the gather kernels take no address
    from them, so an index naming no input element may give a wrong gradient but reads and
    writes nothing outside the operands. The scatter checks each index as it writes."""
    n, c, h, w = input_shape
    gx = _runtime.empty(tuple(input_shape), grad_out.dtype)
    if gx.numel():
        bad = np.zeros(n * c, dtype=np.uint8)
        window = indices.dtype != torch.int64
        gy3, idx3, gx3 = _planes(grad_out), _planes(indices), gx.numpy().reshape(-1, h, w)
        windows_ok = _windows_ok(input_shape, grad_out.shape[-2:], params)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (params.kernel, params.stride, params.padding,
                                                  params.dilation)
        if window and (sh == sw == 1 or (kw in (2, 3) and sw == 2 and dw == 1 and dh == 1
                                         and kh <= 2 * sh)):
            if check_indices:
                with parallel_region(n * c):
                    _bad_window_codes(idx3, h, w, kh, kw, sh, sw, ph, pw, dh, dw,
                                      *_window_taps(params), *windows_ok, bad)
                _check_indices(bad, "max_pool2d_backward", window)
            with parallel_region(n * c * h):
                if sh == sw == 1:
                    _max_backward_s1(gy3, idx3, gx3, _blocks(n * c * h), kh, kw, ph, pw, dh, dw)
                else:
                    _max_backward_pairs(gy3, idx3, gx3, _blocks(n * c * h), kh, kw, sh, ph, pw,
                                        dh, _streamed(gx))
        else:
            with parallel_region(n * c):
                _max_backward(gy3, idx3, gx3, window, *_window_taps(params), sh, sw, ph, pw,
                              *windows_ok, bad)
            _check_indices(bad, "max_pool2d_backward", window)
    return gx


@float32_for_half
def max_pool2d_double_backward(grad_grad_input: torch.Tensor, indices: torch.Tensor,
                               params: Pool2dParams) -> torch.Tensor:
    """grad_grad_input (N, C, H, W), indices (N, C, Ho, Wo) -> (N, C, Ho, Wo): the gradient
    of max_pool2d_backward with respect to its grad_out (a gather at the argmax)."""
    n, c, h, w = grad_grad_input.shape
    ho, wo = indices.shape[-2:]
    out = _runtime.empty((n, c, ho, wo), grad_grad_input.dtype)
    if out.numel():
        bad = np.zeros(n * c, dtype=np.uint8)
        window = indices.dtype != torch.int64
        with parallel_region(n * c):
            _max_double_backward(_planes(grad_grad_input), _planes(indices),
                                 out.numpy().reshape(-1, ho, wo), window, *_window_taps(params),
                                 *params.stride, *params.padding,
                                 *_windows_ok((h, w), (ho, wo), params), bad)
        _check_indices(bad, "max_pool2d_double_backward", window)
    return out


@float32_for_half
def avg_pool2d_forward(x: torch.Tensor, params: Pool2dParams, count_include_pad: bool,
                       divisor_override: int | None) -> torch.Tensor:
    """x (N, C, H, W) -> (N, C, Ho, Wo)."""
    n, c, h, w = x.shape
    ho, wo = params.output_hw((h, w))
    y = _runtime.empty((n, c, ho, wo), x.dtype)
    if y.numel():
        factors = _avg_divisor_factors(x.shape, (ho, wo), params, count_include_pad,
                                       divisor_override, y.numpy().dtype)
        with parallel_region(n * c * ho):
            if params.kernel == params.stride == (2, 2):
                _avg_forward_2x2(_planes(x), y.numpy().reshape(-1, ho, wo), _blocks(n * c * ho),
                                 *params.padding, *factors)
            else:
                _avg_forward(_planes(x), y.numpy().reshape(-1, ho, wo), _blocks(n * c * ho),
                             *params.kernel, *params.stride, *params.padding, *factors)
    return y


@float32_for_half
def avg_pool2d_backward(grad_out: torch.Tensor, input_shape, params: Pool2dParams,
                        count_include_pad: bool, divisor_override: int | None) -> torch.Tensor:
    """grad_out (N, C, Ho, Wo) -> grad_input (N, C, H, W)."""
    n, c, h, w = input_shape
    gx = _runtime.empty(tuple(input_shape), grad_out.dtype)
    if gx.numel():
        factors = _avg_divisor_factors(input_shape, grad_out.shape[-2:], params,
                                       count_include_pad, divisor_override, gx.numpy().dtype)
        with parallel_region(n * c * h):
            if params.kernel == params.stride == (2, 2):
                _avg_backward_2x2(_planes(grad_out), gx.numpy().reshape(-1, h, w),
                                  _blocks(n * c * h), *params.padding, *factors,
                                  _streamed(gx))
            else:
                _avg_backward(_planes(grad_out), gx.numpy().reshape(-1, h, w),
                              _blocks(n * c * h), *params.kernel, *params.stride,
                              *params.padding, *factors)
    return gx
