"""The CuPy CUDA engine: CUDA C++ kernels in ``kernels/``, compiled at run time by NVRTC.

``fastconv.cuda.conv2d`` and ``fastconv.cuda.pool2d`` have the same entry points as the CPU
engine's modules; ``fastconv.ops`` picks the engine by the tensors' device. Nothing here
imports CuPy at package import time, so fastconv works on machines without it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent


def kernel_dir() -> Path:
    """Folder holding the ``.cu``/``.cuh`` sources.

    An installed wheel carries them as ``fastconv/kernels``; a source checkout (plain or an
    editable install) has them at the repository root. ``FASTCONV_KERNEL_DIR`` overrides both.
    """
    override = os.environ.get("FASTCONV_KERNEL_DIR")
    candidates = [Path(override)] if override else [_PACKAGE / "kernels", _PACKAGE.parent / "kernels"]
    for path in candidates:
        if path.is_dir() and any(path.glob("*.cu*")):
            return path
    raise FileNotFoundError("fastconv: CUDA kernel sources not found; looked in "
                            + ", ".join(str(p) for p in candidates))


def kernel_sources() -> list[Path]:
    """Every CUDA source file shipped with fastconv, sorted by name."""
    return sorted(p for p in kernel_dir().iterdir() if p.suffix in (".cu", ".cuh"))


def cupy_status() -> tuple[bool, str]:
    """(usable, reason): whether CuPy imports and sees a GPU, and if not, why."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        return False, f"CuPy not importable ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy {cupy.__version__} found no usable GPU ({exc})"
    if count == 0:
        return False, f"CuPy {cupy.__version__} found no GPU"
    return True, f"CuPy {cupy.__version__}, {count} GPU(s)"


@functools.cache
def device_status(device_index: int) -> tuple[bool, str]:
    """(usable, reason) for running fastconv's kernels on CUDA device ``device_index``."""
    ok, reason = cupy_status()
    if not ok:
        return False, (f"{reason}; install CuPy for your CUDA version, e.g. "
                       f"pip install 'fastconv[cuda12]'")
    import torch

    from ._launch import MIN_CAPABILITY

    capability = torch.cuda.get_device_capability(device_index)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device_index)
        return False, (f"{name} has compute capability {capability[0]}.{capability[1]}; "
                       f"fastconv's CUDA kernels need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                       f"or newer (tensor-core mma.sync and bfloat16)")
    return True, reason


def available() -> tuple[bool, str]:
    """(usable, reason): whether the CUDA engine can run on the current GPU."""
    import torch

    if not torch.cuda.is_available():
        return False, "PyTorch sees no CUDA GPU"
    return device_status(torch.cuda.current_device())


from . import conv2d, pool2d  # noqa: E402  (engine modules; neither imports CuPy)
