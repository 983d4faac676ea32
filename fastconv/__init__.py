"""fastconv: fast convolution and pooling for PyTorch, on Numba (CPU) and CuPy (CUDA) kernels.

``fastconv.conv2d``, ``conv_transpose2d``, ``max_pool2d`` and ``avg_pool2d`` follow
``torch.nn.functional``; ``Conv2D``, ``ConvTranspose2D``, ``MaxPool2D`` and ``AvgPool2D`` are
drop-ins for the ``torch.nn`` layers (all of them ``torch.library`` operators underneath, so
``torch.compile`` traces them);
``fastconv.convert(model)`` swaps a model's layers in place.
"""

from . import reference
from ._args import ArgumentError, DeviceError, DTypeError
from .nn import AvgPool2D, Conv2D, ConvTranspose2D, MaxPool2D, convert
from .ops import avg_pool2d, conv2d, conv_transpose2d, max_pool2d

__version__ = "0.1.0"

__all__ = ["ArgumentError", "AvgPool2D", "Conv2D", "ConvTranspose2D", "DTypeError", "DeviceError",
           "MaxPool2D", "avg_pool2d", "conv2d", "conv_transpose2d", "convert", "max_pool2d",
           "reference", "__version__"]
