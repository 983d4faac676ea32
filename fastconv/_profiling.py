"""Named ranges around every pass of every fastconv op, for torch.profiler and Nsight.

Each engine call runs inside ``op_range("fastconv.<op>.<pass>", tensor)``: a
``torch.profiler.record_function`` while a torch profiler is recording, and an NVTX range
for CUDA tensors (Nsight Systems shows it; Nsight Compute filters kernels by it with
``--nvtx --nvtx-include``). With no profiler attached it costs one C call (~40 ns), where an
unconditional ``record_function`` costs several microseconds per op.
"""

from __future__ import annotations

import torch

_profiler_enabled = torch._C._autograd._profiler_enabled


class op_range:  # noqa: N801 - used like a function: ``with op_range(...)``
    """``with op_range("fastconv.conv2d.forward", input): ...``"""

    __slots__ = ("name", "cuda", "record")

    def __init__(self, name: str, tensor: torch.Tensor):
        self.name = name
        self.cuda = tensor.is_cuda
        self.record = None

    def __enter__(self):
        if _profiler_enabled():
            self.record = torch.autograd.profiler.record_function(self.name)
            self.record.__enter__()
        if self.cuda:
            torch.cuda.nvtx.range_push(self.name)
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.nvtx.range_pop()
        if self.record is not None:
            self.record.__exit__(*exc)
            self.record = None
        return False
