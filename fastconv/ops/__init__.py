"""The ``fastconv::`` operators (``torch.ops.fastconv``) and the functional API, one file per
op; ``_library`` says how they are registered."""

from .conv2d import conv2d
from .conv_transpose2d import conv_transpose2d
from .pool2d import avg_pool2d, max_pool2d

__all__ = ["avg_pool2d", "conv2d", "conv_transpose2d", "max_pool2d"]
