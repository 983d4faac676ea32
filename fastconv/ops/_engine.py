"""Which engine computes for a tensor's device."""

from __future__ import annotations

import torch

from .._args import DeviceError


def engine_for(tensor: torch.Tensor, op: str):
    """The engine module (``fastconv.cpu``) for ``tensor``'s device, or a clear error."""
    kind = tensor.device.type
    if kind == "cpu":
        from .. import cpu

        return cpu
    if kind == "cuda":
        raise NotImplementedError(
            f"{op}: fastconv's CUDA engine is not available in this version; the input is on "
            f"{tensor.device}. Move the tensors and module to the CPU (.cpu()) to use fastconv.")
    raise DeviceError(f"{op}: fastconv computes on 'cpu' tensors; got a tensor on {tensor.device}")
