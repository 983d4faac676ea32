"""Drop-in ``torch.nn`` modules computed by fastconv, and ``convert``."""

from .conv2d import Conv2D
from .convert import convert

__all__ = ["Conv2D", "convert"]
