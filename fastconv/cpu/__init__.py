"""The Numba CPU engine: JIT-compiled kernels, parallel across cores (see ``_runtime``).

``empty_cache()`` and ``cache_info()`` manage the memory it recycles for outputs of 32 MiB and
up (see ``_runtime``)."""

from . import conv2d, pool2d
from ._runtime import cache_info, empty_cache

__all__ = ["cache_info", "conv2d", "empty_cache", "pool2d"]
