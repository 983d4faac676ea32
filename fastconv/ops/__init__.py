"""Autograd Functions and the functional API, one file per op."""

from .conv2d import Conv2dFunction, conv2d

__all__ = ["Conv2dFunction", "conv2d"]
