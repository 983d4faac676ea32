"""max_pool2d / avg_pool2d: fastconv vs PyTorch, forward and forward+backward, per shape,
beside the machine's copy bandwidth measured in the same run (the roofline for pooling).

    pytest bench/test_bench_pool2d.py --benchmark-only
"""

import pytest
import torch
import torch.nn.functional as F
from shapes import POOL_SHAPES, select

import fastconv

DEVICE = "cpu"
ROUNDS = 5
IMPLS = {"max": {"fastconv": fastconv.max_pool2d, "torch": F.max_pool2d},
         "avg": {"fastconv": fastconv.avg_pool2d, "torch": F.avg_pool2d}}


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = select(POOL_SHAPES, metafunc.config.getoption("--shapes"))
        metafunc.parametrize("shape", shapes, ids=[s.name for s in shapes])


def _input(shape, requires_grad=False):
    batch = shape.batch[DEVICE]
    return torch.randn(batch, shape.c, shape.hw, shape.hw, requires_grad=requires_grad)


def _check_correct(shape, x):
    """Gate: fastconv must agree with PyTorch before either is timed."""
    with torch.no_grad():
        ours = IMPLS[shape.mode]["fastconv"](x, **shape.options())
        theirs = IMPLS[shape.mode]["torch"](x, **shape.options())
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def _extra(benchmark, shape, impl, passname):
    batch = shape.batch[DEVICE]
    benchmark.group = f"{shape.mode}_pool2d {shape.name} {passname}"
    benchmark.extra_info.update(op=f"{shape.mode}_pool2d", shape=shape.name, impl=impl,
                                pass_=passname, device=DEVICE, dtype="float32", batch=batch,
                                bytes=shape.bytes(batch, passname=passname),
                                torch_threads=torch.get_num_threads())


COPY_BYTES = 256 * 2**20  # far beyond the last-level cache: DRAM bandwidth, not L3


def test_copy_bandwidth(benchmark):
    """The roofline for pooling: a plain tensor copy (bytes = read + written)."""
    src = torch.empty(COPY_BYTES // 4).uniform_()
    dst = torch.empty_like(src)
    benchmark.group = "copy bandwidth (roofline)"
    benchmark.extra_info.update(op="copy", impl="torch.copy_", device=DEVICE,
                                bytes=2 * COPY_BYTES, torch_threads=torch.get_num_threads())
    benchmark.pedantic(dst.copy_, args=(src,), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["fastconv", "torch"])
def test_pool2d_fwd(benchmark, shape, impl):
    x = _input(shape)
    _check_correct(shape, x)
    _extra(benchmark, shape, impl, "fwd")
    fn = IMPLS[shape.mode][impl]
    benchmark.pedantic(fn, args=(x,), kwargs=shape.options(), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["fastconv", "torch"])
def test_pool2d_fwdbwd(benchmark, shape, impl):
    x = _input(shape, requires_grad=True)
    _check_correct(shape, x)
    fn = IMPLS[shape.mode][impl]
    grad = torch.randn_like(fn(x, **shape.options()))

    def step():
        x.grad = None
        fn(x, **shape.options()).backward(grad)

    _extra(benchmark, shape, impl, "fwdbwd")
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)
