"""Every CUDA kernel instantiation compiles with nvcc for sm_80 and sm_90, warnings as errors.

Runs without a GPU (CI has nvcc), so a kernel that does not compile fails CI. At run time the
same sources and the same instantiation list (``fastconv.cuda._launch.instantiations``) go
through NVRTC; nvcc's front end is the same, so this is the cheap early check. Each template
instantiation is forced by taking its address, exactly the set NVRTC is asked for.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

from fastconv.cuda import _launch

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")


def _nvcc(arch, unit, out):
    return subprocess.run(
        [NVCC, f"-arch={arch}", "-std=c++17", "-I", str(KERNELS), "-Werror", "all-warnings",
         "-c", str(unit), "-o", str(out)], capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_headers_stand_alone(arch, tmp_path):
    """Each .cuh compiles on its own and twice over (include guard)."""
    for header in sorted(KERNELS.glob("*.cuh")):
        unit = tmp_path / f"include_{header.stem}.cu"
        unit.write_text(f'#include "{header.name}"\n#include "{header.name}"\n')
        result = _nvcc(arch, unit, tmp_path / "h.o")
        assert result.returncode == 0, f"{header.name} for {arch}:\n{result.stderr}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("op", sorted(_launch.SOURCES))
def test_every_instantiation_compiles(op, arch, tmp_path):
    names = [n for dtype in _launch.DTYPES for n in _launch.instantiations(op, dtype)]
    assert names
    unit = tmp_path / f"{op}_instances.cu"
    unit.write_text(f'#include "{_launch.SOURCES[op]}"\n\n'
                    "void* fastconv_instances[] = {\n"
                    + "".join(f"    (void*)&{name},\n" for name in names) + "};\n")
    result = _nvcc(arch, unit, tmp_path / f"{op}.o")
    assert result.returncode == 0, f"{op} for {arch}:\n{result.stderr[-6000:]}"
    assert (tmp_path / f"{op}.o").stat().st_size > 0
