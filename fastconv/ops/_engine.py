"""Which engine computes for a tensor's device."""

from __future__ import annotations

import torch


def engine_for(tensor: torch.Tensor, op: str):
    """The engine package (``fastconv.cpu`` or ``fastconv.cuda``) for ``tensor``'s device, or a
    clear error."""
    kind = tensor.device.type
    if kind == "cpu":
        from .. import cpu

        return cpu
    if kind == "cuda":
        from .. import cuda

        index = tensor.device.index if tensor.device.index is not None \
            else torch.cuda.current_device()
        ok, reason = cuda.device_status(index)
        if not ok:
            raise NotImplementedError(
                f"{op}: fastconv's CUDA engine cannot run on {tensor.device}: {reason}. "
                f"Move the tensors and module to the CPU (.cpu()) to use fastconv there.")
        return cuda
    raise NotImplementedError(f"{op}: fastconv computes on 'cpu' and 'cuda' tensors; got a "
                              f"tensor on {tensor.device}")
