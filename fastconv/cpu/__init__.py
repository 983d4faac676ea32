"""The Numba CPU engine: JIT-compiled kernels, parallel across cores (see ``_runtime``)."""

from . import conv2d, pool2d

__all__ = ["conv2d", "pool2d"]
