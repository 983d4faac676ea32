"""Autograd Functions and the functional API, one file per op."""

from .conv2d import Conv2dFunction, conv2d
from .pool2d import AvgPool2dFunction, MaxPool2dFunction, avg_pool2d, max_pool2d

__all__ = ["AvgPool2dFunction", "Conv2dFunction", "MaxPool2dFunction", "avg_pool2d", "conv2d",
           "max_pool2d"]
