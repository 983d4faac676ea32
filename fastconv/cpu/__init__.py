"""The Numba CPU engine: JIT-compiled kernels, parallel across cores (see ``_runtime``).

``empty_cache()`` and ``cache_info()`` manage the memory it recycles for outputs of 4 MiB and
up; ``empty_cache()`` also returns the free heap memory glibc keeps mapped under the settings
importing the engine makes (``FASTCONV_MALLOC_KEEP_MB``; see ``_runtime``). ``set_autotune()``,
``autotune_choices()`` and ``clear_autotune()`` control and report the per-configuration
choice of conv algorithm (see ``_autotune``)."""

from . import conv2d, pool2d
from ._autotune import choices as autotune_choices
from ._autotune import clear as clear_autotune
from ._autotune import set_autotune
from ._runtime import cache_info, empty_cache

__all__ = ["autotune_choices", "cache_info", "clear_autotune", "conv2d", "empty_cache", "pool2d",
           "set_autotune"]
