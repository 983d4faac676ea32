"""fastconv: fast convolution and pooling for PyTorch, on Numba (CPU) and CuPy (CUDA) kernels.

``fastconv.conv2d`` follows ``torch.nn.functional.conv2d``; ``fastconv.Conv2D`` is a drop-in
for ``torch.nn.Conv2d``; ``fastconv.convert(model)`` swaps a model's layers in place.
"""

from . import reference
from ._args import ArgumentError, DeviceError, DTypeError
from .nn import Conv2D, convert
from .ops import conv2d

__version__ = "0.1.0"

__all__ = ["ArgumentError", "Conv2D", "DTypeError", "DeviceError", "conv2d", "convert",
           "reference", "__version__"]
