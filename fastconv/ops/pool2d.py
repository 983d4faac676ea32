"""max_pool2d and avg_pool2d: the ``fastconv::`` pooling operators and the functional API.

Operators (``torch.ops.fastconv.<name>``), batched (N, C, H, W), options as pairs:

* ``max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, indices)
  -> (output, indices)``: ``indices`` says which argmax to return: "flat" (int64 into H*W,
  what ``return_indices`` gives), "window" (the winning tap's row-major number within its
  window, uint8 up to 256 taps else int32: all the gradient needs, at an eighth of the
  memory traffic) or "none" (an empty tensor in their place);
* ``max_pool2d_backward(grad_output, indices, input_size, ..., check_indices=True)``: a
  scatter to the argmax, from flat or window indices. Indices that name no input element are
  refused. ``check_indices=False`` skips that check where the kernel gathers (on the GPU
  always; on the CPU for window indices on the geometries with a gather kernel: it takes no
  address from them, so such an index can make a wrong gradient, never a stray read or
  write), as max pooling's own autograd formula does: its indices come from the forward, and
  autograd's version counter refuses them if changed since;
* ``max_pool2d_double_backward(grad_grad_input, indices, ...)``: its adjoint, a gather at the
  argmax, which makes max pooling differentiable to any order;
* ``avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
  divisor_override)`` and ``avg_pool2d_backward(grad_output, input_size, ...)``, each the
  other's adjoint.
"""

from __future__ import annotations

import torch

from .._args import (ArgumentError, DeviceError, DTypeError, check_dtype, check_layout,
                     check_pool2d, pool2d_params)
from .._profiling import op_range
from . import _library
from ._library import Checked, define, define_op, fake_output, in_format, output_format

_MAX_OPTIONS = "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode"
_AVG_OPTIONS = ("int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, "
                "bool count_include_pad, int? divisor_override")
ops = torch.ops.fastconv


def _check_batched(t, name: str, op: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        raise ArgumentError(f"{op}: expected a 4-dim (N, C, H, W) {name}, got "
                            f"{getattr(t, 'shape', t)}")


def _check_divisor(divisor_override, op: str = "avg_pool2d") -> None:
    if divisor_override is not None and (isinstance(divisor_override, bool)
                                         or not isinstance(divisor_override, int)
                                         or divisor_override == 0):
        raise ArgumentError(f"{op}: divisor_override must be a non-zero int or None, "
                            f"got {divisor_override!r}")


_INDEX_MODES = ("none", "flat", "window")


def _check_indices(indices, grad, shape, params, op: str) -> None:
    """``indices`` are flat (int64) or window (``params.window_index_dtype``) indices of
    ``shape`` on ``grad``'s device."""
    if not isinstance(indices, torch.Tensor):
        raise ArgumentError(f"{op}: indices must be a torch.Tensor, got "
                            f"{type(indices).__name__}")
    check_layout("indices", indices, op)
    if indices.dtype not in (torch.int64, params.window_index_dtype):
        raise DTypeError(f"{op}: indices must be int64 (flat, as max_pool2d returns them) or "
                         f"{params.window_index_dtype} (window indices for kernel_size="
                         f"{params.kernel}), got {indices.dtype}")
    if indices.device != grad.device:
        raise DeviceError(f"{op}: indices are on {indices.device} but the gradient is on "
                          f"{grad.device}; both must be on the same device")
    if tuple(indices.shape) != tuple(shape):
        raise ArgumentError(f"{op}: expected indices of shape {tuple(shape)}, got "
                            f"{tuple(indices.shape)}")


def _check_grad_output(grad_output, input_size, params, op: str, integers: bool = False):
    """grad_output (N, C, Ho, Wo) must be the pooling output of (N, C, *input_size)."""
    _check_batched(grad_output, "grad_output", op)
    check_layout("grad_output", grad_output, op)
    check_dtype("grad_output", grad_output, op, integers=integers)
    n, c = grad_output.shape[:2]
    input_shape = (n, c, *input_size)
    expected = (n, c, *params.output_hw(tuple(input_size)))
    if tuple(grad_output.shape) != expected or min(expected[2:]) < 1:
        raise ArgumentError(f"{op}: grad_output of shape {tuple(grad_output.shape)} is not the "
                            f"output of pooling an input of size {tuple(input_size)}; expected "
                            f"{expected}")
    return input_shape


# ------------------------------------------------------------------------------ max pooling
def _max_params(kernel_size, stride, padding, dilation, ceil_mode, op="max_pool2d"):
    return pool2d_params(kernel_size, stride, padding, dilation, ceil_mode, op=op)


def _max_forward_check(input, kernel_size, stride, padding, dilation, ceil_mode, indices):
    params = _max_params(kernel_size, stride, padding, dilation, ceil_mode)
    if indices not in _INDEX_MODES:
        raise ArgumentError(f"max_pool2d: indices must be one of {', '.join(_INDEX_MODES)}, "
                            f"got {indices!r}")
    _check_batched(input, "input", "max_pool2d")
    shape = check_pool2d(input, params, "max_pool2d", integers=True)
    index_dtype = params.window_index_dtype if indices == "window" else torch.int64
    return params, shape, index_dtype


def _max_forward(input, kernel_size, stride, padding, dilation, ceil_mode, indices):
    params, _shape, index_dtype = _max_forward_check(input, kernel_size, stride, padding,
                                                     dilation, ceil_mode, indices)
    engine = _library.engine_for(input, "max_pool2d").pool2d
    fmt = output_format(input)
    with op_range("fastconv.max_pool2d.forward", input):
        y, idx = engine.max_pool2d_forward(input, params, indices=indices)
    if idx is None:
        return in_format(y, fmt), y.new_empty(0, dtype=index_dtype)
    return in_format(y, fmt), in_format(idx, fmt)


def _max_forward_fake(input, kernel_size, stride, padding, dilation, ceil_mode, indices):
    _params, shape, index_dtype = _max_forward_check(input, kernel_size, stride, padding,
                                                     dilation, ceil_mode, indices)
    fmt = output_format(input)
    argmax = input.new_empty(0, dtype=index_dtype) if indices == "none" \
        else fake_output(input, shape, fmt, index_dtype)
    return fake_output(input, shape, fmt), argmax


def _max_forward_setup(ctx, inputs, output):
    input, *options, indices = inputs
    ctx.options = options
    ctx.input_size = input.shape[-2:]
    ctx.indices = indices
    ctx.save_for_backward(output[1] if ctx.needs_input_grad[0] else None)
    # The indices have no gradient: without this, autograd would fill a zero one as large as
    # them for every backward (0.5 ms on 32x64x56x56).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _max_forward_backward(ctx, grad, _grad_indices):
    if grad is None:  # not materialised (see _max_forward_setup): no gradient reached
        return None, None, None, None, None, None, None
    if ctx.indices == "none":
        raise RuntimeError("fastconv::max_pool2d: called with indices='none', but its "
                           "gradient needs the indices ('window' or 'flat')")
    (indices,) = ctx.saved_tensors
    # The forward made these indices (a change since would fail autograd's version check):
    # no need to check them again (32x64x112x112 3x3/s2 forward+backward 13.5 -> 12.8 ms).
    return (ops.max_pool2d_backward(grad, indices, ctx.input_size, *ctx.options, False),
            None, None, None, None, None, None)


define(f"max_pool2d(Tensor input, {_MAX_OPTIONS}, str indices) -> (Tensor, Tensor)",
       _max_forward, _max_forward_fake, _max_forward_backward, _max_forward_setup)


def _max_backward_check(grad_output, indices, input_size, kernel_size, stride, padding,
                        dilation, ceil_mode, check_indices=True):
    op = "max_pool2d_backward"
    params = _max_params(kernel_size, stride, padding, dilation, ceil_mode, op)
    input_shape = _check_grad_output(grad_output, input_size, params, op)
    _check_indices(indices, grad_output, grad_output.shape, params, op)
    return Checked(grad_output, input_shape, output_format(grad_output), params)


def _max_backward(engine, checked, grad_output, indices, _size, _kernel_size, _stride, _padding,
                  _dilation, _ceil_mode, check_indices=True):
    return engine.pool2d.max_pool2d_backward(grad_output, indices, checked.shape,
                                             checked.params, check_indices)


def _max_backward_setup(ctx, inputs, output):
    indices = inputs[1]
    ctx.options = inputs[3:8]  # kernel_size .. ceil_mode (check_indices may be left out)
    ctx.save_for_backward(indices)


def _max_backward_backward(ctx, grad_grad_input):
    (indices,) = ctx.saved_tensors
    return (ops.max_pool2d_double_backward(grad_grad_input, indices, *ctx.options),
            None, None, None, None, None, None, None, None)


define_op(f"max_pool2d_backward(Tensor grad_output, Tensor indices, SymInt[2] input_size, "
          f"{_MAX_OPTIONS}, bool check_indices=True) -> Tensor",
          _max_backward_check, _max_backward, "fastconv.max_pool2d.backward",
          _max_backward_backward, _max_backward_setup)


def _max_double_check(grad_grad_input, indices, kernel_size, stride, padding, dilation,
                      ceil_mode):
    op = "max_pool2d_double_backward"
    params = _max_params(kernel_size, stride, padding, dilation, ceil_mode, op)
    _check_batched(grad_grad_input, "grad_grad_input", op)
    shape = check_pool2d(grad_grad_input, params, op)
    _check_indices(indices, grad_grad_input, shape, params, op)
    return Checked(grad_grad_input, shape, output_format(grad_grad_input), params)


def _max_double(engine, checked, grad_grad_input, indices, *_options):
    return engine.pool2d.max_pool2d_double_backward(grad_grad_input, indices, checked.params)


def _max_double_setup(ctx, inputs, output):
    grad_grad_input, indices, *options = inputs
    ctx.options = options
    ctx.input_size = grad_grad_input.shape[-2:]
    ctx.save_for_backward(indices)


def _max_double_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    return (ops.max_pool2d_backward(grad, indices, ctx.input_size, *ctx.options),
            None, None, None, None, None, None)


define_op(f"max_pool2d_double_backward(Tensor grad_grad_input, Tensor indices, "
          f"{_MAX_OPTIONS}) -> Tensor",
          _max_double_check, _max_double, "fastconv.max_pool2d.double_backward",
          _max_double_backward, _max_double_setup)


# -------------------------------------------------------------------------- average pooling
def _avg_params(kernel_size, stride, padding, ceil_mode, divisor_override, op="avg_pool2d"):
    _check_divisor(divisor_override, op)
    return pool2d_params(kernel_size, stride, padding, 1, ceil_mode, op=op)


def _avg_forward_check(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                       divisor_override):
    params = _avg_params(kernel_size, stride, padding, ceil_mode, divisor_override)
    _check_batched(input, "input", "avg_pool2d")
    shape = check_pool2d(input, params, "avg_pool2d")
    return Checked(input, shape, output_format(input), params)


def _avg_forward(engine, checked, input, _kernel, _stride, _padding, _ceil, count_include_pad,
                 divisor_override):
    return engine.pool2d.avg_pool2d_forward(input, checked.params, count_include_pad,
                                            divisor_override)


def _avg_forward_setup(ctx, inputs, output):
    input, *options = inputs
    ctx.options = options
    ctx.input_size = input.shape[-2:]


def _avg_forward_backward(ctx, grad):
    return (ops.avg_pool2d_backward(grad, ctx.input_size, *ctx.options),
            None, None, None, None, None, None)


define_op(f"avg_pool2d(Tensor input, {_AVG_OPTIONS}) -> Tensor",
          _avg_forward_check, _avg_forward, "fastconv.avg_pool2d.forward",
          _avg_forward_backward, _avg_forward_setup)


def _avg_backward_check(grad_output, input_size, kernel_size, stride, padding, ceil_mode,
                        count_include_pad, divisor_override):
    op = "avg_pool2d_backward"
    params = _avg_params(kernel_size, stride, padding, ceil_mode, divisor_override, op)
    input_shape = _check_grad_output(grad_output, input_size, params, op)
    return Checked(grad_output, input_shape, output_format(grad_output), params)


def _avg_backward(engine, checked, grad_output, _size, _kernel, _stride, _padding, _ceil,
                  count_include_pad, divisor_override):
    return engine.pool2d.avg_pool2d_backward(grad_output, checked.shape, checked.params,
                                             count_include_pad, divisor_override)


def _avg_backward_setup(ctx, inputs, output):
    _grad, _size, *options = inputs
    ctx.options = options


def _avg_backward_backward(ctx, grad_grad_input):
    # Average pooling is linear, and its backward is its exact adjoint: the gradient of the
    # backward is the forward.
    return (ops.avg_pool2d(grad_grad_input, *ctx.options),
            None, None, None, None, None, None, None)


define_op(f"avg_pool2d_backward(Tensor grad_output, SymInt[2] input_size, {_AVG_OPTIONS}) "
          f"-> Tensor",
          _avg_backward_check, _avg_backward, "fastconv.avg_pool2d.backward",
          _avg_backward_backward, _avg_backward_setup)


# ------------------------------------------------------------------------- functional API
def _batched(fn, input, *args):
    """Run a batched op on (N, C, H, W) or unbatched (C, H, W) input."""
    if input.dim() == 4:
        return fn(input, *args)
    out = fn(input.unsqueeze(0), *args)
    return tuple(o.squeeze(0) for o in out) if isinstance(out, tuple) else out.squeeze(0)


def max_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1,
               ceil_mode: bool = False, return_indices: bool = False):
    """2-D max pooling with the semantics of ``torch.nn.functional.max_pool2d``.

    Args:
        input: (N, C, H, W) or unbatched (C, H, W); a floating dtype, or an integer dtype
            on the CPU.
        kernel_size, stride (default: kernel_size), padding, dilation: int or (h, w) pairs.
            Padding (implicit -inf) may be at most half of ``kernel_size``.
        ceil_mode: round the output size up; the last window must start inside the input
            or the left/top padding.
        return_indices: also return the argmax of each window as an int64 index into the
            flattened H*W plane, as ``torch.nn.functional.max_unpool2d`` expects. (For the
            gradient alone, a one-byte argmax within the window is kept instead.)

    NaN propagates: a window holding NaN outputs NaN (its index is the last NaN's).
    Returns (N, C, Ho, Wo), or ``(output, indices)``; channels_last if input is.
    """
    params = pool2d_params(kernel_size, stride, padding, dilation, ceil_mode, op="max_pool2d")
    if not (isinstance(input, torch.Tensor) and input.dim() == 4):
        # The operator checks batched input; here errors name the caller's shapes and types.
        check_pool2d(input, params, "max_pool2d", integers=True)
    # The gradient needs only each window's winning tap (one byte); without a gradient to
    # compute or indices to return, no argmax is written at all.
    mode = "flat" if return_indices else \
        "window" if input.requires_grad and torch.is_grad_enabled() else "none"
    output, indices = _batched(ops.max_pool2d, input, list(params.kernel), list(params.stride),
                               list(params.padding), list(params.dilation), params.ceil_mode,
                               mode)
    return (output, indices) if return_indices else output


def avg_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: int | None = None):
    """2-D average pooling with the semantics of ``torch.nn.functional.avg_pool2d``.

    Args:
        input: (N, C, H, W) or unbatched (C, H, W); a floating dtype.
        kernel_size, stride (default: kernel_size), padding: int or (h, w) pairs; padding is
            zeros, at most half the kernel size.
        ceil_mode: round the output size up (see ``max_pool2d``).
        count_include_pad: divide by the window size counting padding (but not the part of a
            ceil-mode window beyond the padding); if False, by the number of input elements.
        divisor_override: divide every window by this instead.

    Returns (N, C, Ho, Wo) or (C, Ho, Wo); channels_last if input is.
    """
    params = pool2d_params(kernel_size, stride, padding, 1, ceil_mode, op="avg_pool2d")
    if not (isinstance(input, torch.Tensor) and input.dim() == 4):
        # The operator checks batched input (divisor_override too); here errors name the
        # caller's shapes and types.
        check_pool2d(input, params, "avg_pool2d")
    return _batched(ops.avg_pool2d, input, list(params.kernel), list(params.stride),
                    list(params.padding), params.ceil_mode, bool(count_include_pad),
                    divisor_override)

