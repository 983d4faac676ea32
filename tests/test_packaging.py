"""The wheel ships the CUDA sources and the package finds them, installed or from a checkout."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted(p.name for p in (REPO / "kernels").iterdir() if p.suffix in (".cu", ".cuh"))
SUITE = ("from fastconv import benchmark as b; print(b.suite_path()); "
         "print(*[s.name for s in b.select_shapes()])")
FIND = "import fastconv.cuda as c; print(c.kernel_dir()); print(*[p.name for p in c.kernel_sources()])"


def _run(code, cwd, pythonpath):
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    env.pop("FASTCONV_KERNEL_DIR", None)
    env.pop("FASTCONV_BENCH_SUITE", None)
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split("\n")


def test_there_are_kernel_sources():
    assert SOURCES, "kernels/ holds no .cu/.cuh files"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("hatchling", reason="building the wheel needs hatchling (test extra)")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(REPO)], check=True, timeout=600)
    (path,) = out.glob("fastconv-*.whl")
    return path


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for source in SOURCES:
        assert f"fastconv/kernels/{source}" in names
    assert "fastconv/_bench/shapes.py" in names  # the suite `fastconv bench` runs
    assert any(n.endswith("entry_points.txt") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fastconv = fastconv.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_wheel_finds_its_kernels(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, timeout=600)
    kernel_dir, names = _run(FIND, cwd=tmp_path, pythonpath=site)[:2]
    assert Path(kernel_dir) == site / "fastconv" / "kernels"
    assert names.split() == SOURCES
    suite = _run(SUITE, cwd=tmp_path, pythonpath=site)
    assert Path(suite[0]) == site / "fastconv" / "_bench" / "shapes.py"
    assert "resnet-3x3-64" in suite[1].split()


def test_source_checkout_finds_its_kernels(tmp_path):
    kernel_dir, names = _run(FIND, cwd=tmp_path, pythonpath=REPO)[:2]
    assert Path(kernel_dir) == REPO / "kernels"
    assert names.split() == SOURCES
    assert Path(_run(SUITE, cwd=tmp_path, pythonpath=REPO)[0]) == REPO / "bench" / "shapes.py"
