"""conv2d: the autograd Function over the engines, and the functional API."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .._args import Conv2dParams, check_conv2d, conv2d_params
from .._profiling import op_range
from ._engine import engine_for


class Conv2dFunction(torch.autograd.Function):
    """Batched conv2d with normalised ``params``; input (N, C_in, H, W)."""

    @staticmethod
    def forward(input, weight, bias, params: Conv2dParams):
        engine = engine_for(input, "conv2d").conv2d
        with op_range("fastconv.conv2d.forward", input):
            return engine.conv2d_forward(input, weight, bias, params)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, params = inputs
        ctx.params = params
        ctx.input_shape = tuple(input.shape)
        ctx.weight_shape = tuple(weight.shape)
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # grad_input needs the weight, grad_weight needs the input; keep nothing else alive.
        ctx.save_for_backward(input if need_weight else None, weight if need_input else None)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, weight = ctx.saved_tensors
        engine = engine_for(grad_out, "conv2d").conv2d
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            with op_range("fastconv.conv2d.backward_input", grad_out):
                grad_input = engine.conv2d_backward_input(grad_out, weight, ctx.input_shape,
                                                          ctx.params)
        if ctx.needs_input_grad[1]:
            with op_range("fastconv.conv2d.backward_weight", grad_out):
                grad_weight = engine.conv2d_backward_weight(grad_out, input, ctx.weight_shape,
                                                            ctx.params)
        if ctx.needs_input_grad[2]:
            with op_range("fastconv.conv2d.backward_bias", grad_out):
                grad_bias = engine.conv2d_backward_bias(grad_out)
        return grad_input, grad_weight, grad_bias, None


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """2-D convolution (cross-correlation) with the semantics of ``torch.nn.functional.conv2d``.

    Args:
        input: (N, C_in, H, W), or unbatched (C_in, H, W).
        weight: (C_out, C_in / groups, kH, kW).
        bias: (C_out,) or None.
        stride, dilation: int or (sH, sW); each >= 1.
        padding: int or (pH, pW) zero padding on both sides, ``'valid'`` (none) or ``'same'``
            (output size = input size; needs stride 1).
        groups: C_in and C_out are split into ``groups`` independent convolutions;
            ``groups == C_in`` is depthwise.

    Returns:
        (N, C_out, Ho, Wo), or (C_out, Ho, Wo) for unbatched input, where
        ``Ho = floor((H + pad_top + pad_bottom - dilation*(kH-1) - 1) / stride) + 1``.
    """
    # A malformed weight is reported by check_conv2d; (1, 1) only keeps 'same' computable.
    kernel_hw = tuple(weight.shape[-2:]) if getattr(weight, "ndim", 0) == 4 else (1, 1)
    params = conv2d_params(kernel_hw, stride, padding, dilation, groups)
    check_conv2d(input, weight, bias, params)
    if input.dim() == 3:
        return Conv2dFunction.apply(input.unsqueeze(0), weight, bias, params).squeeze(0)
    return Conv2dFunction.apply(input, weight, bias, params)
