"""max_pool2d and avg_pool2d: autograd Functions over the engines, and the functional API."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._args import ArgumentError, Pool2dParams, check_pool2d, pool2d_params
from .._profiling import op_range
from ._engine import engine_for


class MaxPool2dFunction(torch.autograd.Function):
    """Batched max pooling; returns (output, indices). Saves only the indices."""

    @staticmethod
    def forward(input, params: Pool2dParams):
        engine = engine_for(input, "max_pool2d").pool2d
        with op_range("fastconv.max_pool2d.forward", input):
            return engine.max_pool2d_forward(input, params)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, params = inputs
        ctx.params = params
        ctx.input_shape = tuple(input.shape)
        indices = output[1]
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices if ctx.needs_input_grad[0] else None)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_indices):
        (indices,) = ctx.saved_tensors
        engine = engine_for(grad_out, "max_pool2d").pool2d
        with op_range("fastconv.max_pool2d.backward", grad_out):
            grad = engine.max_pool2d_backward(grad_out, indices, ctx.input_shape, ctx.params)
        return grad, None


class AvgPool2dFunction(torch.autograd.Function):
    """Batched average pooling. Backward needs only shapes and options: nothing is saved."""

    @staticmethod
    def forward(input, params: Pool2dParams, count_include_pad: bool, divisor_override):
        engine = engine_for(input, "avg_pool2d").pool2d
        with op_range("fastconv.avg_pool2d.forward", input):
            return engine.avg_pool2d_forward(input, params, count_include_pad, divisor_override)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, params, count_include_pad, divisor_override = inputs
        ctx.params = params
        ctx.input_shape = tuple(input.shape)
        ctx.options = (count_include_pad, divisor_override)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        engine = engine_for(grad_out, "avg_pool2d").pool2d
        with op_range("fastconv.avg_pool2d.backward", grad_out):
            grad = engine.avg_pool2d_backward(grad_out, ctx.input_shape, ctx.params, *ctx.options)
        return grad, None, None, None


def _batched(fn, input, *args):
    """Run a batched Function on (N, C, H, W) or unbatched (C, H, W) input."""
    if input.dim() == 4:
        return fn(input, *args)
    out = fn(input.unsqueeze(0), *args)
    return tuple(o.squeeze(0) for o in out) if isinstance(out, tuple) else out.squeeze(0)


def max_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
               ceil_mode: bool = False, return_indices: bool = False):
    """2-D max pooling with the semantics of ``torch.nn.functional.max_pool2d``.

    Args:
        input: (N, C, H, W) or unbatched (C, H, W); float32/float64, or an integer dtype.
        kernel_size, stride (default: kernel_size), padding, dilation: int or (h, w) pairs.
            Padding (implicit -inf) may be at most half of ``dilation*(kernel_size-1)+1``.
        ceil_mode: round the output size up; the last window must start inside the input
            or the left/top padding.
        return_indices: also return the argmax of each window as an int64 index into the
            flattened H*W plane, as ``torch.nn.functional.max_unpool2d`` expects.

    NaN propagates: a window holding NaN outputs NaN (its index is the last NaN's).
    Returns (N, C, Ho, Wo), or ``(output, indices)``.
    """
    params = pool2d_params(kernel_size, stride, padding, dilation, ceil_mode, op="max_pool2d")
    check_pool2d(input, params, "max_pool2d", integers=True)
    if not return_indices and not (input.requires_grad and torch.is_grad_enabled()):
        # Inference: no autograd node, and no indices to write.
        engine = engine_for(input, "max_pool2d").pool2d
        with op_range("fastconv.max_pool2d.forward", input):
            return _batched(lambda x: engine.max_pool2d_forward(x, params, with_indices=False)[0],
                            input)
    output, indices = _batched(MaxPool2dFunction.apply, input, params)
    return (output, indices) if return_indices else output


def avg_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: int | None = None):
    """2-D average pooling with the semantics of ``torch.nn.functional.avg_pool2d``.

    Args:
        input: (N, C, H, W) or unbatched (C, H, W); float32 or float64.
        kernel_size, stride (default: kernel_size), padding: int or (h, w) pairs; padding is
            zeros, at most half the kernel size.
        ceil_mode: round the output size up (see ``max_pool2d``).
        count_include_pad: divide by the window size counting padding (but not the part of a
            ceil-mode window beyond the padding); if False, by the number of input elements.
        divisor_override: divide every window by this instead.

    Returns (N, C, Ho, Wo) or (C, Ho, Wo).
    """
    params = pool2d_params(kernel_size, stride, padding, 1, ceil_mode, op="avg_pool2d")
    if divisor_override is not None and (isinstance(divisor_override, bool)
                                         or not isinstance(divisor_override, int)
                                         or divisor_override == 0):
        raise ArgumentError(f"avg_pool2d: divisor_override must be a non-zero int or None, "
                            f"got {divisor_override!r}")
    check_pool2d(input, params, "avg_pool2d")
    return _batched(AvgPool2dFunction.apply, input, params, bool(count_include_pad),
                    divisor_override)
