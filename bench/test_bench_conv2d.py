"""conv2d: fastconv vs PyTorch (oneDNN on the CPU, cuDNN on a GPU), forward and
forward+backward, per shape of the suite in shapes.py.

    pytest bench --benchmark-only                            # grouped by shape and pass
    pytest bench --benchmark-only --shapes resnet            # a subset
    pytest bench --benchmark-only --device cuda --dtype float16
    pytest bench --benchmark-only --benchmark-json=run.json  # then: python bench/report.py run.json

Every fastconv case is first checked against PyTorch (forward and, for fwdbwd, every
gradient, against a float64 result); a wrong kernel is never timed. GPU calls synchronize
inside the timed call, after warm-up rounds that absorb compilation and cuDNN autotuning.
Without --benchmark-only (or with --benchmark-disable) each case runs once as a smoke test.
"""

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv import benchmark as suite
from fastconv import reference

OPS = ("conv2d",)
ROUNDS = 5
WARMUP = 2


def time_case(benchmark, shape, impl, passname, device, dtype):
    """Gate (fastconv), then time one case of the suite; shared by the pool2d file."""
    if impl == "fastconv":
        suite.check_case(shape, passname, device, dtype)
    case = suite.make_case(shape, impl, passname, device, dtype)
    info = case.info()
    benchmark.group = f"{shape.op} {shape.name} {passname} {info['device']} {info['dtype']}"
    benchmark.extra_info.update(info)
    benchmark.pedantic(case.synced(), rounds=ROUNDS, warmup_rounds=WARMUP)


@pytest.mark.parametrize("impl", suite.IMPLS)
@pytest.mark.parametrize("passname", suite.PASSES)
def test_conv2d(benchmark, shape, passname, impl, device, dtype):
    time_case(benchmark, shape, impl, passname, device, dtype)


@pytest.mark.parametrize("impl", ["seed-loop", "fastconv", "torch"])
def test_demo_image(benchmark, impl):
    """The demo's edge detection on a DEMO_IMAGE_SIZE^2 image: the seed loop vs fast versions."""
    size = suite.load_suite().DEMO_IMAGE_SIZE
    X = torch.rand(size, size)
    K = torch.tensor([[1.0, -1.0]])
    expected = F.conv2d(X[None, None], K[None, None])[0, 0]
    fns = {"seed-loop": lambda: reference.corr2d(X, K),
           "fastconv": lambda: fastconv.conv2d(X[None, None], K[None, None])[0, 0],
           "torch": lambda: F.conv2d(X[None, None], K[None, None])[0, 0]}
    torch.testing.assert_close(fns[impl](), expected)
    benchmark.group = f"demo-image {size}x{size}"
    benchmark.extra_info.update(op="corr2d", impl=impl, device="cpu")
    rounds = 1 if impl == "seed-loop" else 50
    benchmark.pedantic(fns[impl], rounds=rounds, warmup_rounds=0 if impl == "seed-loop" else 2)
