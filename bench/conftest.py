"""Options shared by the pytest-benchmark files: which shapes, device and dtype to time."""

import os

import pytest
import torch

from fastconv import benchmark


def pytest_addoption(parser):
    parser.addoption("--shapes", default=os.environ.get("FASTCONV_BENCH_SHAPES"),
                     help="comma-separated substrings of shape names (default: all but 'smoke')")
    parser.addoption("--device", default="cpu", help="cpu (default) or cuda")
    parser.addoption("--dtype", default="float32", choices=sorted(benchmark.DTYPES))
    parser.addoption("--tf32", action="store_true",
                     help="let PyTorch's float32 GPU baseline use TF32 (default: off)")


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        ops = getattr(metafunc.module, "OPS", None)
        shapes = benchmark.select_shapes(metafunc.config.getoption("--shapes"), ops)
        metafunc.parametrize("shape", shapes, ids=[s.name for s in shapes])


@pytest.fixture(scope="session")
def device(pytestconfig):
    device = pytestconfig.getoption("--device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda: no CUDA device visible to torch")
    benchmark.configure_device(device, pytestconfig.getoption("--tf32"))
    return device


@pytest.fixture(scope="session")
def dtype(pytestconfig):
    return benchmark.DTYPES[pytestconfig.getoption("--dtype")]


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
