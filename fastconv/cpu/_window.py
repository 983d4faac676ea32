"""Window index math shared by the CPU kernels (conv2d's im2col and the pooling kernels)."""

from __future__ import annotations

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
def front(buf, rows, cols):
    """C-contiguous (rows, cols) view of the first rows*cols elements of contiguous ``buf``:
    a scratch buffer sized for the largest chunk serves the shorter last one as is."""
    return buf.ravel()[:rows * cols].reshape(rows, cols)
