"""max_pool2d and avg_pool2d on the CPU: Numba kernels, forward and backward.

Layout: planes x (P = N*C, H, W), contiguous. Work items are (plane, output row) forward and
(plane, input row) backward, so every item writes its own row: no races, and the result does
not depend on the thread count.

Order matches PyTorch's CPU kernels exactly, so results are bitwise equal to them:
* forward scans each window row-major (kernel row outer, column inner). The loops run tap by
  tap over a whole output row, which keeps the inner loop branch-free and vectorisable while
  each output element still sees its window in that order. Max: start from the dtype's lowest
  value at the window's first valid tap; a value wins if it is greater, or NaN (so NaN
  propagates and the index is the last NaN's). Avg: sum in that order, then divide.
* backward gathers: an input row collects, from every output whose window covers it, in output
  order, what PyTorch's scatter would add to it, in the same order.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from .._args import Pool2dParams
from ._runtime import parallel_region
from ._window import col_range, covering_rows, first_tap


@njit(cache=True, nogil=True)
def _tap_range(j, sw, pad, dil, w, wo):
    """Outputs ``[lo, hi)`` whose tap j reads a column inside [0, w), and the offset ``off``
    with input column ``ow*sw - off``."""
    off = pad - j * dil
    lo, hi = col_range(off, sw, w, wo)
    return lo, hi, off


@njit(cache=True, parallel=True)
def _max_forward(x3, y3, idx3, with_indices, lowest, kh, kw, sh, sw, ph, pw, dh, dw):
    """Max over each window; idx3 gets the argmax when ``with_indices``.

    Exactly PyTorch's rule, written without branches so the row loop vectorises: start from
    the dtype's lowest value and the window's first valid tap, then take each tap that is
    greater or NaN.
    """
    planes, h, w = x3.shape
    ho, wo = y3.shape[1], y3.shape[2]
    for item in prange(planes * ho):
        p = item // ho
        oh = item % ho
        y = y3[p, oh]
        y[:] = lowest
        hs = oh * sh - ph
        if with_indices:
            idx = idx3[p, oh]
            ih0 = first_tap(hs, dh)
            for ow in range(wo):
                idx[ow] = ih0 * w + first_tap(ow * sw - pw, dw)
        for i in range(kh):
            ih = hs + i * dh
            if ih < 0 or ih >= h:
                continue
            row = x3[p, ih]
            for j in range(kw):
                lo, hi, off = _tap_range(j, sw, pw, dw, w, wo)
                if with_indices:
                    base = ih * w - off
                    for ow in range(lo, hi):
                        v = row[ow * sw - off]
                        c = y[ow]
                        take = v > c or v != v
                        y[ow] = v if take else c
                        idx[ow] = base + ow * sw if take else idx[ow]
                else:
                    for ow in range(lo, hi):
                        v = row[ow * sw - off]
                        c = y[ow]
                        y[ow] = v if v > c or v != v else c


@njit(cache=True, parallel=True)
def _max_backward(gy3, idx3, gx3, kh, sh, ph, dh):
    """gx[ih, c] = sum of gy[oh, ow] over outputs (in order) whose argmax is (ih, c)."""
    planes, h, w = gx3.shape
    ho, wo = gy3.shape[1], gy3.shape[2]
    for item in prange(planes * h):
        p = item // h
        ih = item % h
        gx = gx3[p, ih]
        gx[:] = 0
        oh_lo, oh_hi = covering_rows(ih, kh, sh, ph, dh, ho)
        first = ih * w
        for oh in range(oh_lo, oh_hi):
            idx = idx3[p, oh]
            gy = gy3[p, oh]
            for ow in range(wo):
                r = idx[ow] - first
                if r >= 0 and r < w:
                    gx[r] += gy[ow]


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


@njit(cache=True, parallel=True, error_model="numpy")
def _avg_forward(x3, y3, kh, kw, sh, sw, ph, pw, count_include_pad, divisor):
    planes, h, w = x3.shape
    ho, wo = y3.shape[1], y3.shape[2]
    for item in prange(planes * ho):
        p = item // ho
        oh = item % ho
        y = y3[p, oh]
        y[:] = 0
        divs = np.empty(wo, dtype=y3.dtype)
        _avg_divisors(divs, oh, h, w, kh, kw, sh, sw, ph, pw, count_include_pad, divisor)
        hs = oh * sh - ph
        for i in range(kh):
            ih = hs + i
            if ih < 0 or ih >= h:
                continue
            row = x3[p, ih]
            for j in range(kw):
                lo, hi, off = _tap_range(j, sw, pw, 1, w, wo)
                for ow in range(lo, hi):
                    y[ow] += row[ow * sw - off]
        for ow in range(wo):
            y[ow] /= divs[ow]


@njit(cache=True, parallel=True, error_model="numpy")
def _avg_backward(gy3, gx3, kh, kw, sh, sw, ph, pw, count_include_pad, divisor):
    """gx[ih, iw] = sum over covering outputs, in output order, of gy / divisor."""
    planes, h, w = gx3.shape
    ho, wo = gy3.shape[1], gy3.shape[2]
    for item in prange(planes * h):
        p = item // h
        ih = item % h
        gx = gx3[p, ih]
        gx[:] = 0
        oh_lo, oh_hi = covering_rows(ih, kh, sh, ph, 1, ho)
        divs = np.empty(wo, dtype=gx3.dtype)
        for oh in range(oh_lo, oh_hi):
            gy = gy3[p, oh]
            _avg_divisors(divs, oh, h, w, kh, kw, sh, sw, ph, pw, count_include_pad, divisor)
            for ow in range(wo):
                g = gy[ow] / divs[ow]
                ws = ow * sw - pw
                for iw in range(max(ws, 0), min(ws + kw, w)):
                    gx[iw] += g


def _planes(t: torch.Tensor) -> np.ndarray:
    h, w = t.shape[-2:]
    return t.detach().contiguous().numpy().reshape(-1, h, w)


def max_pool2d_forward(x: torch.Tensor, params: Pool2dParams, with_indices: bool = True):
    """x (N, C, H, W) -> (output (N, C, Ho, Wo), indices int64 (N, C, Ho, Wo) into H*W).

    Without ``with_indices`` the indices are not computed (None): a third less memory traffic.
    """
    n, c, h, w = x.shape
    ho, wo = params.output_hw((h, w))
    y = torch.empty((n, c, ho, wo), dtype=x.dtype)
    idx = torch.empty((n, c, ho, wo) if with_indices else (1, 1, 1, 1), dtype=torch.int64)
    if y.numel():
        with parallel_region(n * c * ho):
            xn = _planes(x)
            lowest = -np.inf if x.dtype.is_floating_point else np.iinfo(xn.dtype).min
            _max_forward(xn, y.numpy().reshape(-1, ho, wo), idx.numpy().reshape(-1, *idx.shape[2:]),
                         with_indices, xn.dtype.type(lowest), *params.kernel, *params.stride,
                         *params.padding, *params.dilation)
    return y, idx if with_indices else None


def max_pool2d_backward(grad_out: torch.Tensor, indices: torch.Tensor, input_shape,
                        params: Pool2dParams) -> torch.Tensor:
    """grad_out and indices (N, C, Ho, Wo) -> grad_input (N, C, H, W)."""
    n, c, h, w = input_shape
    gx = torch.empty(tuple(input_shape), dtype=grad_out.dtype)
    if gx.numel():
        with parallel_region(n * c * h):
            _max_backward(_planes(grad_out), _planes(indices), gx.numpy().reshape(-1, h, w),
                          params.kernel[0], params.stride[0], params.padding[0],
                          params.dilation[0])
    return gx


def avg_pool2d_forward(x: torch.Tensor, params: Pool2dParams, count_include_pad: bool,
                       divisor_override: int | None) -> torch.Tensor:
    """x (N, C, H, W) -> (N, C, Ho, Wo)."""
    n, c, h, w = x.shape
    ho, wo = params.output_hw((h, w))
    y = torch.empty((n, c, ho, wo), dtype=x.dtype)
    if y.numel():
        with parallel_region(n * c * ho):
            _avg_forward(_planes(x), y.numpy().reshape(-1, ho, wo), *params.kernel,
                         *params.stride, *params.padding, count_include_pad,
                         divisor_override or 0)
    return y


def avg_pool2d_backward(grad_out: torch.Tensor, input_shape, params: Pool2dParams,
                        count_include_pad: bool, divisor_override: int | None) -> torch.Tensor:
    """grad_out (N, C, Ho, Wo) -> grad_input (N, C, H, W)."""
    n, c, h, w = input_shape
    gx = torch.empty(tuple(input_shape), dtype=grad_out.dtype)
    if gx.numel():
        with parallel_region(n * c * h):
            _avg_backward(_planes(grad_out), gx.numpy().reshape(-1, h, w), *params.kernel,
                          *params.stride, *params.padding, count_include_pad,
                          divisor_override or 0)
    return gx
