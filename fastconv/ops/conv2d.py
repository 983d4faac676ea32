"""conv2d: the ``fastconv::conv2d*`` operators over the engines, and the functional API.

Operators (``torch.ops.fastconv.<name>``), batched (N, C, H, W), options in normalised form
(stride and dilation pairs, padding ``(top, bottom, left, right)``):

* ``conv2d(input, weight, bias, stride, padding, dilation, groups)``
* ``conv2d_backward_input(grad_output, weight, input_size, ...)``: the input gradient, which
  is also ``conv_transpose2d``;
* ``conv2d_backward_weight(grad_output, input, kernel_size, ...)``;
* ``conv2d_backward_bias(grad_output)``;
* ``conv2d_backward(grad_output, input, weight, input_size, kernel_size, output_mask, ...)``:
  the three above in one call, those ``output_mask`` asks for (conv2d's own backward, as
  ``aten::convolution_backward``: one dispatch and one argument check instead of three,
  ~20 us less per backward on the development machine, which a small layer notices).

The three conv passes are bilinear and each one's gradient is made of the other two (below),
so gradients of any order are fastconv kernels; nothing is ``once_differentiable``.
"""

from __future__ import annotations

import torch

from .._args import (ArgumentError, _check_tensors, check_conv2d, check_conv2d_backward,
                     check_dtype, check_layout, conv2d_op_params, conv2d_params)
from .._profiling import op_range
from . import _library
from ._library import Checked, autocast, define, define_op, fake_output, in_format, output_format

_OPTIONS = "int[2] stride, int[4] padding, int[2] dilation, int groups"
ops = torch.ops.fastconv


def _crop(t: torch.Tensor, size) -> torch.Tensor:
    """``t`` cut to spatial ``size``: a conv of conv_transpose2d's output can be a row or column
    longer than the conv_transpose2d input it is the gradient for (output_padding >= stride,
    possible with dilation)."""
    h, w = size
    return t if tuple(t.shape[-2:]) == (h, w) else t[..., :h, :w]


# ---------------------------------------------------------------------------- forward pass
def _forward_check(input, weight, bias, stride, padding, dilation, groups):
    params = conv2d_op_params(stride, padding, dilation, groups)
    _check_batched(input)
    shape = check_conv2d(input, weight, bias, params)
    return Checked(input, shape, output_format(input, weight), params)


def _forward(engine, checked, input, weight, bias, *_options):
    return engine.conv2d.conv2d_forward(input, weight, bias, checked.params)


def _forward_setup(ctx, inputs, output):
    input, weight, _bias, *options = inputs
    ctx.options = options
    ctx.input_size = input.shape[-2:]
    ctx.kernel_size = weight.shape[-2:]
    need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # grad_input needs the weight, grad_weight needs the input; keep nothing else alive.
    ctx.save_for_backward(input if need_weight else None, weight if need_input else None)


def _forward_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    grad_input, grad_weight, grad_bias = ops.conv2d_backward(
        grad, input, weight, ctx.input_size, ctx.kernel_size, list(ctx.needs_input_grad[:3]),
        *ctx.options)
    return grad_input, grad_weight, grad_bias, None, None, None, None


define_op(f"conv2d(Tensor input, Tensor weight, Tensor? bias, {_OPTIONS}) -> Tensor",
          _forward_check, _forward, "fastconv.conv2d.forward", _forward_backward,
          _forward_setup)


# ------------------------------------------------------------------------- input gradient
def _backward_input_check(grad_output, weight, input_size, stride, padding, dilation, groups):
    op = "conv2d_backward_input"
    params = conv2d_op_params(stride, padding, dilation, groups, op)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ArgumentError(f"{op}: expected weight of 4 dims (C_out, C_in/groups, kH, kW), "
                            f"got {getattr(weight, 'shape', weight)}")
    _check_batched(grad_output, op, "grad_output")
    shape = (grad_output.shape[0], weight.shape[1] * groups, *input_size)
    check_conv2d_backward(grad_output, shape, tuple(weight.shape), params, op, weight=weight)
    return Checked(grad_output, shape, output_format(grad_output, weight), params)


def _backward_input(engine, checked, grad_output, weight, *_options):
    return engine.conv2d.conv2d_backward_input(grad_output, weight, checked.shape,
                                               checked.params)


def _backward_input_setup(ctx, inputs, output):
    grad_output, weight, _size, *options = inputs
    ctx.options = options
    ctx.kernel_size = weight.shape[-2:]
    ctx.out_size = grad_output.shape[-2:]
    need_grad, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.save_for_backward(grad_output if need_weight else None, weight if need_grad else None)


def _backward_input_backward(ctx, grad_grad_input):
    # <conv2d_backward_input(g, w), u> = <g, conv2d(u, w)>: linear in g and in w.
    grad_output, weight = ctx.saved_tensors
    d_grad = d_weight = None
    if ctx.needs_input_grad[0]:
        d_grad = _crop(ops.conv2d(grad_grad_input, weight, None, *ctx.options), ctx.out_size)
    if ctx.needs_input_grad[1]:
        d_weight = ops.conv2d_backward_weight(grad_output, grad_grad_input, ctx.kernel_size,
                                              *ctx.options)
    return d_grad, d_weight, None, None, None, None, None


define_op(f"conv2d_backward_input(Tensor grad_output, Tensor weight, SymInt[2] input_size, "
          f"{_OPTIONS}) -> Tensor",
          _backward_input_check, _backward_input, "fastconv.conv2d.backward_input",
          _backward_input_backward, _backward_input_setup)


# ------------------------------------------------------------------------ weight gradient
def _backward_weight_check(grad_output, input, kernel_size, stride, padding, dilation, groups):
    op = "conv2d_backward_weight"
    params = conv2d_op_params(stride, padding, dilation, groups, op)
    _check_batched(input, op)
    _check_batched(grad_output, op, "grad_output")
    if len(kernel_size) != 2:
        raise ArgumentError(f"{op}: kernel_size must be (kH, kW), got {kernel_size!r}")
    shape = (grad_output.shape[1], input.shape[1] // groups, *kernel_size)
    check_conv2d_backward(grad_output, tuple(input.shape), shape, params, op, input=input)
    return Checked(grad_output, shape, output_format(grad_output, input), params)


def _backward_weight(engine, checked, grad_output, input, *_options):
    return engine.conv2d.conv2d_backward_weight(grad_output, input, checked.shape,
                                                checked.params)


def _backward_weight_setup(ctx, inputs, output):
    grad_output, input, _size, *options = inputs
    ctx.options = options
    ctx.input_size = input.shape[-2:]
    ctx.out_size = grad_output.shape[-2:]
    need_grad, need_input = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.save_for_backward(grad_output if need_input else None, input if need_grad else None)


def _backward_weight_backward(ctx, grad_grad_weight):
    # <conv2d_backward_weight(g, x), v> = <g, conv2d(x, v)> = <conv2d_backward_input(g, v), x>.
    grad_output, input = ctx.saved_tensors
    d_grad = d_input = None
    if ctx.needs_input_grad[0]:
        d_grad = _crop(ops.conv2d(input, grad_grad_weight, None, *ctx.options), ctx.out_size)
    if ctx.needs_input_grad[1]:
        d_input = ops.conv2d_backward_input(grad_output, grad_grad_weight, ctx.input_size,
                                            *ctx.options)
    return d_grad, d_input, None, None, None, None, None


define_op(f"conv2d_backward_weight(Tensor grad_output, Tensor input, SymInt[2] kernel_size, "
          f"{_OPTIONS}) -> Tensor",
          _backward_weight_check, _backward_weight, "fastconv.conv2d.backward_weight",
          _backward_weight_backward, _backward_weight_setup)


# -------------------------------------------------------------------------- bias gradient
def _backward_bias_check(grad_output):
    op = "conv2d_backward_bias"
    _check_batched(grad_output, op, "grad_output")
    check_layout("grad_output", grad_output, op)
    check_dtype("grad_output", grad_output, op)
    return Checked(grad_output, (grad_output.shape[1],), torch.contiguous_format, None)


def _backward_bias(engine, checked, grad_output):
    return engine.conv2d.conv2d_backward_bias(grad_output)


def _backward_bias_setup(ctx, inputs, output):
    ctx.grad_shape = inputs[0].shape


def _backward_bias_backward(ctx, grad_grad_bias):
    # The bias gradient sums over (N, H, W); its gradient repeats over them.
    return grad_grad_bias.view(1, -1, 1, 1).expand(ctx.grad_shape)


define_op("conv2d_backward_bias(Tensor grad_output) -> Tensor",
          _backward_bias_check, _backward_bias, "fastconv.conv2d.backward_bias",
          _backward_bias_backward, _backward_bias_setup)

# ------------------------------------------------------------ all gradients in one call
def _backward_check(grad_output, input, weight, input_size, kernel_size, output_mask, stride,
                    padding, dilation, groups):
    """Shapes (grad_input, grad_weight, grad_bias; None where not asked for), the two
    gradients' memory formats, and the options."""
    op = "conv2d_backward"
    params = conv2d_op_params(stride, padding, dilation, groups, op)
    _check_batched(grad_output, op, "grad_output")
    if len(output_mask) != 3:
        raise ArgumentError(f"{op}: output_mask must be 3 bools (grad_input, grad_weight, "
                            f"grad_bias), got {output_mask!r}")
    if len(input_size) != 2 or len(kernel_size) != 2:
        raise ArgumentError(f"{op}: input_size and kernel_size must be (H, W) and (kH, kW), "
                            f"got {input_size!r} and {kernel_size!r}")
    want_input, want_weight, want_bias = output_mask
    if want_input and weight is None:
        raise ArgumentError(f"{op}: grad_input (output_mask[0]) needs the weight, got None")
    if want_weight and input is None:
        raise ArgumentError(f"{op}: grad_weight (output_mask[1]) needs the input, got None")
    _check_tensors(op, input=input, weight=weight)  # before their shapes are read
    n, c_out = grad_output.shape[:2]
    c_in = None
    if weight is not None:
        if weight.dim() != 4 or tuple(weight.shape[2:]) != tuple(kernel_size):
            raise ArgumentError(f"{op}: weight of shape {tuple(weight.shape)} is not a "
                                f"(C_out, C_in/groups, kH, kW) weight of kernel_size "
                                f"{tuple(kernel_size)}")
        c_in = weight.shape[1] * groups
    if input is not None:
        _check_batched(input, op)
        if tuple(input.shape[2:]) != tuple(input_size):
            raise ArgumentError(f"{op}: input of shape {tuple(input.shape)} does not have "
                                f"input_size {tuple(input_size)}")
        c_in = input.shape[1]
    input_shape = (n if input is None else input.shape[0], c_in, *input_size)
    weight_shape = (c_out, None if c_in is None else c_in // groups, *kernel_size)
    if c_in is None:  # the bias gradient alone, which any grad_output has
        check_layout("grad_output", grad_output, op)
        check_dtype("grad_output", grad_output, op)
    else:
        check_conv2d_backward(grad_output, input_shape, weight_shape if weight is None
                              else tuple(weight.shape), params, op, input=input, weight=weight)
    shapes = (input_shape if want_input else None, weight_shape if want_weight else None,
              (c_out,) if want_bias else None)
    formats = (output_format(grad_output, weight) if want_input else None,
               output_format(grad_output, input) if want_weight else None)
    return shapes, formats, params


def _backward(grad_output, input, weight, input_size, kernel_size, output_mask, *options):
    shapes, formats, params = _backward_check(grad_output, input, weight, input_size,
                                              kernel_size, output_mask, *options)
    conv = _library.engine_for(grad_output, "conv2d_backward").conv2d  # as define_op's ops
    grad_input = grad_weight = grad_bias = None
    if shapes[0] is not None:
        with op_range("fastconv.conv2d.backward_input", grad_output):
            grad_input = in_format(conv.conv2d_backward_input(grad_output, weight, shapes[0],
                                                              params), formats[0])
    if shapes[1] is not None:
        with op_range("fastconv.conv2d.backward_weight", grad_output):
            grad_weight = in_format(conv.conv2d_backward_weight(grad_output, input, shapes[1],
                                                                params), formats[1])
    if shapes[2] is not None:
        with op_range("fastconv.conv2d.backward_bias", grad_output):
            grad_bias = conv.conv2d_backward_bias(grad_output)
    return grad_input, grad_weight, grad_bias


def _backward_fake(grad_output, input, weight, input_size, kernel_size, output_mask, *options):
    shapes, formats, _ = _backward_check(grad_output, input, weight, input_size, kernel_size,
                                         output_mask, *options)
    formats = (*formats, torch.contiguous_format)
    return tuple(None if shape is None else fake_output(grad_output, shape, fmt)
                 for shape, fmt in zip(shapes, formats))


def _backward_setup(ctx, inputs, output):
    grad_output, input, weight, input_size, kernel_size, _mask, *options = inputs
    ctx.options = options
    ctx.input_size, ctx.kernel_size = input_size, kernel_size
    ctx.grad_shape = grad_output.shape
    need_grad, need_input, need_weight = ctx.needs_input_grad[:3]
    ctx.save_for_backward(grad_output if need_input or need_weight else None,
                          input if need_grad else None, weight if need_grad else None)


def _backward_backward(ctx, grad_grad_input, grad_grad_weight, grad_grad_bias):
    # grad_input = conv2d_backward_input(g, w), grad_weight = conv2d_backward_weight(g, x) and
    # grad_bias = sum(g) are linear in g, and each bilinear pass in its other operand:
    #   d g = conv2d(ggi, w) + conv2d(x, ggw) + ggb (broadcast),
    #   d x = conv2d_backward_input(g, ggw), d w = conv2d_backward_weight(g, ggi),
    # the last two one conv2d_backward call with ggi as its input and ggw as its weight.
    grad_output, input, weight = ctx.saved_tensors
    need_grad, need_input, need_weight = ctx.needs_input_grad[:3]
    d_grad = d_input = d_weight = None
    if need_grad:
        out_size = ctx.grad_shape[-2:]
        if grad_grad_input is not None:
            d_grad = _crop(ops.conv2d(grad_grad_input, weight, None, *ctx.options), out_size)
        if grad_grad_weight is not None:
            term = _crop(ops.conv2d(input, grad_grad_weight, None, *ctx.options), out_size)
            d_grad = term if d_grad is None else d_grad + term
        if grad_grad_bias is not None:
            term = grad_grad_bias.view(1, -1, 1, 1).expand(ctx.grad_shape)
            d_grad = term if d_grad is None else d_grad + term
    want_input = need_input and grad_grad_weight is not None
    want_weight = need_weight and grad_grad_input is not None
    if want_input or want_weight:
        d_input, d_weight, _ = ops.conv2d_backward(
            grad_output, grad_grad_input if want_weight else None,
            grad_grad_weight if want_input else None, ctx.input_size, ctx.kernel_size,
            [want_input, want_weight, False], *ctx.options)
    return d_grad, d_input, d_weight, None, None, None, None, None, None, None


define(f"conv2d_backward(Tensor grad_output, Tensor? input, Tensor? weight, "
       f"SymInt[2] input_size, SymInt[2] kernel_size, bool[3] output_mask, {_OPTIONS}) "
       f"-> (Tensor?, Tensor?, Tensor?)",
       _backward, _backward_fake, _backward_backward, _backward_setup)

# Autocast runs the forward ops in the autocast dtype, as torch.nn.functional.conv2d; the
# gradient ops run in whatever dtype autograd hands them.
autocast("conv2d")
autocast("conv2d_backward_input")


def _check_batched(t, op: str = "conv2d", name: str = "input") -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        raise ArgumentError(f"{op}: expected a 4-dim (N, C, H, W) {name}, got "
                            f"{getattr(t, 'shape', t)}")


def options(params) -> tuple:
    """Conv2dParams as the operators' trailing arguments."""
    return list(params.stride), list(params.padding), list(params.dilation), params.groups


# ------------------------------------------------------------------------- functional API
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
        ``Ho = floor((H + pad_top + pad_bottom - dilation*(kH-1) - 1) / stride) + 1``;
        channels_last if input or weight is. Differentiable to any order.
    """
    # A malformed weight is reported by check_conv2d; (1, 1) only keeps 'same' computable.
    kernel_hw = tuple(weight.shape[-2:]) if getattr(weight, "ndim", 0) == 4 else (1, 1)
    params = conv2d_params(kernel_hw, stride, padding, dilation, groups)
    if not (isinstance(input, torch.Tensor) and input.dim() == 4 and isinstance(weight, torch.Tensor)
            and (bias is None or isinstance(bias, torch.Tensor))):
        check_conv2d(input, weight, bias, params)  # errors name the caller's shapes and types
    if input.dim() == 3:
        return ops.conv2d(input.unsqueeze(0), weight, bias, *options(params)).squeeze(0)
    return ops.conv2d(input, weight, bias, *options(params))
