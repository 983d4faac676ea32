"""Drop-in ``torch.nn`` modules computed by fastconv, and ``convert``."""

from .conv2d import Conv2D, ConvTranspose2D
from .convert import convert
from .pool2d import AvgPool2D, MaxPool2D

__all__ = ["AvgPool2D", "Conv2D", "ConvTranspose2D", "MaxPool2D", "convert"]
