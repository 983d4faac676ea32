"""Every CUDA source compiles with nvcc for sm_80 and sm_90, warnings as errors.

Runs without a GPU (CI has nvcc), so a kernel that does not compile fails CI. At run time the
same sources go through NVRTC; nvcc's front end is the same, so this is the cheap early check.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")


def _translation_units(tmp_path):
    """Each .cu as is; each .cuh through a file that only includes it (checks it stands alone)."""
    units = sorted(KERNELS.glob("*.cu"))
    for header in sorted(KERNELS.glob("*.cuh")):
        unit = tmp_path / f"include_{header.stem}.cu"
        unit.write_text(f'#include "{header.name}"\n#include "{header.name}"\n')  # guard check
        units.append(unit)
    return units


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compiles(arch, tmp_path):
    units = _translation_units(tmp_path)
    assert units
    for unit in units:
        result = subprocess.run(
            [NVCC, f"-arch={arch}", "-std=c++17", "-I", str(KERNELS), "-Werror", "all-warnings",
             "-c", str(unit), "-o", str(tmp_path / (unit.stem + ".o"))],
            capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{unit.name} for {arch}:\n{result.stderr}"
