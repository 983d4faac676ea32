"""The CuPy CUDA engine: locating the CUDA C++ sources in ``kernels/`` and probing for CuPy.

Nothing here imports CuPy at package import time, so fastconv works on machines without it.
"""

from __future__ import annotations

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
