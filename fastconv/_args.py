"""Argument normalisation, validation and output-size math for every fastconv op.

Both engines (Numba on the CPU, CuPy on the GPU), the autograd Functions and the nn modules
go through this module, so an argument means the same thing and fails with the same
message everywhere.

Errors subclass both the Pythonic exception (``ValueError`` / ``TypeError``) and
``RuntimeError``, because PyTorch raises ``RuntimeError`` for the same mistakes and code that
swaps ``nn.Conv2d`` for ``fastconv.Conv2D`` may already catch that.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

Pair = tuple[int, int]


class ArgumentError(ValueError, RuntimeError):
    """An argument has the wrong value or a tensor the wrong shape."""


class DTypeError(TypeError, RuntimeError):
    """A tensor has a dtype the op or engine does not support."""


class DeviceError(ValueError, RuntimeError):
    """Tensors are on different devices. (A device no engine serves raises
    NotImplementedError.)"""


def bad_pool_indices(op: str, window: bool) -> ArgumentError:
    """The error for max pooling indices that name no input element (both engines)."""
    what = ("window indices name taps outside the input" if window
            else "indices hold values outside [0, H*W) of the input plane")
    return ArgumentError(f"{op}: {what}; pass the indices max_pool2d returned")


def _is_int(value) -> bool:
    # bool is an Integral but stride=True is always a mistake. The exact-type test first:
    # an ABC isinstance costs ~1 us, and a conv call checks a dozen ints.
    return type(value) is int or (isinstance(value, numbers.Integral)
                                  and not isinstance(value, bool))


def pair(value, name: str, op: str) -> Pair:
    """``value`` as ``(height, width)``: an int, or a tuple/list of two ints."""
    if _is_int(value):
        return int(value), int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        return int(value[0]), int(value[1])
    if isinstance(value, (tuple, list)) and len(value) == 1 and _is_int(value[0]):
        return int(value[0]), int(value[0])
    raise ArgumentError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")


def _at_least(values: Pair, low: int, name: str, op: str) -> Pair:
    if min(values) < low:
        raise ArgumentError(f"{op}: {name} must be >= {low} in each dimension, got {values}")
    return values


def out_size(size: int, kernel: int, stride: int, pad_lo: int, pad_hi: int, dilation: int,
             ceil_mode: bool = False) -> int:
    """Output length along one axis, as ``torch.nn`` defines it.

    ``floor((size + pad_lo + pad_hi - dilation*(kernel-1) - 1) / stride) + 1``; with ``ceil_mode``
    (pooling only) the division rounds up, except that the last window must start inside the
    input or the left padding, never wholly in the right padding.
    """
    span = size + pad_lo + pad_hi - dilation * (kernel - 1) - 1
    if span < 0:
        return 0
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + pad_lo:
        out -= 1
    return out


@dataclass(frozen=True)
class Conv2dParams:
    """Normalised conv2d options.

    ``padding`` is ``(top, bottom, left, right)``: ``padding='same'`` with an even effective
    kernel pads one more at the bottom/right, exactly as PyTorch does.
    """

    stride: Pair
    padding: tuple[int, int, int, int]
    dilation: Pair
    groups: int

    def output_hw(self, in_hw: Pair, kernel_hw: Pair) -> Pair:
        top, bottom, left, right = self.padding
        return (
            out_size(in_hw[0], kernel_hw[0], self.stride[0], top, bottom, self.dilation[0]),
            out_size(in_hw[1], kernel_hw[1], self.stride[1], left, right, self.dilation[1]),
        )


def conv2d_params(kernel_hw: Pair, stride=1, padding=0, dilation=1, groups=1,
                  op: str = "conv2d") -> Conv2dParams:
    """Validate and normalise conv2d options for a kernel of size ``kernel_hw``.

    ``padding`` is an int, a pair, ``'valid'`` (no padding) or ``'same'`` (output size equals
    input size; stride must be 1).
    """
    stride = _at_least(pair(stride, "stride", op), 1, "stride", op)
    dilation = _at_least(pair(dilation, "dilation", op), 1, "dilation", op)
    if not _is_int(groups) or groups < 1:
        raise ArgumentError(f"{op}: groups must be a positive int, got {groups!r}")
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ArgumentError(
                    f"{op}: padding='same' needs stride=1 in each dimension, got stride={stride}")
            pads = ()
            for k, d in zip(kernel_hw, dilation):
                total = d * (k - 1)
                pads += (total // 2, total - total // 2)
        else:
            raise ArgumentError(
                f"{op}: padding must be 'valid', 'same', an int or a pair of ints, got {padding!r}")
    else:
        ph, pw = _at_least(pair(padding, "padding", op), 0, "padding", op)
        pads = (ph, ph, pw, pw)
    return Conv2dParams(stride, pads, dilation, int(groups))


# Options conv2d_op_params has accepted: every pass of every conv call normalises them (a
# forward+backward three times), ~4 us each on the development machine against ~1 for this
# lookup. Keyed by exact ints only: True == 1 as a key, and a bool must still be refused.
_OP_PARAMS: dict[tuple, Conv2dParams] = {}
_OP_PARAMS_MAX = 4096


def conv2d_op_params(stride, padding, dilation, groups, op: str = "conv2d") -> Conv2dParams:
    """Conv2dParams from the ``fastconv::`` ops' schema form: stride and dilation pairs,
    padding ``(top, bottom, left, right)``. Checked again because the ops can be called
    directly (``torch.ops.fastconv.conv2d``), not only through ``fastconv.conv2d``."""
    try:
        key = (tuple(stride), tuple(padding), tuple(dilation), groups, op)
    except TypeError:
        key = None
    else:
        if all(type(v) is int for v in (*key[0], *key[1], *key[2], groups)):
            hit = _OP_PARAMS.get(key)
            if hit is not None:
                return hit
        else:
            key = None
    params = _conv2d_op_params(stride, padding, dilation, groups, op)
    if key is not None:
        if len(_OP_PARAMS) >= _OP_PARAMS_MAX:
            _OP_PARAMS.clear()
        _OP_PARAMS[key] = params
    return params


def _conv2d_op_params(stride, padding, dilation, groups, op: str) -> Conv2dParams:
    if len(padding) != 4 or not all(_is_int(p) for p in padding) or min(padding) < 0:
        raise ArgumentError(f"{op}: padding must be 4 ints >= 0 (top, bottom, left, right), "
                            f"got {padding!r}")
    stride = _at_least(pair(stride, "stride", op), 1, "stride", op)
    dilation = _at_least(pair(dilation, "dilation", op), 1, "dilation", op)
    if not _is_int(groups) or groups < 1:
        raise ArgumentError(f"{op}: groups must be a positive int, got {groups!r}")
    return Conv2dParams(stride, tuple(int(p) for p in padding), dilation, int(groups))


# dtypes each engine computes in. The CPU engine computes float16 and bfloat16 in float32 and
# rounds each result once (PyTorch's CPU kernels accumulate those in float32 too).
ENGINE_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}
# Max pooling only compares, so integers work too on the CPU engine (PyTorch's CPU kernel
# accepts them; avg pooling refuses them, and so does PyTorch's CUDA kernel).
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
INTEGER_ENGINES = ("cpu",)


def check_dtype(name: str, tensor: torch.Tensor, op: str, integers: bool = False) -> None:
    """Refuse bool and complex tensors, integers unless ``integers``, and float dtypes the
    engine lacks."""
    allowed = ENGINE_DTYPES.get(tensor.device.type)
    if integers and tensor.dtype in INTEGER_DTYPES:
        if tensor.device.type in INTEGER_ENGINES or allowed is None:
            return
        names = ", ".join(str(d) for d in allowed)
        raise DTypeError(f"{op}: the {tensor.device.type.upper()} engine supports {names} "
                         f"(integer input only on the CPU); {name} has dtype {tensor.dtype}")
    if tensor.dtype.is_complex or not tensor.dtype.is_floating_point:
        kind = "a floating-point or integer" if integers else "a floating-point"
        raise DTypeError(f"{op}: {name} must be {kind} tensor, got dtype {tensor.dtype}")
    if allowed is not None and tensor.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise DTypeError(f"{op}: the {tensor.device.type.upper()} engine supports {names}; "
                         f"{name} has dtype {tensor.dtype}")


def check_layout(name: str, tensor: torch.Tensor, op: str) -> None:
    """Sparse, nested and MKL-DNN tensors are not computed by fastconv: say so, by name."""
    if tensor.layout != torch.strided or tensor.is_nested:
        layout = "nested" if tensor.is_nested else str(tensor.layout)
        raise NotImplementedError(f"{op}: fastconv computes on dense (torch.strided) tensors; "
                                  f"{name} has layout {layout}. Convert it with .to_dense()")


def check_same(op: str, ref_name: str, ref: torch.Tensor, name: str, other: torch.Tensor,
               autocast: bool = False) -> None:
    """``other`` must share ``ref``'s device and dtype. With ``autocast``, dtypes may differ
    while autocast is on for the device: the operator casts them to its dtype first."""
    if other.device != ref.device:
        raise DeviceError(f"{op}: {name} is on {other.device} but {ref_name} is on {ref.device}; "
                          f"both must be on the same device")
    if other.dtype != ref.dtype and not (autocast and ref.is_floating_point()
                                         and other.is_floating_point()
                                         and torch.is_autocast_enabled(ref.device.type)):
        raise DTypeError(f"{op}: {name} has dtype {other.dtype} but {ref_name} has dtype "
                         f"{ref.dtype}; both must have the same dtype")


def _check_tensors(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise ArgumentError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def _check_input_dims(input: torch.Tensor, op: str) -> None:
    if input.dim() not in (3, 4):
        raise ArgumentError(f"{op}: expected input of 3 dims (C, H, W) or 4 dims (N, C, H, W), "
                            f"got {input.dim()} dims with shape {tuple(input.shape)}")


def check_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 params: Conv2dParams, op: str = "conv2d") -> tuple[int, ...]:
    """Validate conv2d operands; returns the output shape (without a batch dim if unbatched).

    input ``(N, C_in, H, W)`` or ``(C_in, H, W)``; weight ``(C_out, C_in/groups, kH, kW)``;
    bias ``(C_out,)`` or None.
    """
    _check_tensors(op, input=input, weight=weight, bias=bias)
    _check_input_dims(input, op)
    if weight.dim() != 4:
        raise ArgumentError(f"{op}: expected weight of 4 dims (C_out, C_in/groups, kH, kW), "
                            f"got {weight.dim()} dims with shape {tuple(weight.shape)}")
    check_layout("input", input, op)
    check_layout("weight", weight, op)
    check_dtype("input", input, op)
    check_same(op, "input", input, "weight", weight, autocast=True)
    c_out = weight.shape[0]
    if bias is not None:
        check_layout("bias", bias, op)
        check_same(op, "input", input, "bias", bias, autocast=True)
        if tuple(bias.shape) != (c_out,):
            raise ArgumentError(f"{op}: expected bias of shape ({c_out},) to match "
                                f"weight.shape[0], got {tuple(bias.shape)}")
    out = conv2d_output_shape((1,) + tuple(input.shape[-3:]), tuple(weight.shape), params, op)
    return tuple(input.shape[:-3]) + out[1:]


def conv2d_output_shape(input_shape, weight_shape, params: Conv2dParams,
                        op: str = "conv2d") -> tuple[int, int, int, int]:
    """(N, C_out, Ho, Wo) for input ``(N, C_in, H, W)`` and weight ``(C_out, C_in/groups, kH,
    kW)``, after checking that channels, groups and sizes agree."""
    n, c_in, h, w = input_shape
    c_out, c_in_g, kh, kw = weight_shape
    g = params.groups
    if c_out == 0 or c_in_g == 0 or kh == 0 or kw == 0:
        raise ArgumentError(f"{op}: weight must have no zero-size dimension, got shape "
                            f"{tuple(weight_shape)}")
    if c_in % g:
        raise ArgumentError(f"{op}: groups={g} must divide the input channels, got {c_in}")
    if c_out % g:
        raise ArgumentError(f"{op}: groups={g} must divide the output channels "
                            f"(weight.shape[0]), got {c_out}")
    if c_in_g * g != c_in:
        raise ArgumentError(
            f"{op}: input has {c_in} channels but weight of shape {tuple(weight_shape)} with "
            f"groups={g} expects {c_in_g * g} (weight.shape[1] * groups)")
    top, bottom, left, right = params.padding
    ho, wo = params.output_hw((h, w), (kh, kw))
    if ho < 1 or wo < 1:
        eff = (params.dilation[0] * (kh - 1) + 1, params.dilation[1] * (kw - 1) + 1)
        raise ArgumentError(
            f"{op}: kernel of size {eff} (dilation included) is larger than the padded input "
            f"of size ({h + top + bottom}, {w + left + right}); output would be {ho}x{wo}")
    return n, c_out, ho, wo


def check_conv2d_backward(grad_output: torch.Tensor, input_shape, weight_shape,
                          params: Conv2dParams, op: str, **operands) -> None:
    """The gradient passes' operands: each of ``operands`` (by name: the weight, the input;
    None ones skipped) shares grad_output's device and dtype, and grad_output is
    ``(N, C_out, Ho', Wo')``, the conv output of ``input_shape`` or its top-left part
    (``Ho' <= Ho``: conv_transpose2d with an output_padding of at least the stride leaves
    the last output rows without a source)."""
    _check_tensors(op, grad_output=grad_output, **operands)
    check_layout("grad_output", grad_output, op)
    check_dtype("grad_output", grad_output, op)
    for name, other in operands.items():
        if other is not None:
            check_layout(name, other, op)
            check_same(op, "grad_output", grad_output, name, other)
    if grad_output.dim() != 4:
        raise ArgumentError(f"{op}: expected grad_output of 4 dims (N, C_out, Ho, Wo), got "
                            f"shape {tuple(grad_output.shape)}")
    n, c_out, ho, wo = conv2d_output_shape(input_shape, weight_shape, params, op)
    gn, gc, gh, gw = grad_output.shape
    if gn != n or gc != c_out or gh > ho or gw > wo:
        raise ArgumentError(f"{op}: grad_output of shape {tuple(grad_output.shape)} does not "
                            f"fit a conv output of shape {(n, c_out, ho, wo)}")


@dataclass(frozen=True)
class ConvTranspose2dParams:
    """Normalised conv_transpose2d options; ``conv`` is the conv2d whose input gradient the
    transposed convolution is."""

    conv: Conv2dParams
    output_padding: Pair


def conv_transpose2d_params(stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                            op: str = "conv_transpose2d") -> ConvTranspose2dParams:
    """Validate and normalise conv_transpose2d options (ints or pairs; no string padding)."""
    if isinstance(padding, str):
        raise ArgumentError(f"{op}: padding must be an int or a pair of ints, got {padding!r}")
    conv = conv2d_params((1, 1), stride, padding, dilation, groups, op=op)
    out_pad = _at_least(pair(output_padding, "output_padding", op), 0, "output_padding", op)
    for a in (0, 1):
        if out_pad[a] >= max(conv.stride[a], conv.dilation[a]):
            raise ArgumentError(
                f"{op}: output_padding must be smaller than stride or dilation in each "
                f"dimension, got output_padding={out_pad}, stride={conv.stride}, "
                f"dilation={conv.dilation}")
    return ConvTranspose2dParams(conv, out_pad)


def check_conv_transpose2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           params: ConvTranspose2dParams,
                           op: str = "conv_transpose2d") -> tuple[int, ...]:
    """Validate conv_transpose2d operands; returns the output shape (unbatched if input is).

    input ``(N, C_in, H, W)`` or ``(C_in, H, W)``; weight ``(C_in, C_out/groups, kH, kW)``;
    bias ``(C_out,)`` or None. Output ``H_out = (H-1)*stride - 2*padding +
    dilation*(kH-1) + output_padding + 1``.
    """
    _check_tensors(op, input=input, weight=weight, bias=bias)
    _check_input_dims(input, op)
    if weight.dim() != 4:
        raise ArgumentError(f"{op}: expected weight of 4 dims (C_in, C_out/groups, kH, kW), "
                            f"got {weight.dim()} dims with shape {tuple(weight.shape)}")
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_layout(name, t, op)
    check_dtype("input", input, op)
    check_same(op, "input", input, "weight", weight, autocast=True)
    c_in, h, w = input.shape[-3:]
    w_in, cout_g, kh, kw = weight.shape
    conv = params.conv
    g = conv.groups
    if 0 in weight.shape:
        raise ArgumentError(f"{op}: weight must have no zero-size dimension, got shape "
                            f"{tuple(weight.shape)}")
    if c_in % g:
        raise ArgumentError(f"{op}: groups={g} must divide the input channels, got {c_in}")
    if w_in != c_in:
        raise ArgumentError(f"{op}: input has {c_in} channels but weight of shape "
                            f"{tuple(weight.shape)} expects {w_in} (weight.shape[0])")
    c_out = cout_g * g
    if bias is not None:
        check_same(op, "input", input, "bias", bias, autocast=True)
        if tuple(bias.shape) != (c_out,):
            raise ArgumentError(f"{op}: expected bias of shape ({c_out},) = (weight.shape[1] * "
                                f"groups,), got {tuple(bias.shape)}")
    size = []
    for a, (n_in, k) in enumerate(((h, kh), (w, kw))):
        size.append((n_in - 1) * conv.stride[a] - conv.padding[2 * a] - conv.padding[2 * a + 1]
                    + conv.dilation[a] * (k - 1) + params.output_padding[a] + 1)
    if min(size) < 1 or min(h, w) < 1:
        raise ArgumentError(f"{op}: input of size ({h}, {w}) gives an output of size "
                            f"{tuple(size)} with these options; it must be at least 1x1")
    return tuple(input.shape[:-3]) + (c_out, *size)


@dataclass(frozen=True)
class Pool2dParams:
    """Normalised pooling options; ``padding`` is symmetric ``(pH, pW)``."""

    kernel: Pair
    stride: Pair
    padding: Pair
    dilation: Pair
    ceil_mode: bool

    def output_hw(self, in_hw: Pair) -> Pair:
        return tuple(out_size(in_hw[a], self.kernel[a], self.stride[a], self.padding[a],
                              self.padding[a], self.dilation[a], self.ceil_mode)
                     for a in (0, 1))

    @property
    def window_index_dtype(self) -> torch.dtype:
        """dtype of max pooling's window argmax (the winning tap's row-major number within
        its window, what the gradient needs): uint8 up to 256 taps, else int32."""
        return torch.uint8 if self.kernel[0] * self.kernel[1] <= 256 else torch.int32


def pool2d_params(kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                  op: str = "max_pool2d") -> Pool2dParams:
    """Validate and normalise pooling options; ``stride=None`` (or ``[]``) means the kernel size.

    Padding may be at most half of ``kernel_size``, as ``nn.MaxPool2d`` documents and as
    PyTorch enforces on its autograd path (its no-grad max pooling allows half the dilated
    kernel, so an input accepted there would fail once it requires grad; fastconv uses the one
    rule that holds on every path).
    """
    kernel = _at_least(pair(kernel_size, "kernel_size", op), 1, "kernel_size", op)
    stride = kernel if stride is None or (isinstance(stride, (tuple, list)) and not stride) \
        else _at_least(pair(stride, "stride", op), 1, "stride", op)
    padding = _at_least(pair(padding, "padding", op), 0, "padding", op)
    dilation = _at_least(pair(dilation, "dilation", op), 1, "dilation", op)
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ArgumentError(f"{op}: padding must be at most half of kernel_size={kernel}, "
                            f"got padding={padding}")
    return Pool2dParams(kernel, stride, padding, dilation, bool(ceil_mode))


def check_pool2d(input: torch.Tensor, params: Pool2dParams, op: str,
                 integers: bool = False) -> tuple[int, ...]:
    """Validate a pooling input (N, C, H, W) or (C, H, W); returns the output shape."""
    if not isinstance(input, torch.Tensor):
        raise ArgumentError(f"{op}: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() not in (3, 4):
        raise ArgumentError(f"{op}: expected input of 3 dims (C, H, W) or 4 dims (N, C, H, W), "
                            f"got {input.dim()} dims with shape {tuple(input.shape)}")
    check_layout("input", input, op)
    check_dtype("input", input, op, integers=integers)
    h, w = input.shape[-2:]
    ho, wo = params.output_hw((h, w))
    if ho < 1 or wo < 1:
        raise ArgumentError(f"{op}: input of size ({h}, {w}) gives an output of size "
                            f"({ho}, {wo}) with kernel_size={params.kernel}, "
                            f"stride={params.stride}, padding={params.padding}, "
                            f"dilation={params.dilation}; the output must be at least 1x1")
    return tuple(input.shape[:-2]) + (ho, wo)
