"""Run fastconv's CUDA kernels on the CPU, for tests on machines without a GPU.

``EmulatorBackend`` stands in for CuPy behind ``fastconv.cuda._launch``: the engine's own
launchers run unchanged on CPU tensors, and each kernel launch executes the real kernel source
compiled with g++ against ``emulator.h`` (one fiber per CUDA thread, real barriers and shared
memory). The instantiation list is the engine's own (``_launch.instantiations``), the same list
NVRTC and the nvcc test compile.

Out-of-bounds writes: every buffer the engine allocates sits between guard regions and starts
filled with NaN, and the guards are checked after every launch, so a kernel that writes past
a tensor, or leaves an output element unwritten, fails the test that ran it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import weakref
from pathlib import Path

import numpy as np
import torch

from fastconv.cuda import _launch, kernel_dir

HERE = Path(__file__).resolve().parent
CXX = shutil.which(os.environ.get("CXX", "g++"))
GUARD = 64  # elements of guard on each side of every allocation
GUARD_BYTE = 0xA5


class KernelFault(AssertionError):
    """A kernel wrote out of bounds or deadlocked at a barrier."""


class EmulatorBackend:
    """A ``fastconv.cuda._launch`` backend executing the kernels on the CPU."""

    def __init__(self, build_dir: Path, sms: int = 2):
        self.build_dir = Path(build_dir)
        self.build_dir.mkdir(parents=True, exist_ok=True)
        self.sms = sms
        self._libs: dict = {}
        self._guarded: list = []
        self.launches: list[str] = []  # every kernel name launched, in order

    # -- the backend interface used by fastconv.cuda._launch --
    def device_index(self, tensor):
        return 0

    def sm_count(self, device_index):
        return self.sms

    def empty(self, shape, dtype, device):
        count = int(np.prod(shape)) if len(shape) else 1
        base = torch.empty(count + 2 * GUARD, dtype=dtype)
        raw = base.view(torch.uint8)
        raw.fill_(GUARD_BYTE)
        body = base[GUARD:GUARD + count]
        if dtype.is_floating_point:
            body.fill_(float("nan"))
        self._guarded.append(weakref.ref(base))
        return body.view(shape)

    def launch(self, device_index, op, dtype, name, grid, block, args):
        fn = self._function(op, dtype, name)
        keep = []
        pointers = (ctypes.c_void_p * max(1, len(args)))()
        for i, a in enumerate(args):
            if isinstance(a, int):
                buf = ctypes.c_int64(a)  # as CuPy passes a Python int
            elif isinstance(a, (np.generic, np.ndarray)):
                buf = ctypes.create_string_buffer(np.asarray(a).tobytes())
            else:
                raise TypeError(f"emulator: unsupported kernel argument {a!r}")
            keep.append(buf)
            pointers[i] = ctypes.addressof(buf)
        grid_arr = (ctypes.c_uint * 3)(*grid)
        block_arr = (ctypes.c_uint * 3)(*block)
        self.launches.append(name)
        if fn(grid_arr, block_arr, pointers):
            raise KernelFault(f"{name}: {self._error(op, dtype)}")
        self._check_guards(name)

    # -- internals --
    def _check_guards(self, name):
        alive = []
        for ref in self._guarded:
            base = ref()
            if base is None:
                continue
            alive.append(ref)
            raw = base.view(torch.uint8)
            edge = GUARD * base.element_size()
            if not (bool((raw[:edge] == GUARD_BYTE).all())
                    and bool((raw[-edge:] == GUARD_BYTE).all())):
                raise KernelFault(f"{name} wrote outside a tensor it was given")
        self._guarded = alive

    def _error(self, op, dtype):
        lib, _ = self._lib(op, dtype)
        return lib.fc_error().decode()

    def _function(self, op, dtype, name):
        lib, names = self._lib(op, dtype)
        try:
            i = names.index(name)
        except ValueError:
            raise KeyError(f"{name} is not in {op}'s instantiation list") from None
        fn = getattr(lib, f"fc_launch_{i}")
        fn.restype = ctypes.c_int
        return fn

    def _lib(self, op, dtype):
        key = (op, dtype)
        if key not in self._libs:
            self._libs[key] = self._build(op, dtype)
        return self._libs[key]

    def _build(self, op, dtype):
        names = _launch.instantiations(op, dtype)
        path = kernel_dir() / _launch.SOURCES[op]
        lines = ['#include "emulator.h"', f'#include "{path}"', ""]
        for i, name in enumerate(names):
            lines.append(f'extern "C" int fc_launch_{i}(const unsigned* g, const unsigned* b, '
                         f'void** a) {{ return fcemu::launch(&{name}, g, b, a); }}')
        lines.append('extern "C" const char* fc_error() { return fcemu::error; }')
        unit = "\n".join(lines) + "\n"
        sources = [HERE / "emulator.h", *sorted(kernel_dir().glob("*.cu*"))]
        digest = hashlib.sha256(unit.encode() + b"".join(p.read_bytes() for p in sources))
        so = self.build_dir / f"{op}_{str(dtype).split('.')[-1]}_{digest.hexdigest()[:16]}.so"
        if not so.exists():
            cpp = so.with_suffix(".cpp")
            cpp.write_text(unit)
            cmd = [CXX, "-std=c++17", "-O1", "-fPIC", "-shared", "-fno-strict-aliasing",
                   "-Wall", "-Wno-unused-variable", "-Wno-unknown-pragmas",
                   "-I", str(HERE), "-I", str(kernel_dir()), str(cpp), "-o", str(so)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"emulator build failed for {op} {dtype}:\n{result.stderr}")
        lib = ctypes.CDLL(str(so))
        lib.fc_error.restype = ctypes.c_char_p
        return lib, names
