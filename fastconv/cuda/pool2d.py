"""max_pool2d and avg_pool2d on the GPU: launchers for ``kernels/pool2d.cu``.

Same entry points and arguments as ``fastconv.cpu.pool2d``. Forward runs one thread per output
element, backward one thread per input element gathering from the windows that cover it (in
output order, as PyTorch's CUDA kernels sum), so backward has no atomics and is bitwise
reproducible.
"""

from __future__ import annotations

import numpy as np
import torch

from .._args import Pool2dParams, bad_pool_indices
from . import _launch as L

GEOMETRY = np.dtype([(name, np.int32) for name in (
    "planes", "h", "w", "ho", "wo", "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw",
    "count_include_pad", "divisor")])
assert GEOMETRY.itemsize == 60  # sizeof(PoolGeometry) in fastconv_common.cuh


# How each kind of argmax is stored (see ArgKind in pool2d.cu): none, flat int64 into H*W, or
# the winning tap's number within its window.
_ARG_TYPES = {None: "void", torch.int64: "long long", torch.uint8: "unsigned char",
              torch.int32: "int"}


@L.register("pool2d")
def _instantiations(dtype):
    t = L.CTYPES[dtype]
    for index in L.INDEX_TYPES:
        for arg in _ARG_TYPES.values():
            if arg != "void":
                yield L.expr("max_pool2d_bad_indices", t, index, arg)
                yield L.expr("max_pool2d_backward", t, index, arg)
                yield L.expr("max_pool2d_double_backward", t, index, arg)
            yield L.expr("max_pool2d_forward", t, index, arg)
        yield L.expr("avg_pool2d_forward", t, index)
        yield L.expr("avg_pool2d_backward", t, index)


def _geometry(input_shape, out_hw, params: Pool2dParams, count_include_pad=True,
              divisor=None) -> np.ndarray:
    n, c, h, w = input_shape
    g = np.zeros(1, dtype=GEOMETRY)
    g[0] = (n * c, h, w, *out_hw, *params.kernel, *params.stride, *params.padding,
            *params.dilation, int(count_include_pad), divisor or 0)
    return g


def _run(name: str, out: torch.Tensor, args, template=()) -> torch.Tensor:
    """Launch a grid-stride pooling kernel, one thread per element of ``out``."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    index = L.index_type(*tensors)
    L.launch_over("pool2d", out, L.expr(name, L.CTYPES[out.dtype], index, *template),
                  out.numel(), args)
    return out


def max_pool2d_forward(x: torch.Tensor, params: Pool2dParams, indices: str = "flat"):
    """x (N, C, H, W) -> (y, indices) of shape (N, C, Ho, Wo); ``indices`` "flat" (int64 into
    H*W), "window" (the winning tap's number in its window, ``params.window_index_dtype``) or
    "none" (None)."""
    x = x.contiguous()
    n, c, h, w = x.shape
    ho, wo = params.output_hw((h, w))
    y = L.empty((n, c, ho, wo), x)
    dtype = {"none": None, "flat": torch.int64, "window": params.window_index_dtype}[indices]
    idx = None if dtype is None else L.empty((n, c, ho, wo), x, dtype)
    _run("max_pool2d_forward", y, (x, y, idx, _geometry(x.shape, (ho, wo), params)),
         (_ARG_TYPES[dtype],))
    return y, idx


def _check_indices(indices: torch.Tensor, like: torch.Tensor, geometry: np.ndarray,
                   op: str) -> None:
    """Raise if ``indices`` (N, C, Ho, Wo) name no input element where a window holds one
    (see max_pool2d_bad_indices); ``like``, the gradient, picks the kernel module. Reads one
    flag back: a device sync."""
    bad = L.empty((1,), like, torch.int32).zero_()
    L.launch_over("pool2d", like, L.expr("max_pool2d_bad_indices", L.CTYPES[like.dtype],
                                         L.index_type(indices), _ARG_TYPES[indices.dtype]),
                  indices.numel(), (indices, bad, geometry))
    if bad.item():
        raise bad_pool_indices(op, indices.dtype != torch.int64)


def max_pool2d_backward(grad_out: torch.Tensor, indices: torch.Tensor, input_shape,
                        params: Pool2dParams, check_indices: bool = True) -> torch.Tensor:
    """grad_out and indices (N, C, Ho, Wo) -> grad of input, ``input_shape``. The kernel
    gathers, taking no address from the indices, so one naming no input element would just
    be skipped: they are checked first (a kernel and a sync), unless ``check_indices`` is
    False (for the forward's own, as max pooling's autograd formula passes them)."""
    grad_out, indices = grad_out.contiguous(), indices.contiguous()
    gx = L.empty(input_shape, grad_out)
    geometry = _geometry(input_shape, grad_out.shape[2:], params)
    if check_indices and indices.numel():
        _check_indices(indices, grad_out, geometry, "max_pool2d_backward")
    return _run("max_pool2d_backward", gx, (grad_out, indices, gx, geometry),
                (_ARG_TYPES[indices.dtype],))


def max_pool2d_double_backward(grad_grad_input: torch.Tensor, indices: torch.Tensor,
                               params: Pool2dParams) -> torch.Tensor:
    """grad_grad_input (N, C, H, W), indices (N, C, Ho, Wo) -> (N, C, Ho, Wo): the gradient of
    max_pool2d_backward with respect to its grad_out (a gather at the argmax). Indices naming
    no input element raise, as max_pool2d_backward's do."""
    ggx, indices = grad_grad_input.contiguous(), indices.contiguous()
    out = L.empty(tuple(indices.shape), ggx)
    geometry = _geometry(ggx.shape, indices.shape[2:], params)
    if indices.numel():
        _check_indices(indices, ggx, geometry, "max_pool2d_double_backward")
    return _run("max_pool2d_double_backward", out, (ggx, indices, out, geometry),
                (_ARG_TYPES[indices.dtype],))


def avg_pool2d_forward(x: torch.Tensor, params: Pool2dParams, count_include_pad: bool,
                       divisor_override: int | None) -> torch.Tensor:
    """x (N, C, H, W) -> (N, C, Ho, Wo)."""
    x = x.contiguous()
    n, c, h, w = x.shape
    ho, wo = params.output_hw((h, w))
    y = L.empty((n, c, ho, wo), x)
    geom = _geometry(x.shape, (ho, wo), params, count_include_pad, divisor_override)
    return _run("avg_pool2d_forward", y, (x, y, geom))


def avg_pool2d_backward(grad_out: torch.Tensor, input_shape, params: Pool2dParams,
                        count_include_pad: bool, divisor_override: int | None) -> torch.Tensor:
    """grad_out (N, C, Ho, Wo) -> grad of input, ``input_shape``."""
    grad_out = grad_out.contiguous()
    gx = L.empty(input_shape, grad_out)
    geom = _geometry(input_shape, grad_out.shape[2:], params, count_include_pad,
                     divisor_override)
    return _run("avg_pool2d_backward", gx, (grad_out, gx, geom))
