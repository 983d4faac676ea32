"""conv2d on the GPU: launchers for ``kernels/conv2d.cu``.

Same entry points and arguments as ``fastconv.cpu.conv2d``; the autograd Function picks the
engine by device. Shapes are validated before these run (``fastconv._args``).

Algorithm per call:
- depthwise (one input channel per group, which includes any conv with C_in == 1): direct
  kernels, one thread per output (forward) or input (grad of input, with one output channel
  per group) element, and one block per weight element for the grad of weight;
- any other grad of input with at most 8 input channels per group: a direct kernel, one
  thread per input pixel holding all of its channels (a GEMM's M would be those few channels);
- otherwise an implicit GEMM (see the table at the top of conv2d.cu); a 1x1 kernel with unit
  stride and no padding takes the Pointwise variant, a plain tiled GEMM. float32 and float64
  run on CUDA cores in their own precision (no TF32), float16 and bfloat16 on tensor cores
  with fp32 accumulation.
"""

from __future__ import annotations

import numpy as np
import torch

from .._args import Conv2dParams
from . import _launch as L

GEOMETRY = np.dtype([(name, np.int32) for name in (
    "n", "c_in", "h", "w", "c_out", "ho", "wo", "kh", "kw", "sh", "sw", "pt", "pl", "dh", "dw",
    "groups", "cin_g", "cout_g", "splits", "group_base")])
assert GEOMETRY.itemsize == 80  # sizeof(ConvGeometry) in fastconv_common.cuh

# CUDA-core tiles (BM, BN, BK, TM, TN), 256 threads each: a default, a large tile for big
# GEMMs, and a short-and-wide one for layers with few output channels (LeNet, grad of input
# of thin layers).
SIMT_TILES = {"64x64": (64, 64, 16, 4, 4), "128x128": (128, 128, 8, 8, 8),
              "32x128": (32, 128, 16, 2, 8)}
# The tensor-core loop has one shape: 64x64 block tiles, K step 32, 2x2 warps of 32x32.
MMA_TILE = (64, 64, 32, 32, 32)
MMA_THREADS = 128
MMA_DTYPES = (torch.float16, torch.bfloat16)
# Accumulator blocks of conv2d_backward_input_direct (its CB): the grad of input of a layer with
# at most DIRECT_INPUT_MAX_CIN input channels per group takes the smallest block that holds them.
DIRECT_CHANNEL_BLOCKS = (1, 4, 8)
DIRECT_INPUT_MAX_CIN = DIRECT_CHANNEL_BLOCKS[-1]


def _tiles(dtype) -> dict:
    if dtype in MMA_DTYPES:
        return {"mma": MMA_TILE}
    if dtype == torch.float64:
        return {"64x64": SIMT_TILES["64x64"]}
    return SIMT_TILES


def _threads(tile) -> int:
    if tile == MMA_TILE:
        return MMA_THREADS
    bm, bn, _, tm, tn = tile
    return (bm // tm) * (bn // tn)


@L.register("conv2d")
def _instantiations(dtype):
    t = L.CTYPES[dtype]
    for index in L.INDEX_TYPES:
        for tile in _tiles(dtype).values():
            for pointwise in (False, True):
                yield L.expr("conv2d_forward_implicit_gemm", t, index, pointwise, *tile)
                yield L.expr("conv2d_backward_input_implicit_gemm", t, index, pointwise, *tile)
            yield L.expr("conv2d_backward_weight_implicit_gemm", t, index, *tile)
        yield L.expr("conv2d_backward_weight_reduce", t, index)
        yield L.expr("conv2d_backward_bias", t, index, L.THREADS)
        yield L.expr("conv2d_forward_depthwise", t, index)
        yield L.expr("conv2d_backward_input_depthwise", t, index)
        for block in DIRECT_CHANNEL_BLOCKS:
            yield L.expr("conv2d_backward_input_direct", t, index, block)
        yield L.expr("conv2d_backward_weight_depthwise", t, index, L.THREADS)


def _geometry(input_shape, weight_shape, params: Conv2dParams, out_hw) -> np.ndarray:
    n, c_in, h, w = input_shape
    c_out, cin_g, kh, kw = weight_shape
    top, _, left, _ = params.padding
    g = np.zeros(1, dtype=GEOMETRY)
    g[0] = (n, c_in, h, w, c_out, out_hw[0], out_hw[1], kh, kw, *params.stride, top, left,
            *params.dilation, params.groups, cin_g, c_out // params.groups, 1, 0)
    return g


def _is_depthwise(weight_shape) -> bool:
    return weight_shape[1] == 1


def _is_pointwise(params: Conv2dParams, weight_shape, in_hw, out_hw) -> bool:
    """1x1, stride 1, no padding and output as large as input: a plain GEMM. (conv_transpose2d's
    output_padding can make a gradient pass's input a row or column larger than its output.)"""
    return (tuple(weight_shape[2:]) == (1, 1) and params.stride == (1, 1)
            and params.padding == (0, 0, 0, 0) and tuple(in_hw) == tuple(out_hw))


def _pick_tile(like: torch.Tensor, m: int, n: int):
    tiles = _tiles(like.dtype)
    if len(tiles) == 1:
        return next(iter(tiles.values()))
    if m <= 32:
        return tiles["32x128"]
    # The big tile halves shared-memory traffic per FMA but needs enough tiles to fill the GPU.
    if m >= 128 and -(-m // 128) * -(-n // 128) >= 2 * L.sm_count(like):
        return tiles["128x128"]
    return tiles["64x64"]


def _launch_gemm(kernel: str, like, variant: tuple, m, n, groups, args, geom, tile=None,
                 splits: int = 1):
    """Launch one implicit-GEMM kernel over groups (and K splits), chunking grid.z.
    ``variant``: template arguments between the index type and the tile, e.g. (pointwise,)."""
    tile = tile or _pick_tile(like, m, n)
    bm, bn = tile[0], tile[1]
    name = L.expr(kernel, L.CTYPES[like.dtype], L.index_type(*args), *variant, *tile)
    per_launch = max(1, 65535 // splits)
    for base in range(0, groups, per_launch):
        count = min(per_launch, groups - base)
        geom["group_base"] = base
        L.launch("conv2d", like, name, (-(-n // bn), -(-m // bm), count * splits),
                 (_threads(tile),), (*args, geom))


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


def _depthwise(kernel: str, out: torch.Tensor, args, template=()) -> torch.Tensor:
    """Run a direct depthwise kernel, one thread per element of ``out``."""
    name = L.expr(kernel, L.CTYPES[out.dtype], L.index_type(*args[:-1]), *template)
    L.launch_over("conv2d", out, name, out.numel(), args)
    return out


def conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   params: Conv2dParams) -> torch.Tensor:
    """x (N, C_in, H, W), weight (C_out, C_in/groups, kH, kW), bias (C_out,) or None
    -> (N, C_out, Ho, Wo)."""
    x, weight, bias = _contiguous(x, weight, bias)
    n, _, h, w = x.shape
    c_out = weight.shape[0]
    ho, wo = params.output_hw((h, w), tuple(weight.shape[2:]))
    y = L.empty((n, c_out, ho, wo), x)
    geom = _geometry(x.shape, weight.shape, params, (ho, wo))
    if _is_depthwise(weight.shape):
        return _depthwise("conv2d_forward_depthwise", y, (x, weight, bias, y, geom))
    _launch_gemm("conv2d_forward_implicit_gemm", x,
                 (_is_pointwise(params, weight.shape, (h, w), (ho, wo)),),
                 c_out // params.groups, n * ho * wo, params.groups, (x, weight, bias, y), geom)
    return y


def conv2d_backward_input(grad_out: torch.Tensor, weight: torch.Tensor, input_shape,
                          params: Conv2dParams) -> torch.Tensor:
    """grad_out (N, C_out, Ho, Wo), weight -> grad of input, shape ``input_shape``."""
    grad_out, weight = _contiguous(grad_out, weight)
    n, c_in, h, w = input_shape
    gx = L.empty(input_shape, grad_out)
    geom = _geometry(input_shape, weight.shape, params, grad_out.shape[2:])
    cin_g = weight.shape[1]
    if cin_g == 1 and weight.shape[0] == params.groups:  # depthwise, one output per group
        return _depthwise("conv2d_backward_input_depthwise", gx, (grad_out, weight, gx, geom))
    if cin_g <= DIRECT_INPUT_MAX_CIN:
        block = next(b for b in DIRECT_CHANNEL_BLOCKS if b >= cin_g)
        args = (grad_out, weight, gx, geom)
        name = L.expr("conv2d_backward_input_direct", L.CTYPES[gx.dtype],
                      L.index_type(*args[:-1]), block)
        L.launch_over("conv2d", gx, name, n * params.groups * h * w, args)  # a thread a pixel
        return gx
    _launch_gemm("conv2d_backward_input_implicit_gemm", gx,
                 (_is_pointwise(params, weight.shape, (h, w), tuple(grad_out.shape[2:])),),
                 c_in // params.groups, n * h * w, params.groups, (grad_out, weight, gx), geom)
    return gx


def _weight_splits(like: torch.Tensor, m: int, n: int, k: int, groups: int, tile) -> int:
    """K splits for the weight gradient: enough blocks to fill the device, each split at
    least 8 K steps long. A function of the shapes and the device only, so a given GPU
    sums in the same order every run."""
    blocks = -(-m // tile[0]) * -(-n // tile[1]) * groups
    want = -(-2 * L.sm_count(like) // blocks)
    most = max(1, k // (8 * tile[2]))
    return int(max(1, min(want, most, 64)))


def conv2d_backward_weight(grad_out: torch.Tensor, x: torch.Tensor, weight_shape,
                           params: Conv2dParams) -> torch.Tensor:
    """grad_out (N, C_out, Ho, Wo), x (N, C_in, H, W) -> grad of weight, ``weight_shape``."""
    grad_out, x = _contiguous(grad_out, x)
    n = x.shape[0]
    c_out, cin_g, kh, kw = weight_shape
    ho, wo = grad_out.shape[2:]
    gw = L.empty(weight_shape, x)
    geom = _geometry(x.shape, weight_shape, params, (ho, wo))
    t = L.CTYPES[x.dtype]
    if _is_depthwise(weight_shape):
        # One block per weight element, each reducing over the batch's output pixels.
        name = L.expr("conv2d_backward_weight_depthwise", t, L.index_type(x, grad_out),
                      L.THREADS)
        L.launch("conv2d", x, name, (gw.numel(),), (L.THREADS,), (grad_out, x, gw, geom))
        return gw
    groups = params.groups
    m, ncols, k = c_out // groups, cin_g * kh * kw, n * ho * wo
    tile = _pick_tile(x, m, ncols)
    splits = _weight_splits(x, m, ncols, k, groups, tile)
    geom["splits"] = splits
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = L.empty((splits, gw.numel()), x, acc) if splits > 1 else None
    args = (grad_out, x, gw, partial)
    _launch_gemm("conv2d_backward_weight_implicit_gemm", x, (), m, ncols, groups, args, geom,
                 tile, splits)
    if partial is not None:
        index = L.index_type(*args)
        L.launch_over("conv2d", gw, L.expr("conv2d_backward_weight_reduce", t, index),
                      gw.numel(), (partial, gw, L.index_scalar(index, gw.numel()),
                                   np.int32(splits)))
    return gw


def conv2d_backward_bias(grad_out: torch.Tensor) -> torch.Tensor:
    """grad_out (N, C_out, Ho, Wo) -> (C_out,), summed in a fixed order."""
    (grad_out,) = _contiguous(grad_out)
    n, c, ho, wo = grad_out.shape
    gb = L.empty((c,), grad_out)
    index = L.index_type(grad_out)
    # One block per channel: the block tree fixes the summation order.
    L.launch("conv2d", grad_out,
             L.expr("conv2d_backward_bias", L.CTYPES[grad_out.dtype], index, L.THREADS),
             (c,), (L.THREADS,),
             (grad_out, gb, np.int32(n), np.int32(c), L.index_scalar(index, ho * wo)))
    return gb
