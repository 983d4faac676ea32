"""Window index math shared by the CPU kernels (conv2d's im2col and the pooling kernels).

A strided window's taps read every ``stride``-th input column. Split an input row into
``stride`` phase rows (``phase_split``) and each tap of a whole output row becomes one
contiguous run of one phase (``tap_table``): a vectorised loop instead of a strided gather
(the pooling kernels). ``phase_merge`` is the inverse, for gradients gathered per phase.
(conv2d splits whole planes into phases instead, for its wide im2col: see conv2d.py.)
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def col_range(off, sw, w, wo):
    """Output columns ``[lo, hi)`` whose input column ``ow*sw - off`` lies in ``[0, w)``.

    For kernel tap j, ``off = pad_left - j*dilation``.
    """
    lo = (off + sw - 1) // sw if off > 0 else 0
    hi = (w - 1 + off) // sw + 1 if w - 1 + off >= 0 else 0
    lo = min(lo, wo)
    return lo, min(max(hi, lo), wo)


@njit(cache=True, nogil=True)
def first_tap(start, dilation):
    """Smallest ``start + t*dilation >= 0`` (a window's first tap inside the input)."""
    if start >= 0:
        return start
    return start + ((-start + dilation - 1) // dilation) * dilation


@njit(cache=True, nogil=True)
def covering_rows(ih, kh, sh, ph, dh, ho):
    """Output rows ``[lo, hi)`` whose window spans input row ih:
    ``oh*sh - ph <= ih <= oh*sh - ph + (kh-1)*dh``."""
    return max(0, (ih + ph - (kh - 1) * dh + sh - 1) // sh), min(ho, (ih + ph) // sh + 1)


@njit(cache=True, nogil=True)
def cover_table(h, kh, sh, ph, dh, ho):
    """Per input row ih, the output rows whose window holds it, in order, and which kernel row
    it is in each: ``rows[ih, k], taps[ih, k]`` for k < ``count[ih]``. Computed once per
    call: a gradient kernel working per input row then does no integer division (an idiv
    per row and output row cost more than the row's vectorised work)."""
    count = np.zeros(h, dtype=np.int64)
    rows = np.empty((h, kh), dtype=np.int64)
    taps = np.empty((h, kh), dtype=np.int64)
    for oh in range(ho):
        for i in range(kh):
            ih = oh * sh - ph + i * dh
            if 0 <= ih < h:
                rows[ih, count[ih]] = oh
                taps[ih, count[ih]] = i
                count[ih] += 1
    return count, rows, taps


# Element loops instead of slice assignment: Numba's ``a[i:j] = b[k:l]`` checks the two for
# overlap and may copy through a temporary, which on a short row costs more than the work
# (measured on LeNet's 5x5 im2col copies, 150 rows of 136 per image: 0.46 ms per batch as
# slices, 0.10 as loops; copies now go through copy_at below).
@njit(cache=True, nogil=True)
def fill(dst, value):
    """dst[q] = value for every q (1-D)."""
    for q in range(dst.shape[0]):
        dst[q] = value


# The same at offsets into whole 1-D arrays, for loops that would otherwise make a view per
# row: each Numba view takes and drops a reference (two atomic calls into the runtime) and
# ``.ravel()`` calls a reshape helper, which on 136-element rows cost 2/3 of LeNet's im2col
# (150 copies per image: 3.9 us as views, 1.4 us at offsets). The offsets are the caller's
# own index math, non-negative by construction; the early return on a negative one is there
# so LLVM sees that and drops the wraparound test that would stop the vectoriser (a raise
# instead made the parallel kernels around it slower: LeNet conv1 forward 0.37 -> 0.46 ms).
# Inlined into the caller's IR: as a call it measured 30% slower on those short rows.
@njit(cache=True, nogil=True, inline="always")
def copy_at(dst, d0, src, s0, n):
    """dst[d0 + q] = src[s0 + q] for q < n (1-D, contiguous, no overlap; offsets >= 0)."""
    if d0 < 0 or s0 < 0:
        return
    for q in range(n):
        dst[d0 + q] = src[s0 + q]


@njit(cache=True, nogil=True, inline="always")
def add_at(dst, d0, src, s0, n):
    """dst[d0 + q] += src[s0 + q] for q < n (1-D, contiguous; no overlap; offsets >= 0)."""
    if d0 < 0 or s0 < 0:
        return
    for q in range(n):
        dst[d0 + q] += src[s0 + q]


@njit(cache=True, nogil=True, inline="always")
def fill_at(dst, d0, n, value):
    """dst[d0 + q] = value for q < n (1-D, contiguous; d0 >= 0)."""
    if d0 < 0:
        return
    for q in range(n):
        dst[d0 + q] = value


@njit(cache=True, nogil=True)
def front(buf, rows, cols):
    """C-contiguous (rows, cols) view of the first rows*cols elements of contiguous ``buf``:
    a scratch buffer sized for the largest chunk serves the shorter last one as is."""
    return buf.ravel()[:rows * cols].reshape(rows, cols)


# Unsigned offsets in the strided loops below and in pooling's: Numba wraps a negative int64
# index around, and LLVM cannot prove ``r0 + 2*m`` non-negative (Numba's arithmetic carries no
# no-overflow flags), so a signed index keeps a sign test per element and the loop becomes
# gathers (2x2/s2 average pooling: 2.4 ms as gathers, 0.5 ms with unsigned offsets, whose
# loads vectorise as interleaved ones). Mixing uint64 with int64 gives float64 in Numba, so
# every term of an unsigned index is uint64.
U64 = np.uint64
U1, U2 = U64(1), U64(2)


@njit(cache=True, nogil=True)
def phase_split(src, r0, w, phases, plen, sw):
    """phases[r*plen + m] = src[r0 + m*sw + r] for the w-element row at offset r0 of 1-D
    ``src`` (phase r of the row at offset r*plen of 1-D ``phases``, plen >= ceil(w / sw)):
    strided taps become contiguous runs of one phase."""
    row = U64(r0)
    if sw == 2:  # the common case, written out so LLVM vectorises the interleaved loads
        half = w // 2
        odd = U64(plen)
        for m in range(U64(half)):
            phases[m] = src[row + U2 * m]
            phases[odd + m] = src[row + U2 * m + U1]
        if w % 2:
            phases[half] = src[r0 + w - 1]
    else:
        for r in range(sw):
            for m in range((w - r + sw - 1) // sw):
                phases[r * plen + m] = src[r0 + m * sw + r]


@njit(cache=True, nogil=True)
def tap_table(kw, sw, pw, dw, w, wo):
    """Per tap j of the windows of an output row, (lo, hi, start, r): outputs ow in [lo, hi)
    read input column ``ow*sw - pw + j*dw``, which is element ``start + ow - lo`` of the row
    itself (sw == 1) or of its phase r (see phase_split). Computed once per call: the inner
    loops then do no integer division."""
    table = np.empty((kw, 4), dtype=np.int64)
    for j in range(kw):
        off = pw - j * dw
        lo, hi = col_range(off, sw, w, wo)
        r = (-off) % sw
        table[j, 0] = lo
        table[j, 1] = hi
        table[j, 2] = lo - off if sw == 1 else lo + (-off - r) // sw
        table[j, 3] = r
    return table


@njit(cache=True, nogil=True)
def phase_merge(phases, plen, dst, r0, w, sw):
    """The inverse of ``phase_split``: dst[r0 + m*sw + r] = phases[r*plen + m]."""
    row = U64(r0)
    if sw == 2:
        half = w // 2
        odd = U64(plen)
        for m in range(U64(half)):
            dst[row + U2 * m] = phases[m]
            dst[row + U2 * m + U1] = phases[odd + m]
        if w % 2:
            dst[r0 + w - 1] = phases[half]
    else:
        for r in range(sw):
            for m in range((w - r + sw - 1) // sw):
                dst[r0 + m * sw + r] = phases[r * plen + m]
