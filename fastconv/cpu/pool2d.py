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
* Backward: one thread owns a whole plane and adds each output's gradient into it in output
  order, the order of PyTorch's own kernels. No element is written by two threads (no races,
  no atomics), and the summation order is fixed.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from .._args import ArgumentError, Pool2dParams
from . import _runtime
from ._runtime import engine_threads, float32_for_half, parallel_region
from ._window import col_range, first_tap

# Forward work is split into at most this many blocks per thread: enough to balance
# uneven blocks, few enough that per-block scratch allocation is negligible.
_BLOCKS_PER_THREAD = 64


@njit(cache=True, nogil=True)
def _phase_split(row, phases, sw):
    """phases[r, m] = row[m*sw + r]: strided taps become contiguous slices of one phase."""
    w = row.shape[0]
    if sw == 2:  # the common case, written out so LLVM vectorises the interleaved loads
        half = w // 2
        even, odd = phases[0], phases[1]
        for m in range(half):
            even[m] = row[2 * m]
            odd[m] = row[2 * m + 1]
        if w % 2:
            even[half] = row[w - 1]
    else:
        for r in range(sw):
            ph = phases[r]
            for m in range((w - r + sw - 1) // sw):
                ph[m] = row[m * sw + r]


@njit(cache=True, nogil=True)
def _tap(j, sw, pw, dw, w, wo):
    """Tap j of the windows of an output row: outputs ow in [lo, hi) read input column
    ``ow*sw - off``, which is ``row[ow - off]`` (sw == 1) or ``phases[r][ow + q]``."""
    off = pw - j * dw
    lo, hi = col_range(off, sw, w, wo)
    r = (-off) % sw
    return lo, hi, off, r, (-off - r) // sw


@njit(cache=True, nogil=True)
def _max_into(src, y):
    for k in range(y.shape[0]):
        v = src[k]
        c = y[k]
        y[k] = v if (v > c) | (v != v) else c


@njit(cache=True, nogil=True)
def _max_into_indexed(src, y, idx, first, step):
    """As _max_into; a winning tap also records its index ``first + k*step``."""
    for k in range(y.shape[0]):
        v = src[k]
        c = y[k]
        take = (v > c) | (v != v)
        y[k] = v if take else c
        idx[k] = first + k * step if take else idx[k]


@njit(cache=True, nogil=True)
def _first_taps(idx, ih0, w, wo, sw, pw, dw):
    """idx[ow] = flat index of the first valid tap of window ow in row ih0."""
    base = ih0 * w - pw
    for ow in range(wo):
        idx[ow] = base + ow * sw
    for ow in range(min(wo, (pw + sw - 1) // sw)):  # windows starting in the left padding
        idx[ow] = ih0 * w + first_tap(ow * sw - pw, dw)


@njit(cache=True, parallel=True)
def _max_forward(x3, y3, idx3, with_indices, lowest, blocks, kh, kw, sh, sw, ph, pw, dh, dw):
    """Max over each window; idx3 gets the argmax when ``with_indices``."""
    planes, h, w = x3.shape
    ho, wo = y3.shape[1], y3.shape[2]
    items = planes * ho
    for b in prange(blocks):
        phases = np.empty((sw, (w + sw - 1) // sw), dtype=x3.dtype)
        for item in range(b * items // blocks, (b + 1) * items // blocks):
            p = item // ho
            oh = item % ho
            y = y3[p, oh]
            y[:] = lowest
            hs = oh * sh - ph
            idx = idx3[p if with_indices else 0, oh]
            if with_indices:
                _first_taps(idx, first_tap(hs, dh), w, wo, sw, pw, dw)
            for i in range(kh):
                ih = hs + i * dh
                if ih < 0 or ih >= h:
                    continue
                row = x3[p, ih]
                if sw > 1:
                    _phase_split(row, phases, sw)
                for j in range(kw):
                    lo, hi, off, r, q = _tap(j, sw, pw, dw, w, wo)
                    # Two call sites rather than one on a merged array: each keeps its
                    # source's contiguous layout, which the vectoriser needs.
                    if with_indices:
                        first = ih * w - off + lo * sw
                        if sw == 1:
                            _max_into_indexed(row[lo - off:hi - off], y[lo:hi], idx[lo:hi],
                                              first, sw)
                        else:
                            _max_into_indexed(phases[r][lo + q:hi + q], y[lo:hi], idx[lo:hi],
                                              first, sw)
                    elif sw == 1:
                        _max_into(row[lo - off:hi - off], y[lo:hi])
                    else:
                        _max_into(phases[r][lo + q:hi + q], y[lo:hi])


@njit(cache=True, parallel=True)
def _max_backward(gy3, idx3, gx3, row_ok, col_ok, bad):
    """Per plane, in output order: gx[idx[oh, ow]] += gy[oh, ow], for the windows that hold
    at least one input element (``row_ok[oh] and col_ok[ow]``; a window wholly in the padding
    has no input element to send its gradient to). An index outside the plane (indices not
    made by max_pool2d) is skipped and flagged in ``bad[plane]``, never written through."""
    planes, h, w = gx3.shape
    ho, wo = gy3.shape[1], gy3.shape[2]
    for p in prange(planes):
        gx = gx3[p].reshape(h * w)
        gx[:] = 0
        for oh in range(ho):
            if not row_ok[oh]:
                continue
            gy = gy3[p, oh]
            idx = idx3[p, oh]
            for ow in range(wo):
                i = idx[ow]
                if col_ok[ow]:
                    if i < 0 or i >= h * w:
                        bad[p] = 1
                    else:
                        gx[i] += gy[ow]


@njit(cache=True, parallel=True)
def _max_double_backward(ggx3, idx3, ggy3, row_ok, col_ok, bad):
    """The adjoint of ``_max_backward``: ggy[oh, ow] = ggx[idx[oh, ow]] for the windows that
    hold an input element, else 0."""
    planes, h, w = ggx3.shape
    ho, wo = ggy3.shape[1], ggy3.shape[2]
    for p in prange(planes):
        ggx = ggx3[p].reshape(h * w)
        for oh in range(ho):
            out = ggy3[p, oh]
            idx = idx3[p, oh]
            for ow in range(wo):
                i = idx[ow]
                if not (row_ok[oh] and col_ok[ow]):
                    out[ow] = 0
                elif i < 0 or i >= h * w:
                    bad[p] = 1
                    out[ow] = 0
                else:
                    out[ow] = ggx[i]


@njit(cache=True, nogil=True)
def _avg_divisor(oh, ow, h, w, kh, kw, sh, sw, ph, pw, count_include_pad, divisor):
    """PyTorch's divisor: override, else the window clipped to the padded input (with padding)
    or to the input (without)."""
    if divisor > 0:
        return divisor
    hs = oh * sh - ph
    ws = ow * sw - pw
    he = min(hs + kh, h + ph)
    we = min(ws + kw, w + pw)
    if count_include_pad:
        return (he - hs) * (we - ws)
    return (min(he, h) - max(hs, 0)) * (min(we, w) - max(ws, 0))


@njit(cache=True, nogil=True)
def _avg_divisors(divs, oh, h, w, kh, kw, sh, sw, ph, pw, count_include_pad, divisor):
    """Fill divs (the data's dtype) with output row oh's divisors: float32 data must divide in
    float32, as PyTorch does (float32 / int64 would compute in float64 in Numba)."""
    for ow in range(divs.shape[0]):
        divs[ow] = _avg_divisor(oh, ow, h, w, kh, kw, sh, sw, ph, pw, count_include_pad, divisor)


@njit(cache=True, nogil=True)
def _add_into(src, y):
    for k in range(y.shape[0]):
        y[k] += src[k]


@njit(cache=True, parallel=True, error_model="numpy")
def _avg_forward(x3, y3, blocks, kh, kw, sh, sw, ph, pw, count_include_pad, divisor):
    planes, h, w = x3.shape
    ho, wo = y3.shape[1], y3.shape[2]
    items = planes * ho
    for b in prange(blocks):
        phases = np.empty((sw, (w + sw - 1) // sw), dtype=x3.dtype)
        divs = np.empty(wo, dtype=y3.dtype)
        for item in range(b * items // blocks, (b + 1) * items // blocks):
            p = item // ho
            oh = item % ho
            y = y3[p, oh]
            y[:] = 0
            hs = oh * sh - ph
            for i in range(kh):
                ih = hs + i
                if ih < 0 or ih >= h:
                    continue
                row = x3[p, ih]
                if sw > 1:
                    _phase_split(row, phases, sw)
                for j in range(kw):
                    lo, hi, off, r, q = _tap(j, sw, pw, 1, w, wo)
                    if sw == 1:
                        _add_into(row[lo - off:hi - off], y[lo:hi])
                    else:
                        _add_into(phases[r][lo + q:hi + q], y[lo:hi])
            _avg_divisors(divs, oh, h, w, kh, kw, sh, sw, ph, pw, count_include_pad, divisor)
            for ow in range(wo):
                y[ow] /= divs[ow]


@njit(cache=True, parallel=True, error_model="numpy")
def _avg_backward(gy3, gx3, kh, kw, sh, sw, ph, pw, count_include_pad, divisor):
    """Per plane, in output order: every input element of window (oh, ow) gets
    gy[oh, ow] / divisor added."""
    planes, h, w = gx3.shape
    ho, wo = gy3.shape[1], gy3.shape[2]
    for p in prange(planes):
        gx = gx3[p]
        gx[:] = 0
        g = np.empty(wo, dtype=gx3.dtype)
        for oh in range(ho):
            _avg_divisors(g, oh, h, w, kh, kw, sh, sw, ph, pw, count_include_pad, divisor)
            gy = gy3[p, oh]
            for ow in range(wo):
                g[ow] = gy[ow] / g[ow]
            hs = oh * sh - ph
            ih0, ih1 = max(hs, 0), min(hs + kh, h)
            for ow in range(wo):
                ws = ow * sw - pw
                iw0, iw1 = max(ws, 0), min(ws + kw, w)
                for ih in range(ih0, ih1):
                    row = gx[ih]
                    for iw in range(iw0, iw1):
                        row[iw] += g[ow]


def _blocks(items: int) -> int:
    return max(1, min(items, _BLOCKS_PER_THREAD * engine_threads()))


def _window_ok(out: int, size: int, k: int, s: int, pad: int, dil: int) -> np.ndarray:
    """Per output position along one axis: does its window hold an input element?"""
    taps = np.arange(out)[:, None] * s - pad + np.arange(k)[None, :] * dil
    return ((taps >= 0) & (taps < size)).any(axis=1)


def _planes(t: torch.Tensor) -> np.ndarray:
    h, w = t.shape[-2:]
    return t.detach().contiguous().numpy().reshape(-1, h, w)


@float32_for_half
def max_pool2d_forward(x: torch.Tensor, params: Pool2dParams, with_indices: bool = True):
    """x (N, C, H, W) -> (output (N, C, Ho, Wo), indices int64 (N, C, Ho, Wo) into H*W).

    Without ``with_indices`` the indices are not computed (None): a third less memory traffic.
    """
    n, c, h, w = x.shape
    ho, wo = params.output_hw((h, w))
    y = _runtime.empty((n, c, ho, wo), x.dtype)
    # Without indices, a (1, 1, Ho, Wo) dummy keeps the kernel's row views valid; never read.
    idx = _runtime.empty((n, c, ho, wo) if with_indices else (1, 1, ho, wo), torch.int64)
    if y.numel():
        with parallel_region(n * c * ho):
            xn = _planes(x)
            lowest = -np.inf if x.dtype.is_floating_point else np.iinfo(xn.dtype).min
            _max_forward(xn, y.numpy().reshape(-1, ho, wo), idx.numpy().reshape(-1, *idx.shape[2:]),
                         with_indices, xn.dtype.type(lowest), _blocks(n * c * ho),
                         *params.kernel, *params.stride, *params.padding, *params.dilation)
    return y, idx if with_indices else None


def _windows_ok(input_shape, out_hw, params: Pool2dParams):
    h, w = input_shape[-2:]
    return (_window_ok(out_hw[0], h, params.kernel[0], params.stride[0], params.padding[0],
                       params.dilation[0]),
            _window_ok(out_hw[1], w, params.kernel[1], params.stride[1], params.padding[1],
                       params.dilation[1]))


def _check_indices(bad: np.ndarray, op: str) -> None:
    if bad.any():
        raise ArgumentError(f"{op}: indices hold values outside [0, H*W) of the input plane; "
                            f"pass the indices max_pool2d returned")


@float32_for_half
def max_pool2d_backward(grad_out: torch.Tensor, indices: torch.Tensor, input_shape,
                        params: Pool2dParams) -> torch.Tensor:
    """grad_out and indices (N, C, Ho, Wo) -> grad_input (N, C, H, W)."""
    n, c, h, w = input_shape
    gx = _runtime.empty(tuple(input_shape), grad_out.dtype)
    if gx.numel():
        bad = np.zeros(n * c, dtype=np.uint8)
        with parallel_region(n * c):
            _max_backward(_planes(grad_out), _planes(indices), gx.numpy().reshape(-1, h, w),
                          *_windows_ok(input_shape, grad_out.shape[-2:], params), bad)
        _check_indices(bad, "max_pool2d_backward")
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
        with parallel_region(n * c):
            _max_double_backward(_planes(grad_grad_input), _planes(indices),
                                 out.numpy().reshape(-1, ho, wo),
                                 *_windows_ok((h, w), (ho, wo), params), bad)
        _check_indices(bad, "max_pool2d_double_backward")
    return out


@float32_for_half
def avg_pool2d_forward(x: torch.Tensor, params: Pool2dParams, count_include_pad: bool,
                       divisor_override: int | None) -> torch.Tensor:
    """x (N, C, H, W) -> (N, C, Ho, Wo)."""
    n, c, h, w = x.shape
    ho, wo = params.output_hw((h, w))
    y = _runtime.empty((n, c, ho, wo), x.dtype)
    if y.numel():
        with parallel_region(n * c * ho):
            _avg_forward(_planes(x), y.numpy().reshape(-1, ho, wo), _blocks(n * c * ho),
                         *params.kernel, *params.stride, *params.padding, count_include_pad,
                         divisor_override or 0)
    return y


@float32_for_half
def avg_pool2d_backward(grad_out: torch.Tensor, input_shape, params: Pool2dParams,
                        count_include_pad: bool, divisor_override: int | None) -> torch.Tensor:
    """grad_out (N, C, Ho, Wo) -> grad_input (N, C, H, W)."""
    n, c, h, w = input_shape
    gx = _runtime.empty(tuple(input_shape), grad_out.dtype)
    if gx.numel():
        with parallel_region(n * c):
            _avg_backward(_planes(grad_out), gx.numpy().reshape(-1, h, w), *params.kernel,
                          *params.stride, *params.padding, count_include_pad,
                          divisor_override or 0)
    return gx
