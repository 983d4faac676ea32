"""The ``fastconv::`` operator library: how each op is registered with PyTorch.

Every pass of every op (forward, each gradient, the gradients' own gradients) is a
``torch.library`` operator with:

* one implementation for every device (``CompositeExplicitAutograd``), which validates its
  arguments (the ops are callable directly, as ``torch.ops.fastconv.<name>``) and calls the
  engine of the tensors' device;
* a fake implementation (shapes, dtype and strides only) so ``torch.compile`` traces it without
  running it;
* an autograd formula written with fastconv's own ops, so gradients are differentiable again;
* for the ops autocast covers, an autocast rule (see ``autocast``).

Ops are declared with ``Library.define`` rather than ``torch.library.custom_op``: the
decorator's Python wrapper costs ~17 us more per eager call on a tiny conv.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch._functorch import utils as _functorch_utils

from .._profiling import op_range
from ._engine import engine_for

LIB = torch.library.Library("fastconv", "DEF")  # noqa: TOR901 - a fresh namespace we own


def define(schema: str, impl, fake, backward=None, setup_context=None) -> None:
    """Declare ``fastconv::<schema>`` with its device-generic implementation, fake
    implementation and (optionally) autograd formula."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastconv::{name}", fake, lib=LIB)
    if backward is not None:
        LIB.impl(name, _autograd_kernel(getattr(torch.ops.fastconv, name).default, backward,
                                        setup_context, impl), "Autograd", with_keyset=True)


# What may lie below autograd for the kernel to call the implementation itself rather than
# redispatch to it: a plain CPU or CUDA tensor's keys, ADInplaceOrView (a fallthrough for
# fastconv's ops) or not. Anything else (a TorchDispatchMode's Python key, functionalization,
# a tensor subclass, meta or fake tensors) takes the dispatcher as usual.
_K = torch._C.DispatchKey
_PLAIN_BELOW_AUTOGRAD = frozenset(
    keys.raw_repr() for backend in (_K.CPU, _K.CUDA)
    for keys in (torch._C.DispatchKeySet(backend),
                 torch._C.DispatchKeySet(backend).add(_K.ADInplaceOrView)))


def _autograd_kernel(op, backward, setup_context, impl):
    """The Autograd-key kernel ``torch.library.register_autograd`` would register, leaner.

    Same mechanism (an autograd.Function whose forward runs the op below autograd, the
    keyset riding as a trailing argument), without its per-call generalities that no fastconv
    schema needs (default and keyword-only arguments, tensor lists): those cost ~20 us per
    call, as much as the engine call of a tiny conv. ``impl`` is the op's implementation,
    called directly (by the kernel, or by the node's forward when recording a gradient) where
    the redispatch could reach nothing else.
    """

    def run_below(keyset, args):
        """The op below autograd: the implementation itself where the redispatch could reach
        nothing else (one Python -> C++ -> Python round trip less per call, ~6 of a tiny
        conv's 46 us), else the redispatch."""
        below = keyset & torch._C._after_autograd_keyset
        if below.raw_repr() in _PLAIN_BELOW_AUTOGRAD:
            return impl(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(below, *args)

    class Node(torch.autograd.Function):
        @staticmethod
        def forward(*args):
            return run_below(args[-1], args[:-1])

        @staticmethod
        def setup_context(ctx, inputs, output):  # a separate method: torch.func needs it
            setup_context(ctx, inputs[:-1], output)

        @staticmethod
        def backward(ctx, *grads):
            grads = backward(ctx, *grads)
            return (*grads, None) if isinstance(grads, tuple) else (grads, None)

    Node.__name__ = Node.__qualname__ = f"{op._opname}_backward"
    # The C apply under ``Function.apply``: that wrapper binds the arguments to forward's
    # signature (``inspect.signature`` on every call, ~30 us, since setup_context is defined)
    # and routes functorch transforms, which ``kernel`` refuses before getting here; forward
    # takes ``*args``, so the binding changes nothing.
    apply = super(torch.autograd.Function, Node).apply

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            if torch._C._functorch.maybe_current_level() is not None:
                raise NotImplementedError(
                    f"fastconv::{op._opname}: torch.func transforms (grad, vjp, jacrev, jvp, "
                    f"or vmap of a function that records gradients) are not supported; use "
                    f"torch.autograd.grad, which supports gradients of any order")
            return apply(*_functorch_utils.unwrap_dead_wrappers(args), keyset)
        return run_below(keyset, args)

    return kernel


class Checked(NamedTuple):
    """What an op's argument check tells its implementations."""

    like: torch.Tensor  # picks the engine (its device); the output takes its dtype and device
    shape: tuple  # of the output
    memory_format: torch.memory_format  # of the output
    params: Any  # normalised options for the engine


def define_op(schema: str, check, compute, range_name: str, backward, setup_context) -> None:
    """``define`` for a one-output op from two parts: ``check(*args) -> Checked`` validates
    the arguments (run by the fake implementation too, so ``torch.compile`` reports bad input
    at trace time), and ``compute(engine, checked, *args)`` runs the engine."""
    op_name = schema.split("(", 1)[0]

    def impl(*args):
        checked = check(*args)
        engine = engine_for(checked.like, op_name)
        with op_range(range_name, checked.like):
            out = compute(engine, checked, *args)
        return in_format(out, checked.memory_format)

    def fake(*args):
        checked = check(*args)
        return fake_output(checked.like, checked.shape, checked.memory_format)

    define(schema, impl, fake, backward, setup_context)


def _channels_last_strides(shape, strides) -> bool:
    """PyTorch's ``is_channels_last_strides_2d`` (c10/core/MemoryFormat.h), which
    ``Tensor.suggest_memory_format()`` reads: strides ordered C < W < H < N, sizes of one
    ignored. Plain Python on ints: the ``torch._prims_common`` version costs ~3 us a call."""
    if strides[1] == 0:
        return False
    low = 0
    for d in (1, 3, 2, 0):
        if shape[d] == 0 or strides[d] < low:
            return False
        if d == 0 and low == strides[1]:
            return False
        low = strides[d] * shape[d] if shape[d] > 1 else strides[d]
    return True


def output_format(*tensors) -> torch.memory_format:
    """The memory format of an op's outputs: channels_last when any 4-D operand is laid out
    channels_last (``suggest_memory_format``), as PyTorch's CPU and cuDNN convolutions and
    pooling choose."""
    for t in tensors:
        if t is not None and t.dim() == 4 and _channels_last_strides(t.shape, t.stride()):
            return torch.channels_last
    return torch.contiguous_format


def in_format(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """An engine's (contiguous NCHW) result in ``memory_format``."""
    if memory_format == torch.contiguous_format:
        return t
    return t.contiguous(memory_format=memory_format)


def fake_output(like: torch.Tensor, shape, memory_format, dtype=None) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device,
                       memory_format=memory_format)


# ---------------------------------------------------------------------------------- autocast
def _autocast_eligible(t, device_type: str) -> bool:
    # As torch's own autocast casts: floating tensors on that device, float64 left alone.
    return isinstance(t, torch.Tensor) and t.is_floating_point() and \
        t.dtype != torch.float64 and t.device.type == device_type


def autocast(name: str, device_types=("cpu", "cuda")) -> None:
    """Give ``fastconv::<name>`` PyTorch's autocast policy for convolutions ("lower precision
    fp"): inside ``torch.autocast(device_type, dtype)``, floating operands on that device are
    cast to the autocast dtype (``torch.get_autocast_dtype``, so float16 or bfloat16 as the
    user chose) and the op runs with autocast off. ``torch.library.register_autocast`` fixes
    the dtype at registration, so this registers the same two kernels with the dtype read at
    call time."""
    op = getattr(torch.ops.fastconv, name).default
    for device_type in device_types:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def cast_and_run(*args, _device_type=device_type, _key=key):
            dtype = torch.get_autocast_dtype(_device_type)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*(a.to(dtype) if _autocast_eligible(a, _device_type) else a
                            for a in args))

        # The Python kernel serves tracing (torch.compile); the C++ one eager calls.
        op.py_impl(key)(cast_and_run)
        LIB.impl(name, lambda _keyset, *args, _run=cast_and_run: _run(*args), key_name,
                 with_keyset=True)
